"""Image helpers shared by the pipeline, the command lines, the app and training data.

    from mars.images import load_image, flatten_on_white, save_image
    rgb = flatten_on_white(load_image("in.png"))   # any PIL mode -> RGB on white, or a one-line OSError
    square = fit_square(rgb, 128)                   # shorter side to 128, centre crop
    check_caption_image(rgb, "in.png")             # ValueError: too small to caption, or blank
    save_image(rgb, Path("out.png"))                # written whole or not at all
    labelled_sheet([(rgb, "a caption")], columns=6)  # images tiled with a label under each

Tests: `pytest tests/test_bad_input.py tests/test_app.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import IO

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from mars.errors import first_line

# What Pillow raises for a file it cannot decode: OSError (unreadable, truncated), SyntaxError and
# ValueError (malformed headers), and DecompressionBombError, which is no OSError.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Captioning resizes every image to the model's base size (128 px for the shipped model); below this
# side there is too little left to describe, and the model would still name shapes with confidence.
MIN_CAPTION_SIDE = 16
# A channel spread this small (of 255) is one colour plus compression noise: a blank image.
BLANK_SPREAD = 8


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, centre crop, bicubic: how every image meets a model (training, code
    extraction, reconstruction)."""
    if image.size == (size, size):
        return image
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


def flatten_on_white(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white (the background every model here is trained on)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


class UnreadableImage(OSError):
    """An image file that cannot be used: `name`, what is wrong (`reason`), and what to do (`advice`)."""

    def __init__(self, name: str, reason: str, advice: str):
        super().__init__(f"cannot read image {name}: {reason}; {advice}")
        self.name, self.reason, self.advice = name, reason, advice


def load_image(source: str | Path | IO[bytes], name: str | None = None, decode: bool = True) -> Image.Image:
    """The decoded image at `source` (a path, or a binary file object that `name` names), or a one-line
    OSError (UnreadableImage) naming it: not a file, not an image, truncated, or larger than Pillow's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS, about 89 megapixels), which is checked from the
    header before any pixel is decoded. decode=False reads the header only (size and mode, no pixels):
    a quick check of many files before the work on them starts."""
    name = str(source) if name is None else name
    try:
        # Pillow only warns between its limit and twice it, and the warning would print two lines of its
        # own; as an error it is refused like anything larger.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if decode:
                    image.load()
                return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = Image.MAX_IMAGE_PIXELS / 1e6
        raise UnreadableImage(name, f"it has more than {limit:.0f} million pixels (Pillow's limit against "
                                    "decompression bombs)", "downscale it") from None
    except UnidentifiedImageError:
        raise UnreadableImage(name, "not an image format Pillow knows, or damaged",
                              "give a PNG, JPEG or WebP file") from None
    except UNREADABLE as error:
        raise UnreadableImage(name, first_line(error), "give a PNG, JPEG or WebP file") from None


def check_caption_image(image: Image.Image, name: str = "the image") -> None:
    """A ValueError unless `image` has something to caption: at least MIN_CAPTION_SIDE px a side and
    more than one colour. A blank image is refused rather than captioned: the model only ever saw
    scenes with shapes in them, so it would name shapes that are not there."""
    width, height = image.size
    if min(width, height) < MIN_CAPTION_SIDE:
        raise ValueError(f"{name} is {width} x {height} pixels, too small to caption: give an image at least "
                         f"{MIN_CAPTION_SIDE} pixels a side")
    if all(high - low <= BLANK_SPREAD for low, high in flatten_on_white(image).getextrema()):
        raise ValueError(f"{name} is blank (a single colour): there is nothing to caption; give a picture "
                         "with shapes in it")


def save_image(image: Image.Image, path: Path) -> None:
    """Write `path` whole or not at all: the image goes to a hidden file beside it, renamed into place, so
    an interrupted run never leaves a truncated image (or half of one over an older file)."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        image.save(partial, format=Image.registered_extensions()[path.suffix.lower()])
        os.replace(partial, path)
    except OSError as error:
        raise OSError(f"cannot write {path} ({error.strerror or first_line(error)}): choose a folder you can "
                      "write to") from None
    finally:
        with contextlib.suppress(OSError):  # gone after the rename, or never made
            partial.unlink()


def labelled_sheet(tiles: list[tuple[Image.Image | None, str]], columns: int, tile: int = 128) -> Image.Image:
    """(image or None, label) pairs -> one RGB sheet on white: `columns` tiles a row, each image resized to
    tile x tile and framed, its label under it in at most two lines (Pillow's default font, which draws
    Latin text only: give a Chinese prompt's English twin). None leaves its tile blank, label and all."""
    font = ImageFont.load_default(size=10)
    label_height = 26
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, label) in enumerate(tiles):
        if image is None:
            continue
        x, y = index % columns * tile, index // columns * (tile + label_height)
        sheet.paste(flatten_on_white(image).resize((tile, tile)), (x, y))
        draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=(200, 200, 200))
        lines = [""]
        for word in label.split():  # wrap into at most two lines of the tile's width
            trial = f"{lines[-1]} {word}".strip()
            if draw.textlength(trial, font=font) <= tile - 4 or not lines[-1]:
                lines[-1] = trial
            elif len(lines) < 2:
                lines.append(word)
            else:
                lines[-1] += "…"
                break
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines), fill="black", font=font, spacing=1)
    return sheet


LISTINGS = (("captions.jsonl", "caption"), ("prompts.jsonl", "prompt"))  # (file, its text field), in order


def read_image_listing(folder: str | Path, listings: tuple[tuple[str, str], ...] = LISTINGS
                       ) -> tuple[Path, list[tuple[Path, str, dict, str]]]:
    """(the listing, [(image path, caption or prompt, the whole record, "listing:line")]) of a folder of
    images with the first of `listings` it holds (default: captions.jsonl, else prompts.jsonl; `file` or
    `image`, and the listing's text field), with one-line errors for a missing folder or listing, a line
    that is not a JSON object with those string fields, and a listing of no images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    for name, text_key in listings:
        listing = folder / name
        if listing.is_file():
            break
    else:
        names = [name for name, _ in listings]
        has = f"neither {' nor '.join(names)}" if len(names) > 1 else f"no {names[0]}"
        keys = " (or ".join(repr(key) for _, key in listings) + ")" * (len(listings) - 1)
        raise FileNotFoundError(f"{folder} has {has}; write one JSON object a line with 'file' and {keys}")
    entries = []
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{listing}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error}); write one JSON object a line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: each line must be a JSON object with 'file' and {text_key!r}")
        file, text = record.get("file", record.get("image")), record.get(text_key)
        if not isinstance(file, str) or not isinstance(text, str):
            raise ValueError(f"{where}: needs string fields 'file' (or 'image') and {text_key!r}")
        entries.append((folder / file, text, record, where))
    if not entries:
        raise ValueError(f"{listing} lists no images")
    return listing, entries
