"""Will it fit? Memory per GPU and step time of a MARS training run, from the Qwen's architecture alone.

    python -m train.plan --qwen qwen2.5-7b --gpus 8 --gpu-memory 80 --strategy fsdp --batch 32 --grid 16
    python -m train.plan --qwen qwen2.5-0.5b --gpus 1 --card rtx4090 --batch 16 --activation-checkpointing
    python -m train.plan --qwen /models/Qwen2.5-0.5B --gpus 1 --card h100 --batch 64      # a local Qwen (config.json)
    python -m train.plan --qwen qwen2.5-0.5b --card cpu --gpu-memory 24 --batch 2         # this machine, fp32
    python -m train.plan --table                                                          # docs/training.md's table

Parameters are counted exactly from the architecture (tests check them against the model built on
the meta device). Memory per GPU is the sum of

    frozen weights      the Qwen, in --frozen-dtype (bf16 on GPUs: MemoryConfig.frozen_dtype)
    trainable weights   SemVIE experts + image embeddings and head, fp32 master weights
    gradients           fp32, one per trainable weight
    optimizer           AdamW's two fp32 moments
    FSDP working set    with --strategy fsdp: the weights of two layers gathered whole (the one
                        running and the one prefetched) and the root unit (embeddings, heads)
    activations         what autograd keeps for backward, per token and layer from the layer's
                        shapes (tests check the formula against the tensors autograd saves); with
                        --activation-checkpointing only each layer's input, plus one layer's
                        activations while it is recomputed
    weight copies       bf16 autocast keeps a bf16 copy of each fp32 expert weight for backward
                        (one layer's with checkpointing; none under FSDP, which gathers in bf16)
    output heads        log-softmax of the image head (16,384 wide) on code positions and of the
                        text head (151,936) on caption positions, and their gradients;
                        --loss-chunk bounds the rows held at once

weights, optimizer and gradients divided by the GPU count under FSDP. The peak is the static part
plus the larger of (activations + heads) at the start of backward and (gradients + the optimizer's
temporaries) at the step. A card fits the run when the peak stays under its memory less a reserve
(CUDA context, communication buffers, allocator fragmentation: 1.5 GiB + 5 %). Step time is
the model's FLOPs (forward; backward through every position; weight gradients of the trainable
weights only; the recomputed forward with checkpointing) over the GPUs' peak dense bf16 FLOP/s at
--mfu. `--card cpu` is the fp32 CPU mode: host RAM, plus the process's own resident memory before
the model loads (--runtime-gib); benchmarks/scale.py measures it and compares.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float | None  # usable memory as torch reports it
    peak_flops: float | None  # dense bf16 FLOP/s (tensor cores, fp32 accumulate)
    bandwidth: float | None  # memory bytes/s


CARDS = {
    "h100": Card("NVIDIA H100 SXM 80 GB", 79.1, 989e12, 3.35e12),
    "h200": Card("NVIDIA H200 141 GB", 139.8, 989e12, 4.8e12),
    "a100": Card("NVIDIA A100 80 GB", 79.1, 312e12, 2.04e12),
    "rtx4090": Card("NVIDIA RTX 4090 24 GB", 23.6, 165e12, 1.01e12),
    "cpu": Card("CPU (host memory, fp32)", None, None, None),
}
RESERVE_GIB, RESERVE_SHARE = 1.5, 0.05  # what a GPU keeps from the run: context, NCCL buffers, fragmentation


# --- the architecture ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """A Qwen2/2.5/3 decoder as config.json describes it."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool  # Qwen2/2.5: q/k/v with bias
    qk_norm: bool  # Qwen3: RMSNorm on q and k per head

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def architecture(config: dict) -> Arch:
    """From config.json fields (a local Qwen directory) or a MODEL_PRESETS text_config."""
    model_type = config.get("model_type", "qwen2")
    if model_type not in ("qwen2", "qwen3"):
        raise ValueError(f"model_type {model_type!r}: the planner knows Qwen2/2.5 (qwen2) and Qwen3 (qwen3)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return Arch(model_type=model_type, hidden=hidden, layers=config["num_hidden_layers"], heads=heads,
                kv_heads=config.get("num_key_value_heads", heads),
                head_dim=config.get("head_dim") or hidden // heads, ffn=config["intermediate_size"],
                vocab=config["vocab_size"], tied=config.get("tie_word_embeddings", True),
                qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
                qk_norm=model_type == "qwen3")


