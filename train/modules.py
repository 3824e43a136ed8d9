"""Thin LightningModules for the MARS stages; the models themselves are plain torch in mars/.

    TextLMModule   stage 0: a small Qwen-architecture LM trained from scratch on captions (English
                   and Chinese: the shapes world's, or an image folder's) over a Qwen vocabulary
                   trimmed to their tokens (VocabMap); exports a Hugging Face directory +
                   tokenizer files + vocab_map.json.
    MarsLitModule  stages 1 and 2: SemVIE experts over the frozen Qwen on extracted codes
                   (train/codes.py). Stage 1 mixes text-to-image and image-to-text rows
                   (i2t_ratio); stage 2 is text-to-image with caption dropout for CFG.

Only `mars.model.is_trainable` parameters reach the optimizer and the checkpoints of
MarsLitModule: the frozen Qwen is referenced by `text_model`, never copied. Both modules use
AdamW with linear warm-up and cosine decay, stepped every optimizer step.

At scale, MarsLitModule takes `memory` (mars.config.MemoryConfig: activation checkpointing, a bf16
frozen Qwen, a chunked loss) and shards with FSDP2 under `MarsFSDPStrategy` (Lightning's
ModelParallelStrategy, data parallel only, `fully_shard` per SemVIE layer in configure_model),
whose sharded checkpoints also hold the trainable tensors only. `python -m train.plan` says
whether a Qwen fits your GPUs and how long a step takes.

    python -m train fit --config train/configs/shapes_stage1.yaml
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

from mars.config import MemoryConfig
from mars.model import (IGNORE_INDEX, MarsModel, build_batch, build_qwen, concat_batches, configure_memory,
                        full_tensors, is_trainable, pad_sequences, trainable_state_dict)
from mars.semvie import SemVIEModel
from mars.tokenizer import PromptTokenizer


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.05  # matrices only; norms, biases and embeddings rows decay-free
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio


def can_compile() -> bool:
    """Whether torch.compile can build kernels here: on a GPU, or on a CPU with the C++ compiler inductor
    looks for ($CXX, else g++). Says in one line when it cannot."""
    if torch.cuda.is_available():
        return True
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception:  # inductor's own search failed, whatever it raised
        print("[train] compile=True needs a C++ compiler on a CPU (apt-get install g++, or set CXX): training "
              "without torch.compile")
        return False


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """LR multiplier: linear warm-up, then cosine down to `floor` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def configure_adamw(module: L.LightningModule, named: list[tuple[str, nn.Parameter]], optim: OptimConfig):
    """AdamW over `named` (decay on weight matrices only) + a per-step warm-up/cosine LambdaLR."""
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr, betas=tuple(optim.betas))
    trainer = module.trainer
    total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, optim.warmup_steps, total, optim.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def shard_layers(module: nn.Module, layers: nn.ModuleList, mesh) -> None:
    """FSDP2: one unit per SemVIE layer (its frozen Qwen weights and its experts together: a layer's
    all-gather brings both), then the root (embeddings, heads, final norm). Each rank keeps 1/N of
    every tensor; frozen bf16 and trainable fp32 tensors may share a unit (only trainable ones
    need one dtype). Idempotent: Lightning may call configure_model more than once.

    With a bf16 frozen Qwen (MemoryConfig.frozen_dtype) the units gather in bf16 and reduce
    gradients in fp32 (MixedPrecisionPolicy): the fp32 expert masters stay sharded, and no bf16
    copy of them outlives its layer (plain autocast would keep one per layer until backward). The
    residual stream stays fp32 (cast_forward_inputs=False).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(module, FSDPModule):
        return
    compute = next((m.autocast_dtype for m in module.modules() if isinstance(m, SemVIEModel)), None)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if compute is not None else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


class MarsFSDPStrategy(ModelParallelStrategy):
    """FSDP2 for MARS: Lightning's ModelParallelStrategy as pure data parallelism (every process one
    shard; tensor parallelism is not used), which runs on GPUs and, over gloo, on CPUs.

    Its sharded checkpoints (a directory per checkpoint, one file per rank plus meta.pt) hold the
    trainable tensors and their optimizer state only, like every MARS checkpoint: the frozen Qwen
    comes back from `text_model`. Lightning's own loader expects every tensor of the model in the
    checkpoint; this one loads the trainable ones.

        trainer: {devices: 8, strategy: {class_path: train.modules.MarsFSDPStrategy}}
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        # One shard group over every process of every node (the parent's "auto" is one per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        from lightning.fabric.strategies.fsdp import _METADATA_FILENAME, _is_sharded_checkpoint
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if is_trainable(k)}
        state = {"state_dict": model_state}
        load(state, checkpoint_id=path)  # fills the local shards in place
        self.model.load_state_dict(state["state_dict"], strict=False)
        for index, optimizer in enumerate(self.optimizers):
            optimizer_state = {f"optimizer_{index}": get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[f"optimizer_{index}"],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written `staging` directory to `target` (an export is whole or absent)."""
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


# ----------------------------------------------------------------------------- stage 0: text LM

def shapes_caption_corpus(num_items: int, seed: int) -> list[str]:
    """Every caption (both languages, prompts and scene descriptions) of shapes items 0..num_items-1."""
    from train.codes import matching_captions, shapes_item

    return [text for i in range(num_items) for text in matching_captions(shapes_item(seed, i)[2])]


class TextLMModule(L.LightningModule):
    """Pretrains a Qwen2/Qwen3-architecture causal LM on captions, sequences [caption][eos].

    `text_config`: Qwen config fields (model_type, hidden_size, num_hidden_layers, ...); the
    vocabulary size and special ids come from the VocabMap built over the captions of `vocab_path`
    (an image folder with captions.jsonl: every `caption` and `caption_zh`) or, without one, of
    `vocab_items` shapes items. A token outside it reads as the unknown token.
    """

    def __init__(self, text_config: dict, vocab_items: int = 4000, vocab_seed: int = 12345,
                 optim: OptimConfig | None = None, export_dir: str | None = None, vocab_path: str | None = None):
        super().__init__()
        from mars.tokenizer import VocabMap, load_qwen_tokenizer
        from train.data import folder_captions

        self.optim = optim or OptimConfig()
        self.save_hyperparameters({"text_config": dict(text_config), "vocab_items": vocab_items,
                                   "vocab_seed": vocab_seed, "optim": asdict(self.optim), "export_dir": export_dir,
                                   "vocab_path": vocab_path})
        full_tokenizer = load_qwen_tokenizer()
        corpus = folder_captions(vocab_path) if vocab_path else shapes_caption_corpus(vocab_items, vocab_seed)
        self.vocab_map = VocabMap.from_texts(full_tokenizer, corpus)
        self.prompt_tokenizer = PromptTokenizer(full_tokenizer, self.vocab_map)
        fields = {**text_config, "vocab_size": len(self.vocab_map), "eos_token_id": self.vocab_map.eos_id,
                  "pad_token_id": self.vocab_map.pad_id, "bos_token_id": None}
        self.qwen = build_qwen(fields)

    def configure_optimizers(self):
        return configure_adamw(self, list(self.qwen.named_parameters()), self.optim)

    def batch_tensors(self, captions: list[str]) -> dict[str, Tensor]:
        eos = self.vocab_map.eos_id
        input_ids, mask = pad_sequences([self.prompt_tokenizer.encode(c) + [eos] for c in captions],
                                        self.prompt_tokenizer.pad_id)
        device = self.qwen.device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.long().to(device),
                "labels": input_ids.masked_fill(~mask, IGNORE_INDEX).to(device)}

    def training_step(self, batch, batch_idx):
        loss = self.qwen(**self.batch_tensors(batch["caption"])).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.qwen(**self.batch_tensors(batch["caption"])).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vocab_map_full_ids"] = self.vocab_map.full_ids

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("vocab_map_full_ids", self.vocab_map.full_ids) != self.vocab_map.full_ids:
            raise ValueError("this checkpoint was trained with another vocabulary map (vocab_items/vocab_seed, "
                             "vocab_path's captions or the Qwen tokenizer changed): resume with the config that "
                             "wrote it")

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)

    def export(self, directory: str | Path) -> Path:
        """A Qwen directory: config.json + model.safetensors, tokenizer files, vocab_map.json."""
        directory = Path(directory)
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        self.qwen.save_pretrained(staging)
        self.prompt_tokenizer.save_pretrained(staging)
        _replace_dir(staging, directory)
        print(f"text model saved to {directory}")
        return directory


# ----------------------------------------------------------------------------- stages 1 and 2: MARS

class MarsLitModule(L.LightningModule):
    """Trains the SemVIE experts and image embeddings/head of a MarsModel over a frozen Qwen.

    text_model: local Qwen directory (HF format); tokenizer: directory with tokenizer.json
    (+ vocab_map.json), default text_model. init_from: the previous stage's export directory
    (mars_config.json beside mars_trainable.safetensors) or a Lightning checkpoint of this module.
    memory: the memory levers (mars.config.MemoryConfig); the trainable weights are fp32 whatever
    the Qwen directory's dtype (a downloaded Qwen is bf16), the frozen ones `memory.frozen_dtype`.
    compile: run training and validation steps through torch.compile (dynamic shapes: captions vary in
    length): the first step compiles (a minute or two on a CPU), the later ones run faster
    (docs/benchmarks.md). A CPU-only machine without a C++ compiler, which inductor needs, trains eagerly.
    """

    def __init__(self, text_model: str, tokenizer: str | None = None, codebook_size: int = 1024,
                 image_grid: tuple[int, int] = (8, 8), visual_norms: bool = False, image_pos_2d: bool = True,
                 image_rope_2d: bool = False, init_from: str | None = None, i2t_ratio: float = 0.0, caption_dropout: float = 0.0,
                 first_codes: int = 0, first_codes_weight: float = 1.0, compile: bool = False,
                 optim: OptimConfig | None = None, memory: MemoryConfig | None = None, export_dir: str | None = None):
        super().__init__()
        if not 0.0 <= i2t_ratio <= 1.0 or not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"i2t_ratio={i2t_ratio} must lie in [0, 1] and caption_dropout={caption_dropout} "
                             "in [0, 1)")
        if not 0 <= first_codes <= image_grid[0] * image_grid[1] or not first_codes_weight > 0:
            raise ValueError(f"first_codes={first_codes} must lie in [0, {image_grid[0] * image_grid[1]}] (the image's "
                             f"codes) and first_codes_weight={first_codes_weight} be > 0")
        self.optim = optim or OptimConfig()
        self.memory = memory or MemoryConfig()
        self.save_hyperparameters({
            "text_model": text_model, "tokenizer": tokenizer, "codebook_size": codebook_size,
            "image_grid": list(image_grid), "visual_norms": visual_norms, "image_pos_2d": image_pos_2d,
            "image_rope_2d": image_rope_2d, "init_from": init_from, "i2t_ratio": i2t_ratio, "caption_dropout": caption_dropout,
            "first_codes": first_codes, "first_codes_weight": first_codes_weight, "compile": compile,
            "optim": asdict(self.optim), "memory": asdict(self.memory), "export_dir": export_dir})
        # Loaded straight in the frozen dtype (bf16: a downloaded Qwen is never widened to fp32 whole);
        # configure_memory then makes the experts fp32 master weights whatever the directory's dtype.
        self.model = MarsModel.from_qwen(text_model, codebook_size=codebook_size, image_grid=tuple(image_grid),
                                         visual_norms=visual_norms, image_pos_2d=image_pos_2d,
                                         image_rope_2d=image_rope_2d,
                                         dtype=getattr(torch, self.memory.frozen_dtype))
        configure_memory(self.model, self.memory)
        # Training weighs the codes of the first `first_codes` raster cells `first_codes_weight` times: they
        # decide which image follows, and only the caption can tell them (docs/emoji.md). Validation does not.
        self.cell_weights = None
        if first_codes and first_codes_weight != 1.0:
            self.cell_weights = torch.ones(image_grid[0] * image_grid[1])  # (h*w,)
            self.cell_weights[:first_codes] = first_codes_weight
        self.model.train()  # from_pretrained leaves the Qwen in eval mode; the experts are its copies
        # A compiled bound method, not a compiled module: a module attribute would enter the state dict twice.
        self.compiled_forward = None
        if compile and can_compile():
            self.compiled_forward = torch.compile(self.model.forward, dynamic=True)
        self.prompt_tokenizer = PromptTokenizer.from_pretrained(tokenizer or text_model)
        # Checkpoints hold the trainable tensors only; the frozen Qwen comes from text_model.
        self.strict_loading = False
        if init_from:
            self.load_trainable_from(init_from)

    # --- weights ------------------------------------------------------------------------------

    def load_trainable_from(self, source: str | Path) -> None:
        source = Path(source)
        if source.is_dir():
            self.model.load_trainable(source / "mars_trainable.safetensors")
            return
        if not source.is_file():
            raise FileNotFoundError(f"init_from={source} not found: give the previous stage's export directory "
                                    "or a .ckpt of MarsLitModule")
        state = torch.load(source, map_location="cpu", weights_only=True).get("state_dict", {})
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        expected = set(trainable_state_dict(self.model))
        if set(state) != expected:
            raise ValueError(f"{source} does not hold this model's trainable weights (missing "
                             f"{sorted(expected - set(state))[:3]}): check codebook_size/image_grid against its config")
        self.model.load_state_dict(state, strict=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith("model.") and k.removeprefix("model.") in self._trainable_names}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" not in checkpoint:  # a sharded checkpoint: MarsFSDPStrategy loaded the tensors
            return
        saved = {k.removeprefix("model.") for k in checkpoint["state_dict"]}
        missing = sorted(self._trainable_names - saved)
        if missing:
            raise ValueError(f"checkpoint lacks trainable weights {missing[:3]}: it belongs to another config")

    @property
    def _trainable_names(self) -> set[str]:
        return set(trainable_state_dict(self.model))

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return configure_adamw(self, named, self.optim)

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # MarsFSDPStrategy (ModelParallelStrategy): shard with FSDP2
            if self.compiled_forward is not None:  # it calls forward past the hooks FSDP puts on the module
                raise ValueError("compile=True cannot run under MarsFSDPStrategy: set model.init_args.compile false")
            if self.device_mesh["tensor_parallel"].size() > 1:
                raise ValueError("MARS shards with FSDP only: set tensor_parallel_size=1 (MarsFSDPStrategy does)")
            shard_layers(self.model, self.model.model.layers, self.device_mesh["data_parallel"])

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        code_set = getattr(datamodule, "code_set", None)
        if code_set is not None and code_set.codebook_size != self.model.config.codebook_size:
            raise ValueError(f"codes in {datamodule.hparams.path} come from a {code_set.codebook_size}-entry codebook "
                             f"but model.codebook_size={self.model.config.codebook_size}: set them equal")

    # --- steps --------------------------------------------------------------------------------

    def batch_codes(self, batch: dict) -> Tensor:
        """The batch's codes tensor whose grid matches the model (batches may carry several sizes)."""
        grid = tuple(self.model.config.image_grid)
        for key, value in batch.items():
            if key.startswith("codes_") and tuple(value.shape[1:]) == grid:
                return value
        found = {k: tuple(v.shape[1:]) for k, v in batch.items() if k.startswith("codes_")}
        raise ValueError(f"no codes with grid {grid} in the batch (found {found}): extract codes at "
                         f"{grid[0]} * f pixels or set model.image_grid")

    def sequences(self, batch: dict, i2t_ratio: float, caption_dropout: float) -> tuple[dict, float]:
        """Token batch mixing t2i and i2t rows (drawn from the batch seed) -> (tensors, share of i2t rows)."""
        codes, captions = self.batch_codes(batch), batch["caption"]
        generator = torch.Generator().manual_seed(int(batch["seed"]))
        is_i2t = (torch.rand(len(captions), generator=generator) < i2t_ratio).tolist()
        parts = []
        for task in ("t2i", "i2t"):
            rows = [i for i, flag in enumerate(is_i2t) if flag == (task == "i2t")]
            if rows:
                ids = [self.prompt_tokenizer.encode(captions[i]) for i in rows]
                parts.append(build_batch(self.model, ids, codes[rows].cpu(), task=task, caption_dropout=caption_dropout,
                                         generator=generator, pad_id=self.prompt_tokenizer.pad_id))
        merged = concat_batches(parts, self.prompt_tokenizer.pad_id)
        return {key: value.to(self.device) for key, value in merged.items()}, sum(is_i2t) / len(is_i2t)

    def shared_step(self, batch: dict, i2t_ratio: float, caption_dropout: float,
                    cell_weights: Tensor | None = None) -> dict[str, Tensor]:
        tensors, i2t_share = self.sequences(batch, i2t_ratio, caption_dropout)
        out = (self.compiled_forward or self.model)(**tensors, cell_weights=cell_weights)
        # Per-task means weighted by the task's share of rows: 64 image codes do not drown a caption.
        loss = (1.0 - i2t_share) * out.image_loss + i2t_share * out.text_loss
        return {"loss": loss, "image_loss": out.image_loss, "text_loss": out.text_loss}

    def training_step(self, batch, batch_idx):
        h = self.hparams
        losses = self.shared_step(batch, h.i2t_ratio, h.caption_dropout, self.cell_weights)
        size = len(batch["caption"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        if 0 < h.i2t_ratio < 1:
            self.log_dict({"train/image_loss": losses["image_loss"], "train/text_loss": losses["text_loss"]},
                          batch_size=size)
        return losses["loss"]

    def validation_step(self, batch, batch_idx):
        # Both directions on every validation row: comparable numbers whatever the training mix.
        t2i = self.shared_step(batch, 0.0, 0.0)["image_loss"]
        metrics = {"val/image_loss": t2i}
        loss = t2i
        if self.hparams.i2t_ratio > 0:
            i2t = self.shared_step(batch, 1.0, 0.0)["text_loss"]
            metrics["val/text_loss"] = i2t
            loss = (1.0 - self.hparams.i2t_ratio) * t2i + self.hparams.i2t_ratio * i2t
        self.log_dict(metrics | {"val/loss": loss}, sync_dist=True, batch_size=len(batch["caption"]))

    # --- export -------------------------------------------------------------------------------

    def on_fit_end(self) -> None:
        if not self.hparams.export_dir:
            return
        state = full_tensors(trainable_state_dict(self.model))  # FSDP: every rank gathers, rank 0 writes
        if self.trainer.is_global_zero:
            directory = Path(self.hparams.export_dir)
            staging = directory.with_name(directory.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            self.model.save_pretrained(staging, store_text_model=False, state=state)  # experts only; Qwen by path
            _replace_dir(staging, directory)
            print(f"MARS weights saved to {directory}")
