"""Real scale without a GPU: a full-size Qwen through every MARS stage, with each phase's seconds,
peak resident memory and tokens/s.

    python -m benchmarks.scale --qwen qwen2.5-0.5b               # the full-size run (2 CPU cores, 24 GiB)
    python -m benchmarks.scale --qwen qwen3-0.6b
    python -m benchmarks.scale --qwen /models/Qwen2.5-0.5B       # a local Qwen directory (HF format)
    python -m benchmarks.scale --qwen qwen2.5-0.5b --layers 2    # reduced depth, full width and vocabulary

A preset name writes a random checkpoint of that Qwen's published architecture once, in bf16 like
the released weights, with the Qwen tokenizer, into ~/.cache/mars/<name>-random (outside git);
to the loading code it is indistinguishable from a downloaded one. Then, as a user's run would:

    load      MarsModel.from_qwen(DIR, dtype=...) at 16 x 16 codes of a 16,384-code codebook
    stage1    one training step (AdamW) on text-to-image and image-to-text rows: the image head
              and the 151,936-way text head both run
    stage2    one step of text-to-image rows with caption dropout (the CFG unconditional)
    superres  one step of 16 x 16 -> 32 x 32 multi-token super-resolution over the trained experts
    save      the trainable-only checkpoint (SuperResModel.save_pretrained: the Qwen by path)
    reload    SuperResModel.from_pretrained of that directory for sampling (fp32 on a CPU: no training
              levers), checked equal to what was saved
    sample    one 16 x 16 image grid, KV cache and classifier-free guidance (2 rows a step)
    upsample  its 32 x 32 super-resolution, KV cache and guidance, 4 codes a step

tokens/s counts every real (non-padding) position a step processes, forward and backward, over
the whole step including the optimizer; for sampling it counts the codes produced (the guided
unconditional rows and the prompt prefill are work done for them, not extra tokens).
Peak memory is the process's peak resident set during the phase (Linux: VmHWM, reset between
phases), so the weights loaded earlier count in every phase, as they do in a real run; the
stage-1 peak is set against train.plan's estimate for the same run. glibc is told to map large
allocations on their own (tight_heap), so that resident memory tracks the live tensors;
--glibc-heap keeps its default heap, whose peaks run higher by the freed memory it keeps.

The memory levers (mars.config.MemoryConfig) are flags: --activation-checkpointing,
--frozen-dtype bfloat16, --loss-chunk N. On a 24 GiB machine the full-size run needs activation
checkpointing for the super-resolution step; see docs/benchmarks.md for the printout.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mars.config import MODEL_PRESETS, FROZEN_DTYPES, MemoryConfig
from mars.device import cpu_name
from mars.model import (MarsModel, build_batch, build_qwen, concat_batches, configure_memory, parameter_report,
                        trainable_parameters)
from mars.sampling import generate_images
from mars.superres import SuperResConfig, SuperResModel, build_superres_batch, upsample_codes

CODEBOOK, GRID = 16384, (16, 16)  # MARS's real-data setting (train/configs/real_data_example.yaml)
CAPTIONS = [  # realistic caption lengths in both languages, through the real Qwen tokenizer
    "a red double-decker bus crossing a stone bridge over a river at dusk, its headlights on",
    "一只橘色的猫趴在阳光明媚的窗台上，旁边放着一盆绿色的植物",
    "a bowl of ramen with a soft-boiled egg, spring onions and two slices of pork on a wooden table",
    "雪山脚下的一座小木屋，屋顶上有积雪，烟囱冒着白烟",
]


# --- measuring ---------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in bytes; None where there is no /proc."""
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def peak_rss() -> int:
    """Peak resident bytes since the last reset (VmHWM), else since the process started (ru_maxrss)."""
    found = status_bytes("VmHWM")
    return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def tight_heap(threshold: int = 65536) -> bool:
    """Make glibc's malloc map every allocation of `threshold` bytes or more on its own, so a freed
    tensor's memory returns to the OS at once. Resident memory then tracks the tensors alive, as a
    GPU allocator's peak does and as train.plan counts; glibc's default heap keeps freed chunks up
    to 32 MiB, which at Qwen2.5-0.5B size left about 1.2 GiB of freed activations resident while
    the gradients were made. False where this is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc's malloc_trim), so a
    phase's peak is its own, not the freed-but-kept memory of the phase before."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def current_rss() -> int:
    """Resident bytes now (VmRSS), or the peak where /proc is not there."""
    found = status_bytes("VmRSS")
    return found if found is not None else peak_rss()


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    peak_bytes: int = 0
    tokens: int = 0  # tokens processed (training) or produced (sampling) in the phase
    note: str = ""

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.tokens and self.seconds else None


class Meter:
    """Per-phase wall time and peak memory: host RSS on CPU, torch's allocator peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device, self.phases = device, []
        self.per_phase_peak = device.type == "cuda" or reset_peak_rss()

    @contextmanager
    def phase(self, name: str):
        record = Phase(name)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            release_memory()
            reset_peak_rss()
        start = time.perf_counter()
        yield record
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        record.seconds = time.perf_counter() - start
        record.peak_bytes = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else peak_rss()
        self.phases.append(record)
        print(format_phase(record), flush=True)

    def get(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def format_phase(p: Phase) -> str:
    rate = f"{p.tokens_per_second:,.1f}" if p.tokens_per_second else "-"
    return f"{p.name:<9} {p.seconds:>9.1f} {gib(p.peak_bytes):>12} {rate:>10}   {p.note}"


HEADER = f"{'phase':<9} {'seconds':>9} {'peak GiB':>12} {'tokens/s':>10}   what"


# --- the full-size checkpoint ------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("MARS_CACHE", Path.home() / ".cache" / "mars"))


def qwen_directory(qwen: str, layers: int | None = None, cache: Path | None = None) -> Path:
    """A local Qwen directory as given, or for a preset name its random full-size checkpoint,
    written once (bf16 safetensors + config.json + the Qwen tokenizer, like a download)."""
    if Path(qwen).is_dir():
        if layers is not None:
            raise ValueError("--layers applies to preset names, not to a Qwen directory")
        return Path(qwen)
    if qwen not in MODEL_PRESETS or MODEL_PRESETS[qwen].text_config.get("vocab_size", 0) < 100_000:
        names = sorted(n for n, c in MODEL_PRESETS.items() if c.text_config["vocab_size"] >= 100_000)
        raise ValueError(f"--qwen {qwen!r}: give a local Qwen directory or one of {names}")
    fields = dict(MODEL_PRESETS[qwen].text_config)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    target = (cache or cache_root()) / f"{qwen}-random{f'-{layers}layers' if layers else ''}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from mars.tokenizer import load_qwen_tokenizer

    torch.manual_seed(0)
    model = build_qwen(fields).to(torch.bfloat16)  # released Qwens ship bf16; transformers 5 loads them as bf16
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=target.parent if target.parent.exists() else None))
    model.save_pretrained(staging)
    load_qwen_tokenizer().save_pretrained(staging)
    del model
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(str(staging), target)
    return target


