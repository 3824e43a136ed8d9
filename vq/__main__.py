"""VQ tokenizer command line.

    python -m vq reconstruct --checkpoint checkpoints/mars-shapes/vq --images IN --out OUT
    python -m vq export --ckpt runs/shapes/vq/checkpoints/last.ckpt --out runs/shapes/vq/export

`reconstruct` writes the tokenizer's round trip of every image in IN under the same names (and
copies IN/captions.jsonl) so `python -m mars.eval --images OUT` can score it, and prints the PSNR.
`export` turns a Lightning checkpoint of train/vq.py into a save_pretrained directory. The
tokenizer's shapes-world figures (scorer verdict agreement, PSNR, codebook usage) come from
`python -m mars.eval --vq DIR`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vq.model import VQConfig, VQTokenizer
from vq.reconstruct import reconstruct_folder


def export_checkpoint(ckpt: Path, out: Path, dtype: torch.dtype | None = None) -> VQTokenizer:
    """A train/vq.py Lightning checkpoint -> save_pretrained directory (works on any interim last.ckpt)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found: pass --ckpt PATH/last.ckpt written by "
                                "`python -m train fit --config train/configs/shapes_vq.yaml`")
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{ckpt} is not a readable checkpoint ({type(error).__name__}): "
                         "use a last.ckpt / step checkpoint from the VQ training run") from None
    if "vq_config" not in checkpoint:
        raise ValueError(f"{ckpt} has no 'vq_config': it was not written by train/vq.py's VQLitModule")
    prefix = "tokenizer."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    tokenizer = VQTokenizer(VQConfig(**checkpoint["vq_config"]))
    tokenizer.load_state_dict(state)
    tokenizer.save_pretrained(out, dtype)
    return tokenizer


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (no usage dump), exit code 2. mars.cli has the same for the MARS commands;
    the vq package stands alone, below mars, so it keeps its own."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def check_out_folder(out: Path, images: Path | None = None) -> None:
    """ValueError unless `out` can be a folder of results: not a file, and not the input folder (whose images
    a round trip would overwrite with their reconstructions)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder")
    if images is not None and out.resolve() == images.resolve():
        raise ValueError(f"--out {out} is the --images folder: its images would be overwritten; choose another folder")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m vq", description="VQ tokenizer tools")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("reconstruct", help="round-trip a folder of images through the tokenizer")
    rec.add_argument("--checkpoint", type=Path, required=True, help="save_pretrained directory")
    rec.add_argument("--images", type=Path, required=True, help="input folder (captions.jsonl is copied)")
    rec.add_argument("--out", type=Path, required=True, help="output folder")
    rec.add_argument("--batch-size", type=positive_int, default=16)
    rec.add_argument("--size", type=positive_int, help="bring each image to this square size first, as code "
                     "extraction does (default: each image at its own size)")
    ex = commands.add_parser("export", help="Lightning checkpoint -> save_pretrained directory")
    ex.add_argument("--ckpt", type=Path, required=True)
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage precision")
    args = parser.parse_args(argv)
    try:
        check_out_folder(args.out, args.images if args.command == "reconstruct" else None)
    except ValueError as error:
        parser.error(str(error))
    try:
        if args.command == "export":
            tokenizer = export_checkpoint(args.ckpt, args.out, getattr(torch, args.dtype))
            print(f"exported {args.ckpt} -> {args.out} (f={tokenizer.downsample}, {tokenizer.codebook_size} codes)")
            return
        tokenizer = VQTokenizer.from_pretrained(args.checkpoint)
        result = reconstruct_folder(tokenizer, args.images, args.out, args.batch_size, args.size)
        print(f"wrote {result['files']} reconstructions to {args.out} (PSNR {result['psnr']:.2f} dB)")
    except (ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