def load_architecture(qwen: str) -> tuple[str, Arch]:
    """A preset name (mars.config.MODEL_PRESETS) or a directory / config.json path -> (label, Arch)."""
    path = Path(qwen)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return str(qwen), architecture(json.loads(path.read_text()))
    from mars.config import MODEL_PRESETS

    known = sorted(n for n, c in MODEL_PRESETS.items() if c.text_config["vocab_size"] >= 100_000)
    if qwen not in known:
        raise ValueError(f"--qwen {qwen!r}: give a local Qwen directory (with config.json) or one of {known}")
    return qwen, architecture(MODEL_PRESETS[qwen].text_config)


def attention_params(a: Arch) -> int:
    n = a.hidden * a.q_dim + 2 * a.hidden * a.kv_dim + a.q_dim * a.hidden
    if a.qkv_bias:
        n += a.q_dim + 2 * a.kv_dim
    if a.qk_norm:
        n += 2 * a.head_dim
    return n


def mlp_params(a: Arch) -> int:
    return 3 * a.hidden * a.ffn  # gate, up, down


def qwen_params(a: Arch) -> int:
    """The frozen Qwen: embeddings (and an untied head), layers with two norms each, final norm."""
    embeddings = a.vocab * a.hidden * (1 if a.tied else 2)
    return embeddings + a.layers * (attention_params(a) + mlp_params(a) + 2 * a.hidden) + a.hidden


def image_params(a: Arch, codebook: int, grid: tuple[int, int]) -> int:
    """Image embedding (codes + <boi>/<eoi>), row and column embeddings, image head."""
    return (codebook + 2) * a.hidden + (grid[0] + grid[1]) * a.hidden + codebook * a.hidden


def trainable_params(a: Arch, codebook: int, grid: tuple[int, int], visual_norms: bool = False) -> int:
    experts = a.layers * (attention_params(a) + mlp_params(a))
    norms = a.layers * 2 * a.hidden + a.hidden if visual_norms else 0
    return experts + norms + image_params(a, codebook, grid)


# --- the run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    batch: int = 32  # rows per GPU per micro-batch
    grid: int = 16  # h = w codes per image
    codebook: int = 16384
    gpus: int = 1
    strategy: str = "ddp"  # ddp: everything replicated; fsdp: weights, gradients, optimizer sharded
    card: str = "h100"
    gpu_memory_gib: float | None = None  # default: the card's
    frozen_dtype: str | None = None  # default: bfloat16 on GPUs, float32 on the CPU
    activation_checkpointing: bool = False
    loss_chunk: int = 0
    i2t_ratio: float = 0.3  # stage 1's share of image-to-text rows (0 for stage 2)
    text_tokens: int = 32  # prompt / caption length in tokens
    tokens_per_row: float | None = None  # override the mean sequence length
    mfu: float = 0.4
    visual_norms: bool = False
    runtime_bytes: float | None = None  # CPU mode: the process before the model (default 0.6 GiB)

    @property
    def device(self) -> Card:
        return CARDS[self.card]

    @property
    def compute_bytes(self) -> int:
        """Bytes of a saved matmul activation: bf16 under autocast (GPUs: bf16-mixed; any device with
        a bf16 frozen Qwen), fp32 in the CPU's fp32 mode."""
        return 4 if self.card == "cpu" and self.frozen_bytes == 4 else 2

    @property
    def frozen_bytes(self) -> int:
        return DTYPE_BYTES[self.frozen_dtype or ("float32" if self.card == "cpu" else "bfloat16")]