# --- batches and steps -------------------------------------------------------------------------

def caption_ids(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.encode(CAPTIONS[i % len(CAPTIONS)], add_special_tokens=False) for i in range(count)]


def stage1_batch(model: MarsModel, ids: list[list[int]], generator: torch.Generator, pad_id: int) -> dict:
    """Half text-to-image rows (image head), half image-to-text rows (the text head on captions)."""
    codes = torch.randint(0, model.config.codebook_size, (len(ids), *model.config.image_grid), generator=generator)
    t2i = max(1, len(ids) // 2) if len(ids) > 1 else 1
    parts = [build_batch(model, ids[:t2i], codes[:t2i], task="t2i", pad_id=pad_id)]
    if len(ids) > t2i:
        parts.append(build_batch(model, ids[t2i:], codes[t2i:], task="i2t", pad_id=pad_id))
    return concat_batches(parts, pad_id)


def stage2_batch(model: MarsModel, ids: list[list[int]], generator: torch.Generator, pad_id: int) -> dict:
    codes = torch.randint(0, model.config.codebook_size, (len(ids), *model.config.image_grid), generator=generator)
    return build_batch(model, ids, codes, task="t2i", caption_dropout=0.1, generator=generator, pad_id=pad_id)


def superres_batch(sr: SuperResModel, ids: list[list[int]], generator: torch.Generator) -> dict:
    size = sr.mars.config.codebook_size
    low = torch.randint(0, size, (len(ids), *sr.config.low_grid), generator=generator)
    high = torch.randint(0, size, (len(ids), *sr.config.high_grid), generator=generator)
    return build_superres_batch(sr, ids, low, high, caption_dropout=0.1, low_code_noise=0.05, generator=generator)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> float:
    """Forward, backward, optimizer step; -> the loss (finite, or it raises)."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    if not torch.isfinite(torch.tensor(value)):
        raise FloatingPointError(f"loss is {value}")
    return value


def superres_tokens(batch: dict, sr: SuperResModel) -> int:
    """Real positions of a super-resolution step: prompt, <boi>, low codes, high codes."""
    rows = len(batch["prompt_ids"])
    return int(batch["prompt_mask"].sum()) + rows * (1 + sr.config.num_low_tokens + sr.config.num_high_tokens)


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))


# --- the run -----------------------------------------------------------------------------------

@dataclass
class ScaleResult:
    phases: list[Phase]
    params: dict[str, int]
    baseline_bytes: int  # resident memory before the model loads (interpreter, torch, tokenizer)
    stage1_tokens: int
    memory: MemoryConfig
    qwen_dir: Path


def run(qwen: str, *, layers: int | None = None, batch: int = 2, memory: MemoryConfig | None = None,
        device: str = "cpu", cache: Path | None = None, out: Path | None = None, seed: int = 0) -> ScaleResult:
    memory = memory or MemoryConfig()
    device = torch.device(device)
    frozen = getattr(torch, memory.frozen_dtype)
    meter = Meter(device)
    torch.manual_seed(seed)  # the image head's and the super-resolution parts' initialisation
    generator = torch.Generator().manual_seed(seed)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}; memory levers {asdict(memory)}; batch {batch}")
    with meter.phase("checkpoint") as p:
        directory = qwen_directory(qwen, layers, cache)
        p.note = f"{directory}"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = caption_ids(tokenizer, batch)
    release_memory()
    baseline = current_rss() if device.type == "cpu" else 0
    print(HEADER)

    with meter.phase("load") as p:
        model = MarsModel.from_qwen(directory, codebook_size=CODEBOOK, image_grid=GRID, dtype=frozen)
        configure_memory(model, memory)
        model.to(device).train()
        params = parameter_report(model)
        p.note = (f"MarsModel.from_qwen: {params['frozen'] / 1e6:,.1f}M frozen ({memory.frozen_dtype}), "
                  f"{params['trainable'] / 1e6:,.1f}M trainable (fp32), vocabulary {model.image_token_offset:,}")
    optimizer = adamw(trainable_parameters(model))

    tensors = to_device(stage1_batch(model, ids, generator, pad_id), device)
    stage1_tokens = int(tensors["attention_mask"].sum())
    with meter.phase("stage1") as p:
        loss = train_step(model, tensors, optimizer)
        p.tokens = stage1_tokens
        labelled = tensors["labels"][:, 1:]
        text_rows = int(((labelled >= 0) & (labelled < model.image_token_offset)).sum())
        p.note = (f"{len(ids)} rows x {tensors['input_ids'].shape[1]} positions, {text_rows} caption targets "
                  f"through the {model.image_token_offset:,}-way text head; first step (AdamW state made); "
                  f"loss {loss:.2f}")

    tensors = to_device(stage2_batch(model, ids, generator, pad_id), device)
    with meter.phase("stage2") as p:
        loss = train_step(model, tensors, optimizer)
        p.tokens = int(tensors["attention_mask"].sum())
        p.note = f"text-to-image, caption dropout 0.1; loss {loss:.2f}"
    del optimizer, tensors
    gc.collect()

    # Super-resolution continues from the trained stage-2 experts (train/superres.py's init_from).
    sr = SuperResModel(SuperResConfig(low_grid=GRID, group_size=4), model)
    configure_memory(sr, memory)  # its own new parameters too
    sr.to(device).train()
    optimizer = adamw(sr.trainable_parameters())
    tensors = to_device(superres_batch(sr, ids, generator), device)
    with meter.phase("superres") as p:
        loss = train_step(sr, tensors, optimizer)
        p.tokens = superres_tokens(tensors, sr)
        p.note = (f"{GRID[0]}x{GRID[1]} -> {2 * GRID[0]}x{2 * GRID[1]} codes, k = 4; "
                  f"{p.tokens // len(ids)} positions a row; loss {loss:.2f}")
    del optimizer, tensors
    sr.eval()
    kept = sr.mars.image_head.weight.detach().clone()  # to check the round trip

    out = out or Path(tempfile.mkdtemp(prefix="mars-scale-"))
    with meter.phase("save") as p:
        sr.save_pretrained(out)
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        p.note = f"trainable only, {size / 2**30:.2f} GiB in {out} (the Qwen by path)"
    del sr, model
    gc.collect()

    with meter.phase("reload") as p:
        # For sampling, as a user loads it: one dtype throughout (fp32 on a CPU), no training levers
        # (a bf16 Qwen beside fp32 experts would cast every expert weight at every decoding step).
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        sr = SuperResModel.from_pretrained(out, dtype=dtype).to(device).eval()
        same = torch.equal(sr.mars.image_head.weight.detach().cpu(), kept.to(dtype))
        p.note = f"SuperResModel.from_pretrained in {str(dtype).removeprefix('torch.')}; weights equal to the saved ones: {same}"
    if not same:
        raise AssertionError("the reloaded trainable weights differ from the saved ones")

    prompt = ids[:1]
    with meter.phase("sample") as p:
        codes = generate_images(sr.mars, prompt, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed))
        p.tokens = codes.numel()
        p.note = f"one {GRID[0]}x{GRID[1]} grid, KV cache, CFG 3.0 (2 rows a step), {codes.numel()} steps"
    with meter.phase("upsample") as p:
        high = upsample_codes(sr, prompt, codes, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed))
        p.tokens = high.numel()
        p.note = (f"{tuple(codes.shape[1:])} -> {tuple(high.shape[1:])}, KV cache, CFG 3.0, "
                  f"{sr.config.num_groups} steps of {sr.config.group_size} codes")
    shutil.rmtree(out, ignore_errors=True)
    return ScaleResult(meter.phases, params, baseline, stage1_tokens, memory, directory)


def planner_comparison(result: ScaleResult, batch: int) -> str:
    """train.plan's estimate of the stage-1 step's peak (this machine's fp32 CPU mode) against the measurement."""
    from train.plan import Plan, RunSpec, architecture

    config = json.loads((result.qwen_dir / "config.json").read_text())
    memory = result.memory
    spec = RunSpec(batch=batch, grid=GRID[0], codebook=CODEBOOK, card="cpu", gpus=1, strategy="ddp",
                   frozen_dtype=memory.frozen_dtype, activation_checkpointing=memory.activation_checkpointing,
                   loss_chunk=memory.loss_chunk, i2t_ratio=0.5, runtime_bytes=result.baseline_bytes,
                   tokens_per_row=result.stage1_tokens / batch)
    plan = Plan(architecture(config), spec)
    measured = next(p for p in result.phases if p.name == "stage1").peak_bytes
    estimate = plan.peak_bytes
    return (f"planner (train.plan, CPU mode, baseline {gib(result.baseline_bytes)} GiB measured before "
            f"loading): stage-1 peak {gib(estimate)} GiB estimated, {gib(measured)} GiB measured "
            f"({(estimate - measured) / measured:+.1%})")


def memory_flags(parser: argparse.ArgumentParser) -> None:
    """The MemoryConfig switches as flags (shared with benchmarks.gpu_check)."""
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each SemVIE layer")
    parser.add_argument("--frozen-dtype", choices=FROZEN_DTYPES, default="float32",
                        help="dtype of the frozen Qwen (experts stay fp32 masters)")
    parser.add_argument("--loss-chunk", type=int, default=0, help="labelled positions per head chunk (0: one)")


def memory_from(args: argparse.Namespace) -> MemoryConfig:
    return MemoryConfig(activation_checkpointing=args.activation_checkpointing, frozen_dtype=args.frozen_dtype,
                        loss_chunk=args.loss_chunk)


def main(argv: list[str] | None = None) -> ScaleResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qwen", default="qwen2.5-0.5b", help="a preset name (qwen2.5-0.5b, qwen3-0.6b, ...) "
                        "or a local Qwen directory")
    parser.add_argument("--layers", type=int, default=None, help="reduced depth: this many decoder layers")
    parser.add_argument("--batch", type=int, default=2, help="rows per training step")
    parser.add_argument("--cache", type=Path, default=None, help="where random checkpoints go (~/.cache/mars)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--glibc-heap", action="store_true",
                        help="keep glibc's default heap (freed memory stays resident: higher peaks)")
    memory_flags(parser)
    args = parser.parse_args(argv)
    if args.batch < 1 or (args.layers is not None and args.layers < 1):
        parser.error("--batch and --layers must be 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.glibc_heap:
        print(f"heap: every allocation of 64 KiB or more mapped on its own: {tight_heap()}")
    result = run(args.qwen, layers=args.layers, batch=args.batch, memory=memory_from(args), cache=args.cache)
    print(planner_comparison(result, args.batch))
    return result


if __name__ == "__main__":
    main()
