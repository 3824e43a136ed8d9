"""Command-line plumbing shared by sample.py and `python -m mars.eval`: one-line usage errors, the
model and sampler flags, loading a bundle, writing an image folder.

    parser = OneLineParser(prog="sample.py")
    add_sampling_arguments(parser)
    args = parser.parse_args()
    pipe = load_pipeline(args.checkpoint, args.device, args.dtype)
    images = pipe(prompts, **sampling_options(args)).images

The range checks are MarsPipeline's own (SAMPLER_LIMITS), the prompt checks its encode_prompts.
Tests: `pytest tests/test_sample.py tests/test_eval.py`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from mars.device import resolve_device

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


POSITIVE_INT = _bounded(int, lambda: (lambda v: v >= 1, "an integer >= 1"))
NON_NEGATIVE_INT = _bounded(int, lambda: (lambda v: v >= 0, "an integer >= 0"))


def add_sampling_arguments(parser: argparse.ArgumentParser, batch_size: bool = False) -> None:
    """The model and sampler flags of sample.py and `mars.eval --generate`."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"MARS bundle directory (default {DEFAULT_CHECKPOINT.parent.name}/{DEFAULT_CHECKPOINT.name})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="Qwen and experts dtype (default float32)")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="random seed, >= 0 (default 0)")
    # None: the bundle's setting (model_index.json "sampling", the values the model was tuned with).
    parser.add_argument("--cfg", type=sampler_flag(float, "guidance_scale"), default=None,
                        help="classifier-free guidance scale; 1 turns guidance off (default: the model's)")
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


def write_image_folder(folder: Path, images: Iterable[Image.Image], records: Iterable[dict]) -> None:
    """folder/000000.png ... and folder/prompts.jsonl ({"file", **record} a line): what --images reads.
    Lazy `images` are written one by one as they come."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prompts.jsonl", "w", encoding="utf-8") as listing:
        for index, (image, record) in enumerate(zip(images, records, strict=True)):
            name = f"{index:06d}.png"
            image.save(folder / name)
            listing.write(json.dumps({"file": name, **record}, ensure_ascii=False) + "\n")