@dataclass
class Plan:
    """Every figure of one run: parameters, bytes per GPU, FLOPs and time a step."""

    arch: Arch
    spec: RunSpec
    frozen: int = field(init=False)
    trainable: int = field(init=False)

    def __post_init__(self) -> None:
        s = self.spec
        if s.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy {s.strategy!r}: ddp or fsdp")
        if s.card not in CARDS:
            raise ValueError(f"card {s.card!r}: one of {sorted(CARDS)}")
        self.frozen = qwen_params(self.arch)
        self.trainable = trainable_params(self.arch, s.codebook, (s.grid, s.grid), s.visual_norms)

    # --- sequences ------------------------------------------------------------------------------

    @property
    def image_tokens(self) -> int:
        return self.spec.grid * self.spec.grid

    @property
    def tokens_per_row(self) -> float:
        """t2i [prompt][boi][codes][eoi]; i2t [boi][codes][eoi][caption][eos]."""
        s = self.spec
        if s.tokens_per_row is not None:
            return s.tokens_per_row
        return (1 - s.i2t_ratio) * (s.text_tokens + self.image_tokens + 2) + s.i2t_ratio * (
            self.image_tokens + s.text_tokens + 3)

    @property
    def image_share(self) -> float:
        """Share of positions on the image path (codes, <boi>, <eoi>)."""
        return min(1.0, (self.image_tokens + 2) / self.tokens_per_row)

    @property
    def code_targets(self) -> float:
        return (1 - self.spec.i2t_ratio) * self.image_tokens  # per row, on the image head

    @property
    def text_targets(self) -> float:
        return self.spec.i2t_ratio * (self.spec.text_tokens + 1)  # per row, caption + eos on the text head

    # --- memory ---------------------------------------------------------------------------------

    @property
    def shards(self) -> int:
        return self.spec.gpus if self.spec.strategy == "fsdp" else 1

    @property
    def weights_frozen(self) -> float:
        return self.frozen * self.spec.frozen_bytes / self.shards

    @property
    def weights_trainable(self) -> float:
        return self.trainable * 4 / self.shards

    @property
    def gradients(self) -> float:
        return self.trainable * 4 / self.shards

    @property
    def optimizer(self) -> float:
        return self.trainable * 8 / self.shards

    @property
    def optimizer_temporaries(self) -> float:
        """AdamW's multi-tensor step (GPUs) makes one fp32 temporary per moment tensor (sqrt of the
        second moment); on the CPU it steps tensor by tensor: the largest tensor only."""
        if self.spec.card == "cpu":
            return max(self.arch.ffn * self.arch.hidden, (self.spec.codebook + 2) * self.arch.hidden) * 4
        return self.trainable * 4 / self.shards

    @property
    def fsdp_working_set(self) -> float:
        """Under FSDP: two layers gathered whole (running + prefetched: frozen and expert weights in
        the compute dtype, the experts' unsharded gradients before their reduce-scatter) and the
        root unit (embeddings, heads, image parameters), which stays gathered through the step."""
        if self.spec.strategy != "fsdp" or self.spec.gpus == 1:
            return 0.0
        a, s = self.arch, self.spec
        gathered = s.compute_bytes  # bf16 all-gathers on GPUs (MixedPrecisionPolicy), fp32 on the CPU
        layer = (attention_params(a) + mlp_params(a) + 2 * a.hidden) * gathered + (
            attention_params(a) + mlp_params(a)) * (gathered + 4)
        root = a.vocab * a.hidden * (1 if a.tied else 2) * gathered + image_params(
            a, s.codebook, (s.grid, s.grid)) * (gathered + 4)
        return 2 * layer + root

    def layer_activation_bytes_per_token(self, image: bool) -> float:
        """What autograd keeps of one SemVIE layer for one position (see the module docstring).

        Residual stream and norm inputs are fp32; matmul inputs and outputs are `compute_bytes`
        (bf16 under autocast). Text positions go through frozen weights, which keep no inputs for
        weight gradients; image positions' expert matmuls keep theirs.
        """
        a, c = self.arch, self.spec.compute_bytes
        norms = 2 * (a.hidden + 1) * 4  # the two RMSNorms keep their fp32 input and 1 / rms
        qk_norm = (a.q_dim + a.kv_dim) * c if a.qk_norm else 0  # Qwen3's per-head norms keep theirs
        attention = (2 * a.q_dim + 2 * a.kv_dim) * c + a.heads * 4  # SDPA: q, k, v, output; log-sum-exp
        mlp = 3 * a.ffn * c  # SiLU input, its output and the up projection (for the product's gradient)
        per_token = norms + qk_norm + attention + mlp
        if image:  # expert inputs: q/k/v (one tensor), o_proj, gate/up (one), down
            per_token += (2 * a.hidden + a.q_dim + a.ffn) * c
        return per_token

    def activation_bytes(self, checkpointing: bool) -> float:
        """Saved activations of the whole stack for one micro-batch (heads apart)."""
        a, s = self.arch, self.spec
        tokens = s.batch * self.tokens_per_row
        per_token = (self.image_share * self.layer_activation_bytes_per_token(True)
                     + (1 - self.image_share) * self.layer_activation_bytes_per_token(False))
        one_layer = tokens * per_token
        outside = tokens * a.hidden * 4  # the final norm's input (the embeddings are layer 0's input)
        if checkpointing:  # each layer's input, and one layer's activations while it is recomputed
            return a.layers * tokens * a.hidden * 4 + one_layer + outside
        return a.layers * one_layer + outside

    def autocast_copies(self, checkpointing: bool) -> float:
        """bf16 autocast casts every fp32 weight a matmul uses and keeps the copy for backward: the
        experts' (and a float32 frozen Qwen's) until the step's backward frees them, one layer's at a
        time with checkpointing. Under FSDP the units gather in bf16 instead (MixedPrecisionPolicy,
        train.modules.shard_layers) and free them after use: no copies."""
        s = self.spec
        if s.compute_bytes == 4 or (s.strategy == "fsdp" and s.gpus > 1):
            return 0.0
        a = self.arch
        per_layer = (attention_params(a) + mlp_params(a)) * (1 if s.frozen_bytes == 2 else 2)
        return (1 if checkpointing else a.layers) * per_layer * 2

    @property
    def head_bytes(self) -> float:
        """On labelled rows only: the fp32 log-softmax kept for backward, and in backward its
        incoming gradient and the logits' gradient beside it (12 bytes a logit at the peak)."""
        s = self.spec
        rows = [(s.batch * self.code_targets, s.codebook), (s.batch * self.text_targets, self.arch.vocab)]
        total = 0.0
        for count, width in rows:
            held = min(count, s.loss_chunk) if s.loss_chunk > 0 else count
            total += held * width * 12
        return total

    @property
    def runtime_bytes(self) -> float:
        if self.spec.card != "cpu":
            return 0.0  # torch's allocator peak, which the CUDA context is not part of (see the reserve)
        return self.spec.runtime_bytes if self.spec.runtime_bytes is not None else 0.6 * GIB

    @property
    def static_bytes(self) -> float:
        return (self.weights_frozen + self.weights_trainable + self.optimizer + self.fsdp_working_set
                + self.runtime_bytes)

    def peak(self, checkpointing: bool | None = None) -> float:
        checkpointing = self.spec.activation_checkpointing if checkpointing is None else checkpointing
        backward = self.activation_bytes(checkpointing) + self.autocast_copies(checkpointing) + self.head_bytes
        step = self.gradients + self.optimizer_temporaries
        return self.static_bytes + max(backward, step)

    @property
    def peak_bytes(self) -> float:
        return self.peak()

    @property
    def budget_bytes(self) -> float | None:
        memory = self.spec.gpu_memory_gib or self.spec.device.memory_gib
        if memory is None:
            return None
        if self.spec.card == "cpu":
            return memory * GIB
        return (memory * (1 - RESERVE_SHARE) - RESERVE_GIB) * GIB

    def fits(self, checkpointing: bool | None = None) -> bool | None:
        budget = self.budget_bytes
        return None if budget is None else self.peak(checkpointing) <= budget

    # --- compute --------------------------------------------------------------------------------

    @property
    def layer_flops_per_token(self) -> float:
        """Matmul FLOPs of one layer for one position (forward; text or image path alike)."""
        return 2 * (attention_params(self.arch) + mlp_params(self.arch))

    def flops_per_row(self, checkpointing: bool) -> dict[str, float]:
        a, s = self.arch, self.spec
        t = self.tokens_per_row
        layers = a.layers * (t * self.layer_flops_per_token + 2 * 2 * a.q_dim * t * (t + 1) / 2)  # causal QK^T, PV
        heads = 2 * a.hidden * (s.codebook * self.code_targets + a.vocab * self.text_targets)
        forward = layers + heads
        backward = 2 * forward  # gradients w.r.t. activations run through every position, frozen or not
        weight_grads = 2 * (a.layers * (self.image_tokens + 2) * self.layer_flops_per_token  # experts: image path
                            + a.hidden * s.codebook * self.code_targets)  # the image head
        recompute = layers if checkpointing else 0.0
        return {"forward": forward, "backward": backward + weight_grads, "recompute": recompute}

    def step_flops(self, checkpointing: bool | None = None) -> tuple[float, float]:
        """(model FLOPs, executed FLOPs incl. recomputation) of one optimizer step on one GPU."""
        checkpointing = self.spec.activation_checkpointing if checkpointing is None else checkpointing
        parts = self.flops_per_row(checkpointing)
        model = self.spec.batch * (parts["forward"] + parts["backward"])
        return model, model + self.spec.batch * parts["recompute"]

    def step_seconds(self, checkpointing: bool | None = None) -> float | None:
        peak = self.spec.device.peak_flops
        if peak is None:
            return None
        return self.step_flops(checkpointing)[1] / (self.spec.mfu * peak)


