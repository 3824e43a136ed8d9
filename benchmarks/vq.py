"""Encode and decode throughput (images/s) of the VQ tokenizer on CPU at 256 px, in one run.

    python -m benchmarks.vq                                    # shipped checkpoint, else the preset
    python -m benchmarks.vq --checkpoint checkpoints/mars-shapes/vq --batch 16 --repeats 5

Speed does not depend on the weights, so without a checkpoint the `shapes-f16` preset (the
shipped architecture) is timed with random weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


import torch

from vq import VQConfig, VQTokenizer


def best_rate(fn, batch: int, repeats: int) -> float:
    """Images per second of the fastest of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return batch / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/mars-shapes/vq"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    if (args.checkpoint / "config.json").is_file():
        tokenizer, source = VQTokenizer.from_pretrained(args.checkpoint), str(args.checkpoint)
    else:
        tokenizer, source = VQTokenizer(VQConfig.from_name("shapes-f16")).eval(), "shapes-f16 preset (random weights)"
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = tokenizer.encode(images)
    encode = best_rate(lambda: tokenizer.encode(images), args.batch, args.repeats)
    decode = best_rate(lambda: tokenizer.decode(codes), args.batch, args.repeats)
    params = sum(p.numel() for p in tokenizer.parameters()) / 1e6
    print(f"tokenizer: {source}, {params:.2f} M parameters, f={tokenizer.downsample}, "
          f"{tokenizer.codebook_size} codes; torch threads: {torch.get_num_threads()}")
    print(f"{args.size} px, batch {args.batch}: {tuple(codes.shape[1:])} codes per image")
    print(f"encode: {encode:8.1f} images/s")
    print(f"decode: {decode:8.1f} images/s")
    print(f"decode / encode time ratio: {encode / decode:.2f}")


if __name__ == "__main__":
    main()
