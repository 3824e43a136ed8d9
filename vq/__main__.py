"""VQ tokenizer command line and evaluation helpers.

    python -m vq reconstruct --checkpoint checkpoints/vq-shapes --images IN --out OUT
    python -m vq evaluate --checkpoint checkpoints/vq-shapes --n 200 --size 256
    python -m vq export --ckpt runs/vq_shapes/checkpoints/last.ckpt --out checkpoints/vq-shapes

`reconstruct` writes the tokenizer's round trip of every image in IN under the same names (and
copies IN/captions.jsonl) so `python -m mars.eval --images OUT` can score it. `evaluate` renders
fresh shapes-world images and reports scorer verdict agreement (original vs reconstruction),
PSNR and codebook usage: the tokenizer's published figures come from it. `export` turns a
Lightning checkpoint of train/vq.py into a save_pretrained directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vq.model import VQConfig, VQTokenizer, images_to_tensor, tensor_to_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def verdicts_agree(captions: list[str], originals: torch.Tensor, reconstructions: torch.Tensor) -> list[bool]:
    """Per image: does the shapes scorer give the reconstruction the same plain verdict as the original?"""
    from mars.shapes import score  # the scorer is only needed here

    return [score(caption, original).passed == score(caption, rebuilt).passed
            for caption, original, rebuilt in zip(captions, tensor_to_images(originals),
                                                  tensor_to_images(reconstructions))]


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found: pass --images DIR with .png/.jpg files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def reconstruct_folder(tokenizer: VQTokenizer, images: Path, out: Path, batch_size: int = 16) -> dict:
    """Round-trips every image in `images` into `out` (same names, captions.jsonl copied).

    Returns {"files", "psnr", "codes"}: mean PSNR (dB) and the flat LongTensor of all codes used."""
    files = image_files(Path(images))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_size = defaultdict(list)  # one batch holds one size
    for path in files:
        with Image.open(path) as image:
            by_size[image.size].append(path)
    psnrs, codes = [], []
    with tqdm(total=len(files), desc="reconstruct", unit="img") as bar:
        for paths in by_size.values():
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                originals = images_to_tensor([Image.open(p) for p in chunk])
                batch_codes = tokenizer.encode(originals)
                rebuilt = tokenizer.decode(batch_codes).cpu()
                for path, image in zip(chunk, tensor_to_images(rebuilt)):
                    image.save(out / path.name)
                mse = (tensor_from_pil(rebuilt) - originals).square().flatten(1).mean(1)
                psnrs += (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).tolist()
                codes.append(batch_codes.flatten().cpu())
                bar.update(len(chunk))
    captions = Path(images) / "captions.jsonl"
    if captions.is_file():
        shutil.copyfile(captions, out / "captions.jsonl")
    return {"files": len(files), "psnr": sum(psnrs) / len(psnrs), "codes": torch.cat(codes)}


def tensor_from_pil(images: torch.Tensor) -> torch.Tensor:
    """What a saved PNG holds: images quantised to 8 bits (PSNR is measured on those)."""
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def evaluate(tokenizer: VQTokenizer, n: int = 200, size: int = 256, seed: int = 1234,
             batch_size: int = 16) -> dict:
    """Verdict agreement, PSNR and codebook usage on n fresh shapes-world images of side `size`.

    Images come from mars.shapes' evaluation folder writer (categories in turn, English and Chinese)
    with a seed the training stream never uses."""
    from mars.shapes import score, write_eval_folder

    with tempfile.TemporaryDirectory() as tmp:
        originals_dir, rebuilt_dir = Path(tmp, "originals"), Path(tmp, "rebuilt")
        write_eval_folder(originals_dir, n, size, seed)
        result = reconstruct_folder(tokenizer, originals_dir, rebuilt_dir, batch_size)
        records = [json.loads(line) for line in (originals_dir / "captions.jsonl").read_text("utf-8").splitlines()]
        agree, strict_agree, passed = [], [], []
        for record in tqdm(records, desc="score", unit="img"):
            before = score(record["caption"], Image.open(originals_dir / record["file"]))
            after = score(record["caption"], Image.open(rebuilt_dir / record["file"]))
            agree.append(before.passed == after.passed)
            strict_agree.append(before.strict == after.strict)
            passed.append(before.passed)
    counts = torch.bincount(result["codes"], minlength=tokenizer.codebook_size).float()
    probs = counts / counts.sum()
    return {"n": n, "size": size, "seed": seed,
            "agreement": sum(agree) / n, "strict_agreement": sum(strict_agree) / n,
            "originals_passed": sum(passed) / n, "psnr": result["psnr"],
            "codebook_usage": (counts > 0).float().mean().item(),
            "perplexity": torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()).item(),
            "codebook_size": tokenizer.codebook_size}


def export_checkpoint(ckpt: Path, out: Path, dtype: torch.dtype | None = None) -> VQTokenizer:
    """A train/vq.py Lightning checkpoint -> save_pretrained directory (works on any interim last.ckpt)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found: pass --ckpt PATH/last.ckpt written by "
                                "`python -m train fit --config train/configs/vq_shapes.yaml`")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vq", description="VQ tokenizer tools")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("reconstruct", help="round-trip a folder of images through the tokenizer")
    rec.add_argument("--checkpoint", type=Path, required=True, help="save_pretrained directory")
    rec.add_argument("--images", type=Path, required=True, help="input folder (captions.jsonl is copied)")
    rec.add_argument("--out", type=Path, required=True, help="output folder")
    rec.add_argument("--batch-size", type=int, default=16)
    ev = commands.add_parser("evaluate", help="verdict agreement, PSNR, codebook usage on fresh shapes images")
    ev.add_argument("--checkpoint", type=Path, required=True, help="save_pretrained directory")
    ev.add_argument("--n", type=int, default=200)
    ev.add_argument("--size", type=int, default=256)
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--json", type=Path, help="also write the figures to this file")
    ex = commands.add_parser("export", help="Lightning checkpoint -> save_pretrained directory")
    ex.add_argument("--ckpt", type=Path, required=True)
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage precision")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            tokenizer = export_checkpoint(args.ckpt, args.out, getattr(torch, args.dtype))
            print(f"exported {args.ckpt} -> {args.out} (f={tokenizer.downsample}, {tokenizer.codebook_size} codes)")
            return
        tokenizer = VQTokenizer.from_pretrained(args.checkpoint)
        if args.command == "reconstruct":
            result = reconstruct_folder(tokenizer, args.images, args.out, args.batch_size)
            print(f"wrote {result['files']} reconstructions to {args.out} (PSNR {result['psnr']:.2f} dB)")
        else:
            figures = evaluate(tokenizer, args.n, args.size, args.seed, args.batch_size)
            print(json.dumps(figures, indent=2))
            if args.json:
                args.json.write_text(json.dumps(figures, indent=2) + "\n")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
