"""Round trips through a VQ tokenizer: a folder of images reconstructed, PSNR on 8-bit pixels, codebook use.

    from vq import VQTokenizer
    from vq.reconstruct import reconstruct_folder, codebook_stats
    result = reconstruct_folder(VQTokenizer.from_pretrained("checkpoints/mars-shapes/vq"), "in/", "out/")
    print(result["psnr"], codebook_stats(torch.bincount(result["codes"], minlength=256)))

`python -m vq reconstruct` is the command line; `python -m mars.eval --vq DIR` scores shapes-world
round trips with it. Tests: `pytest tests/test_vq.py`.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from mars.images import fit_square, load_image
from vq.model import VQTokenizer, images_to_tensor, tensor_to_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found: pass --images DIR with .png/.jpg files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def reconstruct_folder(tokenizer: VQTokenizer, images: Path, out: Path, batch_size: int = 16,
                       size: int | None = None, progress: bool = True) -> dict:
    """Round-trips every image in `images` into `out` (same names, captions.jsonl copied); with `size`, each
    image is first brought to size x size (shorter side, centre crop, bicubic: what code extraction does).

    Returns {"files", "psnr", "codes"}: mean PSNR (dB) against the (resized) inputs and the flat LongTensor
    of all codes used."""
    files = image_files(Path(images))
    if size is not None and size % tokenizer.downsample:
        raise ValueError(f"size {size} is not a multiple of the tokenizer's downsampling f = {tokenizer.downsample}")
    out = Path(out)
    by_size = defaultdict(list)  # one batch holds one size
    for path in files:  # every header read before anything is written
        own = load_image(path, decode=False).size
        by_size[(size, size) if size else own].append(path)
    out.mkdir(parents=True, exist_ok=True)
    psnrs, codes = [], []
    with tqdm(total=len(files), desc="reconstruct", unit="img", disable=not progress) as bar:
        for paths in by_size.values():
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                loaded = [load_image(p) for p in chunk]
                if size is not None:
                    loaded = [fit_square(im, size) for im in loaded]
                originals = images_to_tensor(loaded)
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


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Share of the codebook used and perplexity (exp entropy) of a code histogram."""
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return {"codebook_usage": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item()}