# --- reports ------------------------------------------------------------------------------------

def gb(n: float) -> str:
    return f"{n / GIB:,.2f}"


def report(label: str, plan: Plan) -> str:
    a, s = plan.arch, plan.spec
    card = s.device
    memory = s.gpu_memory_gib or card.memory_gib
    lines = [
        f"MARS plan: {label} ({a.model_type}, hidden {a.hidden}, {a.layers} layers, {a.heads}/{a.kv_heads} heads "
        f"x {a.head_dim}, ffn {a.ffn}, vocabulary {a.vocab:,}, {'tied' if a.tied else 'untied'} head)",
        f"  {s.grid}x{s.grid} codes, {s.codebook:,}-code codebook; {s.batch} rows a GPU, {plan.tokens_per_row:.0f} "
        f"positions a row ({s.i2t_ratio:.0%} image-to-text, {s.text_tokens}-token texts); "
        f"{s.gpus} x {card.name}{f' ({memory:g} GiB)' if memory else ''}, {s.strategy}",
        f"parameters: frozen {plan.frozen:,}, trainable {plan.trainable:,} (fp32 masters)",
        f"{'memory per GPU (GiB)':<31} without  with activation checkpointing",
    ]
    frozen_dtype = s.frozen_dtype or ("float32" if s.card == "cpu" else "bfloat16")
    rows = [(f"frozen weights ({frozen_dtype})", plan.weights_frozen),
            ("trainable weights (fp32)", plan.weights_trainable), ("gradients (fp32)", plan.gradients),
            ("optimizer (AdamW, fp32)", plan.optimizer)]
    if plan.fsdp_working_set:
        rows.append(("FSDP working set", plan.fsdp_working_set))
    if plan.runtime_bytes:
        rows.append(("process before the model", plan.runtime_bytes))
    for name, value in rows:
        lines.append(f"  {name:<29} {gb(value):>7}")
    lines.append(f"  {'activations':<29} {gb(plan.activation_bytes(False)):>7}  {gb(plan.activation_bytes(True)):>7}")
    if plan.autocast_copies(False):
        lines.append(f"  {'bf16 weight copies (autocast)':<29} {gb(plan.autocast_copies(False)):>7}  "
                     f"{gb(plan.autocast_copies(True)):>7}")
    chunk = f", loss_chunk {s.loss_chunk}" if s.loss_chunk else ""
    lines.append(f"  {'output heads' + chunk:<29} {gb(plan.head_bytes):>7}")
    lines.append(f"  {'peak':<29} {gb(plan.peak(False)):>7}  {gb(plan.peak(True)):>7}")
    budget = plan.budget_bytes
    if budget is not None:
        verdict = {True: "fits", False: "does not fit"}
        reserve = "" if s.card == "cpu" else f" ({memory:g} GiB less {RESERVE_GIB} GiB and {RESERVE_SHARE:.0%})"
        lines.append(f"budget {gb(budget)} GiB a GPU{reserve}: {verdict[plan.fits(False)]} without, "
                     f"{verdict[plan.fits(True)]} with activation checkpointing")
    seconds = {ck: plan.step_seconds(ck) for ck in (False, True)}
    if seconds[False] is not None:
        model_flops = plan.step_flops(False)[0]
        tokens = s.batch * plan.tokens_per_row * s.gpus
        lines.append(f"step time at {s.mfu:.0%} MFU of {card.peak_flops / 1e12:,.0f} TFLOP/s (dense bf16): "
                     f"{seconds[False]:.2f} s without, {seconds[True]:.2f} s with checkpointing; "
                     f"{model_flops / 1e12:,.1f} TFLOP a GPU a step, {tokens / seconds[False]:,.0f} tokens/s "
                     f"over {s.gpus} GPU{'s' if s.gpus > 1 else ''}")
    return "\n".join(lines)


