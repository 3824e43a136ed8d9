"""The GPU check: MARS at Qwen2.5-0.5B size on one GPU, in under 8 minutes on an H100.

    python -m benchmarks.gpu_check                       # a CUDA GPU: the figures for docs/benchmarks.md
    python -m benchmarks.gpu_check --device cpu --tiny   # the same code on the CPU at one layer (the test)

It writes (once) the random full-size checkpoint of benchmarks/scale.py and prints:

    stage-1 bf16    training tokens/s and MFU (train.plan's model FLOPs / time / the card's peak),
                    frozen Qwen in bf16, experts fp32 under bf16 autocast, without and with
                    activation checkpointing; peak memory against train.plan's estimate
    sampler         codes/s at batch 1 and 16 (classifier-free guidance: 2 and 32 rows a step) in
                    bf16, against the memory-bandwidth bound: the weights an image step reads
                    (experts, image head) plus its KV cache, over the card's bandwidth
    FSDP            the stage-1 step with every SemVIE layer sharded by fully_shard (train.modules'
                    shard_layers) on a one-process mesh: its loss equal to the unsharded step's

The card (peak FLOP/s, bandwidth) is recognised from its name (H100, H200, A100, RTX 4090) or given
with --card. Every timing is the mean of --steps steps after --warmup untimed ones (2).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.scale import (CODEBOOK, adamw, caption_ids, current_rss, peak_rss, qwen_directory, release_memory,
                              reset_peak_rss, stage1_batch, tight_heap, to_device, train_step)
from mars.config import MemoryConfig
from mars.device import resolve_device
from mars.model import MarsModel, configure_memory, trainable_parameters
from mars.sampling import generate_images
from train.plan import CARDS, GIB, Plan, RunSpec, architecture


def detect_card(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key, needle in (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("rtx4090", "4090")):
        if needle in name:
            return key
    return "h100"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        release_memory()
        reset_peak_rss()


def measured_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()


def timed_steps(step, steps: int, device: torch.device, warmup: int = 2) -> float:
    """Mean seconds of `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def training(directory: Path, args, device: torch.device, card: str) -> None:
    for checkpointing in (False, True):
        release_memory()
        print(training_line(directory, args, device, card, checkpointing), flush=True)
    release_memory()


def training_line(directory: Path, args, device: torch.device, card: str, checkpointing: bool) -> str:
    """Time --steps stage-1 steps (frozen Qwen bf16, experts fp32 under bf16 autocast) -> the report line."""
    grid = (args.grid, args.grid)
    ids = caption_ids(_tokenizer(directory), args.batch)
    model = MarsModel.from_qwen(directory, codebook_size=CODEBOOK, image_grid=grid, dtype=torch.bfloat16)
    configure_memory(model, MemoryConfig(frozen_dtype="bfloat16", activation_checkpointing=checkpointing))
    model.to(device).train()
    optimizer = adamw(trainable_parameters(model))
    batch = to_device(stage1_batch(model, ids, torch.Generator().manual_seed(0), 0), device)
    tokens = int(batch["attention_mask"].sum())
    reset_peak(device)
    seconds = timed_steps(lambda: train_step(model, batch, optimizer), args.steps, device, args.warmup)
    peak = measured_peak(device)
    spec = RunSpec(batch=args.batch, grid=args.grid, codebook=CODEBOOK, card=card, frozen_dtype="bfloat16",
                   activation_checkpointing=checkpointing, i2t_ratio=0.5, tokens_per_row=tokens / args.batch,
                   runtime_bytes=args.runtime_bytes)
    plan = Plan(architecture(_config(directory)), spec)
    model_flops, _ = plan.step_flops()
    peak_flops = CARDS[card].peak_flops
    mfu = f"MFU {model_flops / seconds / peak_flops:.1%} of {peak_flops / 1e12:,.0f} TFLOP/s" if peak_flops \
        else f"MFU n/a on the CPU ({model_flops / seconds / 1e12:.3f} TFLOP/s model FLOPs)"
    return (f"stage-1 bf16{' + activation checkpointing' if checkpointing else ''}: batch {args.batch} x "
            f"{tokens // args.batch} positions, {seconds:.3f} s a step, {tokens / seconds:,.0f} tokens/s, {mfu}; "
            f"peak memory {peak / GIB:.2f} GiB, planner {plan.peak_bytes / GIB:.2f} GiB "
            f"({(plan.peak_bytes - peak) / peak:+.1%})")


def sampling(directory: Path, args, device: torch.device, card: str) -> None:
    # Inference as a user samples on a GPU: every weight in bf16 (MarsModel.from_pretrained(dtype=...)).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = MarsModel.from_qwen(directory, codebook_size=CODEBOOK, image_grid=(args.grid, args.grid), dtype=dtype)
    model.to(device).eval()
    ids = caption_ids(_tokenizer(directory), 16)
    # An image step reads the image path's weights (experts, the image head) and the KV cache so far.
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if n.startswith("model.layers") and ".visual_" in n or n.startswith("image_head"))
    a = architecture(_config(directory))
    steps = model.config.num_image_tokens
    for batch in (1, 16):
        prompts = ids[:batch]

        def sample(prompts=prompts) -> None:
            generate_images(model, prompts, guidance_scale=3.0, generator=torch.Generator(device).manual_seed(0))

        seconds = timed_steps(sample, max(1, args.steps // 5), device, args.warmup)
        rows = 2 * batch  # conditional + unconditional
        context = len(prompts[0]) + 1 + steps / 2  # mean prefix + codes so far
        cache_bytes = a.layers * 2 * a.kv_dim * context * rows * torch.tensor([], dtype=dtype).element_size()
        bandwidth = CARDS[card].bandwidth
        line = (f"sampler batch {batch} (CFG: {rows} rows a step): {batch * steps / seconds:,.1f} codes/s, "
                f"{seconds / steps * 1e3:.2f} ms a step; bandwidth bound ")
        if bandwidth:
            bound = (weight_bytes + cache_bytes) / bandwidth
            line += (f"{bound * 1e3:.3f} ms a step ({(weight_bytes + cache_bytes) / 1e9:.2f} GB at "
                     f"{bandwidth / 1e12:.2f} TB/s): {bound / (seconds / steps):.0%} of it")
        else:
            line += f"n/a on the CPU ({(weight_bytes + cache_bytes) / 1e9:.2f} GB read a step)"
        print(line, flush=True)


def fsdp(directory: Path, args, device: torch.device) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from train.modules import shard_layers

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        grid = (args.grid, args.grid)
        ids = caption_ids(_tokenizer(directory), args.batch)
        losses = []
        for sharded in (False, True):
            torch.manual_seed(0)
            model = MarsModel.from_qwen(directory, codebook_size=CODEBOOK, image_grid=grid, dtype=torch.bfloat16)
            configure_memory(model, MemoryConfig(frozen_dtype="bfloat16", activation_checkpointing=True))
            model.to(device).train()
            if sharded:
                shard_layers(model, model.model.layers, init_device_mesh(device.type, (1,)))
            optimizer = adamw(trainable_parameters(model))
            batch = to_device(stage1_batch(model, ids, torch.Generator().manual_seed(0), 0), device)
            losses.append([train_step(model, batch, optimizer) for _ in range(2)])
            del model, optimizer
            release_memory()
        # FSDP's bf16 all-gather (MixedPrecisionPolicy) also rounds the root's fp32 image parameters,
        # which plain autocast leaves fp32 in embedding lookups: equal to bf16 rounding, not bitwise.
        difference = max(abs(a - b) / abs(a) for a, b in zip(*losses))
        same = difference <= 1e-3
        print(f"FSDP (fully_shard per SemVIE layer, bf16 gathers, 1 process): losses "
              f"{', '.join(f'{x:.5f}' for x in losses[1])} vs unsharded {', '.join(f'{x:.5f}' for x in losses[0])}: "
              f"{'equal' if same else 'DIFFERENT'} (relative difference {difference:.1e})", flush=True)
        if not same:
            raise AssertionError("the sharded step differs from the unsharded one")
    finally:
        dist.destroy_process_group()


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _config(directory: Path) -> dict:
    import json

    return json.loads((directory / "config.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true", help="one decoder layer, 4x4 codes, batch 2: a CPU rehearsal")
    parser.add_argument("--qwen", default="qwen2.5-0.5b")
    parser.add_argument("--card", choices=sorted(CARDS), default=None, help="default: recognised from the GPU")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each timing")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.grid, args.steps, args.warmup = 2, 4, 1, 1
    device = resolve_device(args.device, "--device")
    card = args.card or detect_card(device)
    if device.type == "cpu":
        tight_heap()  # resident memory tracks the live tensors (benchmarks/scale.py)
    started = time.perf_counter()
    directory = qwen_directory(args.qwen, 1 if args.tiny else None, args.cache)
    release_memory()
    args.runtime_bytes = current_rss() if device.type == "cpu" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPU check on {name} ({CARDS[card].name}), torch {torch.__version__}, checkpoint {directory}", flush=True)
    training(directory, args, device, card)
    sampling(directory, args, device, card)
    fsdp(directory, args, device)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
