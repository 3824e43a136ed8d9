"""Command-line plumbing shared by sample.py, `python -m mars.eval` and the other entry points: one-line
usage errors, one-line run errors, the model and sampler flags, loading a bundle, checking and writing
outputs.

    parser = OneLineParser(prog="sample.py")
    add_sampling_arguments(parser)
    args = parser.parse_args()
    check_output_file(args.output, "-o")                    # before the model loads
    pipe = load_pipeline(args.checkpoint, args.device, args.dtype)
    images = pipe(prompts, **sampling_options(args)).images

    @one_line_errors          # OSError/ValueError -> "error: ..." and exit code 2; Ctrl-C -> exit code 130
    def run(args) -> int: ...

The range checks are MarsPipeline's own (SAMPLER_LIMITS), the prompt checks its encode_prompts.
Bad input never costs data: an output that would overwrite an input, or a folder holding files
another tool wrote, is refused before anything is written.
Tests: `pytest tests/test_sample.py tests/test_eval.py tests/test_bad_input.py`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from mars.device import resolve_device
from mars.images import save_image

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mars-shapes"
DTYPES = ("float32", "bfloat16", "float16")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (no usage dump) and exit with code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bounded(kind, limit):
    """An argparse type: a `kind` (int or float) that limit() = (accepts, wanted) accepts, else a usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        accepts, wanted = limit()
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {wanted}")
        return value
    return parse


def sampler_flag(kind, setting: str):
    """The argparse type of a MarsPipeline sampler setting, checked by the pipeline's own SAMPLER_LIMITS
    (imported only when such a flag is given, so `--images` runs never load torch)."""
    def limit():
        from mars.pipeline import SAMPLER_LIMITS

        return SAMPLER_LIMITS[setting]
    return _bounded(kind, limit)


def int_range(low: int, high: int | None = None, wanted: str | None = None):
    """The argparse type of an integer from `low` to `high` (None: no upper bound), else a usage error."""
    wanted = wanted or (f"an integer >= {low}" if high is None else f"an integer from {low} to {high}")
    return _bounded(int, lambda: (lambda v: v >= low and (high is None or v <= high), wanted))


POSITIVE_INT = int_range(1)
NON_NEGATIVE_INT = int_range(0)
# torch.Generator.manual_seed takes 0 .. 2**64 - 1; past it the error comes late ("Overflow when
# unpacking long long"), after the model has loaded or half of a --prompts file has been sampled.
MAX_SEED = 2**64 - 1
SEED = int_range(0, MAX_SEED, f"an integer from 0 to 2**64 - 1 ({MAX_SEED})")


def add_sampling_arguments(parser: argparse.ArgumentParser, batch_size: bool = False) -> None:
    """The model and sampler flags of sample.py and `mars.eval --generate`."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"MARS bundle directory (default {DEFAULT_CHECKPOINT.parent.name}/{DEFAULT_CHECKPOINT.name})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="Qwen and experts dtype (default float32)")
    parser.add_argument("--seed", type=SEED, default=0, help="random seed, 0 to 2**64 - 1 (default 0)")
    # None: the bundle's setting (model_index.json "sampling", the values the model was tuned with).
    parser.add_argument("--cfg", type=sampler_flag(float, "guidance_scale"), default=None,
                        help="classifier-free guidance scale, >= 1; 1 turns guidance off (default: the model's)")
    parser.add_argument("--temperature", type=sampler_flag(float, "temperature"), default=None,
                        help="0 is greedy (default: the model's)")
    parser.add_argument("--top-k", type=sampler_flag(int, "top_k"), default=None,
                        help="keep the k likeliest codes; 0 keeps all (default: the model's)")
    parser.add_argument("--top-p", type=sampler_flag(float, "top_p"), default=None,
                        help="nucleus sampling mass in (0, 1] (default: the model's)")
    parser.add_argument("--candidates", type=sampler_flag(int, "candidates"), default=None,
                        help="base images sampled per image kept: the one whose prompt the model's own "
                             "image-to-text finds likeliest (default: the model's)")
    parser.add_argument("--sr-cfg", type=sampler_flag(float, "sr_guidance_scale"), default=None,
                        help="guidance scale of super-resolution (default: the model's)")
    parser.add_argument("--sr-temperature", type=sampler_flag(float, "sr_temperature"), default=None,
                        help="temperature of super-resolution; 0 is greedy (default: the model's)")
    parser.add_argument("--no-sr", action="store_true", help="skip super-resolution: base images only (128 px)")
    if batch_size:
        parser.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="prompts per sampling call")


def sampling_options(args: argparse.Namespace) -> dict:
    """MarsPipeline.__call__ keyword arguments from add_sampling_arguments' flags."""
    return dict(guidance_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                candidates=args.candidates, sr_guidance_scale=args.sr_cfg, sr_temperature=args.sr_temperature,
                super_resolution=not args.no_sr)


