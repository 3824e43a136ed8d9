"""Text-to-image (and image-to-text) from the command line: a thin client of MarsPipeline.

    python sample.py "a red circle above a blue square" -o out.png
    python sample.py "两个蓝色的正方形" --num-images 4 --seed 1 -o grid.png   # grid.png + grid-0.png ... grid-3.png
    python sample.py "a green triangle" --no-sr --cfg 4 --top-k 64 -o small.png  # the 128-px base image
    python sample.py --prompts prompts.txt --outdir samples/   # samples/000000.png ... + samples/prompts.jsonl
    python sample.py --caption out.png                         # image -> text with the same model

The model is a bundle directory (--checkpoint, default checkpoints/mars-shapes) written by
`python -m train.pipeline` or MarsPipeline.save_pretrained. With --prompts, line k (from 0) is
sampled with seed --seed + k, recorded in prompts.jsonl: `python sample.py PROMPT --seed S` with the
same sampling flags (--cfg, --temperature, --top-k, --top-p, --candidates, --sr-cfg,
--sr-temperature, --num-images, --no-sr) reproduces it. Sampler flags left out take the bundle's
tuned settings (model_index.json "sampling"); --sr-cfg and --sr-temperature drive super-resolution,
which the shipped model runs greedily (--sr-temperature 0) and without guidance (--sr-cfg 1).
Bad input ends with a one-line error and exit code 2, before the model loads where it can; no
output ever overwrites an input (the prompts file, the image to caption) or a file that is not an
image. Ctrl-C ends with exit code 130, and the --outdir listing names exactly the images written.
Tests: `pytest tests/test_sample.py tests/test_bad_input.py`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mars.cli import (MAX_SEED, OneLineParser, add_sampling_arguments, check_image_folder, check_output_file,
                      check_prompts, load_pipeline, one_line_errors, sampler_flag, sampling_options,
                      write_image_folder)
from mars.images import check_caption_image, load_image, save_image


class StepBars:
    """MarsPipeline callback: one progress bar per sampling phase (base, then superres)."""

    def __init__(self, leave: bool = True):
        self.bar, self.leave = None, leave

    def __call__(self, phase: str, step: int, total: int, codes) -> None:
        if step == 0:
            self.bar = tqdm(total=total, desc=phase, unit="step", leave=self.leave)
        self.bar.update(1)
        if step + 1 == total:
            self.close()

    def close(self) -> None:
        """Close the open bar, if any: also on Ctrl-C, so that no bar redraws after the last message."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Images of one size tiled row by row into a near-square grid."""
    columns = math.ceil(math.sqrt(len(images)))
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, math.ceil(len(images) / columns) * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is no prompt
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read prompts file {path} ({error}): give a UTF-8 text file, one prompt a line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt: write one prompt a line")
    return prompts


def check_seeds(seed: int, count: int) -> None:
    """Line k of a prompts file is sampled with seed + k: every one of them must be a seed torch takes."""
    if seed + count - 1 > MAX_SEED:
        raise ValueError(f"--seed {seed} with {count} prompts needs seeds up to {seed + count - 1}, past the "
                         f"largest (2**64 - 1): use --seed {MAX_SEED - count + 1} or less")


def grid_files(output: Path, count: int) -> list[Path]:
    """What a run writes for --num-images `count`: the grid at -o, plus OUT-0.png ... when count > 1."""
    singles = [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]
    return [output] + (singles if count > 1 else [])


def sample(pipe, prompt: str, seed: int, args: argparse.Namespace, leave: bool = True) -> list[Image.Image]:
    """--num-images images of `prompt` from a generator seeded with `seed`, with step progress bars."""
    import torch  # here, not at the top: --help and most usage errors need no torch

    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    bars = StepBars(leave)
    try:
        return pipe(prompt, num_images_per_prompt=args.num_images, generator=generator, callback=bars,
                    **sampling_options(args)).images
    finally:
        bars.close()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sample.py", description="Sample images from a MARS bundle (or caption one)")
    parser.add_argument("prompt", nargs="?", help="what to draw, English or Chinese")
    parser.add_argument("-o", "--output", type=Path, default=None, help="PNG to write for a prompt (default out.png)")
    parser.add_argument("--num-images", type=sampler_flag(int, "num_images_per_prompt"), default=1,
                        help="images per prompt; more than one writes a grid to -o plus OUT-0.png ...")
    parser.add_argument("--prompts", type=Path, help="text file, one prompt a line (needs --outdir)")
    parser.add_argument("--outdir", type=Path, help="folder for --prompts: 000000.png ... and prompts.jsonl")
    parser.add_argument("--caption", type=Path, metavar="IMAGE", help="print a caption of IMAGE instead (greedy: the sampler flags apply to images only)")
    add_sampling_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = [name for name, given in (("a prompt", args.prompt is not None), ("--prompts", args.prompts),
                                      ("--caption", args.caption)) if given]
    if len(modes) != 1:
        parser.error(f"give exactly one of a prompt, --prompts FILE or --caption IMAGE (got {len(modes)})")
    if (args.prompts is None) != (args.outdir is None):
        parser.error("--prompts FILE and --outdir DIR go together")
    if args.output is not None and args.prompt is None:
        parser.error("-o goes with a prompt: --prompts writes into --outdir, and --caption prints the caption")
    args.output = args.output or Path("out.png")
    try:  # the outputs, before anything is read or loaded
        inputs = (args.prompts, args.caption)
        if args.prompts:
            check_image_folder(args.outdir, "--outdir", inputs=inputs)
        elif args.prompt is not None:
            check_output_file(args.output, "-o", inputs)  # first: the single files are named after it
            for path in grid_files(args.output, args.num_images)[1:]:
                check_output_file(path, "-o", inputs)
    except ValueError as error:
        parser.error(str(error))
    return run(args)


@one_line_errors
def run(args: argparse.Namespace) -> int:
    if args.caption:
        image = load_image(args.caption)  # caption() flattens transparency onto white
        check_caption_image(image, str(args.caption))
        print(load_pipeline(args.checkpoint, args.device, args.dtype).caption(image))
        return 0
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    if args.prompts:
        check_seeds(args.seed, len(prompts))
    pipe = load_pipeline(args.checkpoint, args.device, args.dtype)
    check_prompts(pipe, prompts, super_resolution=not args.no_sr)
    if args.prompts:
        seeds = [args.seed + k for k in range(len(prompts))]
        records = [{"prompt": p, "seed": s} for p, s in zip(prompts, seeds) for _ in range(args.num_images)]
        with tqdm(list(zip(prompts, seeds)), desc="prompts", unit="prompt") as jobs:  # closed before any message
            images = (image for prompt, seed in jobs for image in sample(pipe, prompt, seed, args, leave=False))
            write_image_folder(args.outdir, images, records)  # written as they come
        print(f"wrote {len(records)} images and prompts.jsonl to {args.outdir}")
        return 0
    images = sample(pipe, prompts[0], args.seed, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    paths = grid_files(args.output, len(images))
    for path, image in zip(paths, [image_grid(images)] + images):
        save_image(image, path)
    print(f"wrote {args.output}" + (f" and {len(images)} single images beside it" if len(images) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