def largest_batch(arch: Arch, spec: RunSpec, checkpointing: bool, limit: int = 4096) -> int:
    """The largest rows-per-GPU that fits (0: not even one)."""
    def fits(batch: int) -> bool:
        return bool(Plan(arch, replace(spec, batch=batch, activation_checkpointing=checkpointing)).fits())

    if not fits(1):
        return 0
    low, high = 1, limit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


TABLE_MODELS = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-8b"]
TABLE_CARDS = [("rtx4090", "24 GB"), ("h100", "80 GB"), ("h200", "141 GB")]


def table() -> str:
    """Markdown: parameters; the largest micro-batch a GPU on 24 / 80 / 141 GB cards as "one GPU /
    one GPU with activation checkpointing / 8 GPUs FSDP with checkpointing" (stage 1, 16 x 16 codes);
    the seconds of a step at 32 rows a GPU on H100s at 40 % MFU, without (with) checkpointing."""
    header = ["model", "frozen", "trainable"] + [f"{mem} ({CARDS[card].name.split(' ', 1)[1].rsplit(' ', 2)[0]})"
                                                 for card, mem in TABLE_CARDS]
    header.append("H100 s a step (with checkpointing)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in TABLE_MODELS:
        _, arch = load_architecture(name)
        plan = Plan(arch, RunSpec(card="h100"))
        cells = [name, f"{plan.frozen / 1e9:.2f} B", f"{plan.trainable / 1e9:.2f} B"]
        for card, _ in TABLE_CARDS:
            single = RunSpec(card=card, gpus=1)
            sharded = RunSpec(card=card, gpus=8, strategy="fsdp")
            sizes = [largest_batch(arch, single, False), largest_batch(arch, single, True),
                     largest_batch(arch, sharded, True)]
            cells.append(" / ".join(str(n) if n else "–" for n in sizes))
        h100 = Plan(arch, RunSpec(card="h100", batch=32))
        cells.append(f"{h100.step_seconds(False):.2f} ({h100.step_seconds(True):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qwen", default="qwen2.5-0.5b", help="preset (qwen2.5-0.5b/1.5b/7b, qwen3-0.6b/1.7b/8b) "
                        "or a local Qwen directory / config.json")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--card", choices=sorted(CARDS), default="h100",
                        help="peak bf16 FLOP/s and memory: h100/h200 989 TFLOP/s, a100 312, rtx4090 165; cpu: fp32")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: the card's; cpu: RAM)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--batch", type=int, default=32, help="rows per GPU per micro-batch")
    parser.add_argument("--grid", type=int, default=16, help="codes per image side")
    parser.add_argument("--codebook", type=int, default=16384)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--frozen-dtype", choices=sorted(DTYPE_BYTES), default=None,
                        help="default bfloat16 on GPUs, float32 on the CPU")
    parser.add_argument("--loss-chunk", type=int, default=0)
    parser.add_argument("--i2t-ratio", type=float, default=0.3, help="stage 1's image-to-text share (stage 2: 0)")
    parser.add_argument("--text-tokens", type=int, default=32, help="prompt / caption length")
    parser.add_argument("--mfu", type=float, default=0.4, help="fraction of the card's peak sustained")
    parser.add_argument("--runtime-gib", type=float, default=None, help="CPU mode: the process before the model")
    parser.add_argument("--table", action="store_true", help="print docs/training.md's table and exit")
    args = parser.parse_args(argv)
    if args.table:
        text = table()
    else:
        if min(args.gpus, args.batch, args.grid, args.codebook) < 1 or not 0 < args.mfu <= 1:
            parser.error("--gpus, --batch, --grid and --codebook must be 1 or more, --mfu in (0, 1]")
        try:
            label, arch = load_architecture(args.qwen)
        except ValueError as error:
            parser.error(str(error))
        spec = RunSpec(batch=args.batch, grid=args.grid, codebook=args.codebook, gpus=args.gpus, strategy=args.strategy,
                       card=args.card, gpu_memory_gib=args.gpu_memory, frozen_dtype=args.frozen_dtype,
                       activation_checkpointing=args.activation_checkpointing, loss_chunk=args.loss_chunk,
                       i2t_ratio=args.i2t_ratio, text_tokens=args.text_tokens, mfu=args.mfu,
                       runtime_bytes=None if args.runtime_gib is None else args.runtime_gib * GIB)
        text = report(label, Plan(arch, spec))
    print(text)
    return text


if __name__ == "__main__":
    main()
