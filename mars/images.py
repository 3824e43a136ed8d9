"""Image helpers shared by the pipeline, the command lines, the app and training data.

    from mars.images import load_image, flatten_on_white
    rgb = flatten_on_white(load_image("in.png"))   # any PIL mode -> RGB on white
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def flatten_on_white(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white (the background every model here is trained on)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """The decoded image at `path`, or a one-line OSError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except OSError as error:
        raise OSError(f"cannot read image {path}: {error}") from None
