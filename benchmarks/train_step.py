"""Seconds per training step of the base stage (or super-resolution) in fp32 and in bf16 autocast, eager and
compiled, on this machine.

One stage-2 step (batch 64, a 10-token prompt, AdamW over the trainable weights) of a shipped
architecture (benchmarks.superres.bench_config: `--model shipped`, the shapes model, 8 x 8 codes;
`--model emoji`, 8 x 8 codes of 1,024), random weights, timed in fp32 and under
torch.autocast(bfloat16), which is what Lightning's bf16-mixed runs; with `--compile`, also through
torch.compile (dynamic shapes, as MarsLitModule(compile=True) trains). `--stage superres` times a
super-resolution step instead (that grid -> twice it, k = 4, as train.superres trains). The variants are timed in turn,
`--repeats` rounds, best of each. On a CPU without native bf16 (AVX2: no AVX-512/AMX) PyTorch emulates
bf16 on one core, which is why `python -m train` trains bf16 configs in 32-true there (train/__main__.py).

    python -m benchmarks.train_step                            # about a minute on 2 cores
    python -m benchmarks.train_step --model emoji --compile    # a few minutes: compiling takes one
    python -m benchmarks.train_step --model emoji --stage superres --batch-size 32 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchmarks.superres import bench_config
from mars import MarsModel, build_qwen
from mars.model import build_batch, trainable_parameters
from mars.superres import SuperResConfig, SuperResModel, build_superres_batch
from train.__main__ import cpu_has_bf16


def step_seconds(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, bf16: bool, steps: int) -> float:
    """Mean seconds of `steps` forward + backward + optimizer steps."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("shipped", "emoji"), default="shipped",
                        help="architecture: the shapes model or the emoji one (both 8 x 8 codes)")
    parser.add_argument("--stage", choices=("base", "superres"), default="base",
                        help="a base-stage step, or a super-resolution step from that grid to twice it (k = 4)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also time each precision through torch.compile")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=2, help="timings per variant; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if min(args.batch_size, args.steps, args.repeats) < 1:
        parser.error("--batch-size, --steps and --repeats must be 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = bench_config(args.model)
    model = MarsModel.from_qwen(build_qwen(config.text_config), config).train()
    prompts = torch.randint(2, config.text_config["vocab_size"], (args.batch_size, 10)).tolist()
    codes = torch.randint(0, config.codebook_size, (args.batch_size, *config.image_grid))
    if args.stage == "base":
        batch = build_batch(model, prompts, codes)
    else:
        model = SuperResModel(SuperResConfig(low_grid=config.image_grid, group_size=4), model).train()
        high = torch.randint(0, config.codebook_size, (args.batch_size, *model.config.high_grid))
        batch = build_superres_batch(model, prompts, codes, high)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_bf16()}, "
          f"torch threads {torch.get_num_threads()}, {args.model} model, {args.stage} stage, {config.image_grid} codes, "
          f"batch {args.batch_size}")
    forwards = {"eager": model} | ({"compiled": torch.compile(model, dynamic=True)} if args.compile else {})
    variants = [(mode, bf16) for mode in forwards for bf16 in (False, True)]
    for mode, bf16 in variants:  # warm-up, and compiling
        step_seconds(forwards[mode], batch, optimizer, bf16, 1)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):
        for mode, bf16 in variants:
            best[mode, bf16] = min(best[mode, bf16], step_seconds(forwards[mode], batch, optimizer, bf16, args.steps))
    for mode, bf16 in variants:
        label = f"{'bf16 autocast' if bf16 else 'fp32'}, {mode}:"
        print(f"{label:<26}{best[mode, bf16]:.3f} s a step ({best[mode, bf16] / best['eager', False]:.2f}x eager fp32)")


if __name__ == "__main__":
    main()