def load_pipeline(checkpoint: Path | None, device: str | None = None, dtype: str | None = None):
    """MarsPipeline from a bundle directory (None: the shipped default), errors as one-line OSError/ValueError."""
    import torch
    from transformers.utils import logging as hf_logging

    from mars.pipeline import INDEX_FILE, MarsPipeline

    torch_device = resolve_device(device, "--device")  # before the slow load
    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not (checkpoint / INDEX_FILE).is_file():
            raise FileNotFoundError(f"the default model {checkpoint} is missing: train one with "
                                    "`python -m train.pipeline --preset shapes` (it writes runs/shapes/bundle) "
                                    "and pass --checkpoint runs/shapes/bundle, or copy it to that folder")
    hf_logging.disable_progress_bar()  # our own bars report progress; the weight-loading bar is noise
    return MarsPipeline.from_pretrained(checkpoint, device=torch_device,
                                        dtype=getattr(torch, dtype) if dtype else None)


def check_prompts(pipe, prompts: list[str], super_resolution: bool = True) -> None:
    """All prompts checked before any is sampled: MarsPipeline.encode_prompts, strict (tokens the model
    never saw are an error here, not a silent unknown token). One-line ValueError."""
    pipe.encode_prompts(prompts, super_resolution, strict=True)


# ----------------------------------------------------------------------------- errors and interrupts

class Interrupted(KeyboardInterrupt):
    """Ctrl-C while an image folder was being written: how far it got (the listing names what is on disk)."""

    def __init__(self, written: int, total: int):
        super().__init__(f"interrupted after {written} of {total} images; the listing names the {written} written")
        self.written, self.total = written, total


def one_line_errors(run: Callable[..., int]) -> Callable[..., int]:
    """A command's body -> the same, with bad input (OSError, ValueError) reported as one line "error: ..."
    on stderr and exit code 2, and Ctrl-C as one line and exit code 130 (the shell's code for SIGINT)."""
    @functools.wraps(run)
    def guarded(*args, **kwargs) -> int:
        try:
            return run(*args, **kwargs)
        except Interrupted as stop:
            print(stop, file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            print("interrupted: nothing was written", file=sys.stderr)
            return 130
        except (OSError, ValueError) as error:
            print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
            return 2
    return guarded


# ----------------------------------------------------------------------------- outputs

def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def check_writable_folder(folder: Path, flag: str, given: Path | None = None) -> None:
    """ValueError unless `folder` exists as a folder, or can be made: its nearest existing ancestor is a
    folder this process may write in. Checked before the model loads; nothing is created. The message
    names `given` (what the flag named, default `folder`)."""
    given = folder if given is None else given
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {given}: {existing} is a file, not a folder; choose another place")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {given}: cannot write in {existing}; choose a place you can write to")


def check_output_file(path: Path, flag: str, inputs: Iterable[Path | None] = ()) -> None:
    """ValueError unless `path` is an image file this command may (over)write: an image name, not an input
    of the run, not a folder, and not an existing file that is something other than an image."""
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"{flag} {path}: name an image file, e.g. out.png")
    for source in inputs:
        if source is not None and _same_file(path, source):
            raise ValueError(f"{flag} {path} is also the input {source}: choose another name; inputs are never "
                             "overwritten")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: name an image file, e.g. {path / 'out.png'}")
    if path.exists():
        try:
            with Image.open(path):  # the header only: an image is an earlier output, anything else is data
                pass
        except Exception:  # any failure to read a header means "not an image"
            raise ValueError(f"{flag} {path} exists and is not an image: choose another name (it is left as it "
                             "is)") from None
    check_writable_folder(path.parent, flag, path)


def check_image_folder(folder: Path, flag: str, listing: str = "prompts.jsonl",
                       inputs: Iterable[Path | None] = ()) -> None:
    """ValueError unless write_image_folder may write numbered images and `listing` into `folder`: a new or
    empty folder, or one with `listing` in it (an earlier run of the same kind, replaced); never one that
    would overwrite an input of the run or files some other tool wrote."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file: name a folder (new, or written by an earlier run)")
    for source in inputs:
        if source is None or not source.exists():
            continue
        real = source.resolve()
        overwritten = real == (folder / listing).resolve() or (real.parent == folder.resolve()
                                                               and IMAGE_NAME.fullmatch(real.name))
        if overwritten:
            raise ValueError(f"{flag} {folder} holds the input {source}, which this run would overwrite: "
                             "choose another folder")
    if folder.is_dir() and not (folder / listing).is_file() and any(folder.iterdir()):
        raise ValueError(f"{flag} {folder} already holds files and no {listing}: choose a new or empty folder, "
                         "so nothing in it is overwritten")
    check_writable_folder(folder, flag)


IMAGE_NAME = re.compile(r"\d{6}\.png")  # what write_image_folder names its images


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def write_image_folder(folder: Path, images: Iterable[Image.Image], records: list[dict],
                       listing: str = "prompts.jsonl") -> list[Image.Image]:
    """folder/000000.png ... and folder/`listing` ({"file", **record} a line): what --images reads.
    Lazy `images` are written one by one as they come, each listing line right after its image and
    flushed, so the listing always names exactly the images on disk; Ctrl-C raises Interrupted, which
    says how many. Returns the images."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = []
    with open(folder / listing, "w", encoding="utf-8") as lines:
        try:
            for index, (image, record) in enumerate(zip(images, records, strict=True)):
                name = image_name(index)
                save_image(image, folder / name)
                lines.write(json.dumps({"file": name, **record}, ensure_ascii=False) + "\n")
                lines.flush()
                kept.append(image)
        except KeyboardInterrupt:
            raise Interrupted(len(kept), len(records)) from None
    return kept
