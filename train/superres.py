"""The superres stage: train the multi-token super-resolution model (mars/superres.py) on extracted code pairs.

    python -m train fit --config train/configs/shapes_superres.yaml

Data: a codes directory (train/codes.py) holding every image at two sizes, e.g. 128 px -> 8x8 and
256 px -> 16x16 codes of the same scene; `SuperResCodesDataModule` checks the pair and hands out
{"low_codes", "high_codes", "caption", "seed"} batches. The target is the high-resolution grid;
the low grid is corrupted a little (`low_code_noise`) so the stage learns to repair base-stage
mistakes, and captions are dropped with `caption_dropout` so classifier-free guidance works.

The frozen Qwen and its tokenizer come from `text_model` (stage 0's export or any local Qwen
directory with tokenizer files), as in train/modules.py. `init_from` picks the starting point:
the stage-2 export (mars_config.json: experts and code embeddings carry over, its MarsConfig
switches are used), a SuperResModel export (continue it), a .ckpt of this module, or null (fresh
experts copied from the Qwen). Checkpoints hold the trainable weights only; `export_dir`
receives SuperResModel.save_pretrained (Qwen referenced by path) when fit ends.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from mars.config import MarsConfig, MemoryConfig
from mars.model import CONFIG_NAME, WEIGHTS_NAME, MarsModel, configure_memory, is_trainable
from mars.tokenizer import PromptTokenizer
from mars.superres import SUPERRES_CONFIG_NAME, SUPERRES_WEIGHTS_NAME, SuperResConfig, SuperResModel, \
    build_superres_batch, to_group_order
from train.codes import CodeBatches, CodesDataModule
from train.modules import OptimConfig, can_compile, configure_adamw


class PairBatches(CodeBatches):
    """CodeBatches plus `low_codes` / `high_codes`: the two sizes of the same images."""

    def __init__(self, batches: CodeBatches, low_size: int, high_size: int):
        super().__init__(batches.sampler, batches.batch_size, (low_size, high_size))
        self.low_size, self.high_size = low_size, high_size

    def make_batch(self, k: int, rank: int = 0, world: int = 1) -> dict:
        batch = super().make_batch(k, rank, world)
        return batch | {"low_codes": batch[f"codes_{self.low_size}"], "high_codes": batch[f"codes_{self.high_size}"]}


class SuperResCodesDataModule(CodesDataModule):
    """Super-resolution pairs from a codes directory extracted at `low_size` and `high_size` (2x)."""

    def __init__(self, path: str, low_size: int = 128, high_size: int = 256, batch_size: int = 16,
                 captions: str = "mixed", lang: str = "both", val_items: int = 64, val_batches: int = 2,
                 seed: int = 0, num_workers: int = 0, strict_captions: bool = False,
                 category_weights: dict[str, float] | None = None, concept_balance: float = 0.0):
        super().__init__(path, batch_size, (low_size, high_size), captions, lang, val_items, val_batches, seed,
                         num_workers, strict_captions, category_weights, concept_balance)
        # save_hyperparameters (in the parent) records this class's arguments, which name no `sizes`.
        self.hparams["sizes"] = (low_size, high_size)
        self.low_size, self.high_size = low_size, high_size

    def setup(self, stage: str | None = None) -> None:
        if isinstance(getattr(self, "train_set", None), PairBatches):
            return
        super().setup(stage)
        (h, w), high = self.code_set.grid(self.low_size), self.code_set.grid(self.high_size)
        if high != (2 * h, 2 * w):
            raise ValueError(f"{self.hparams.path}: codes at {self.high_size} px are {high}, not twice the "
                             f"{(h, w)} at {self.low_size} px; use sizes whose ratio is 2 (e.g. 128 and 256)")
        self.train_set = PairBatches(self.train_set, self.low_size, self.high_size)
        self.val_set = PairBatches(self.val_set, self.low_size, self.high_size)

    @property
    def low_grid(self) -> tuple[int, int]:
        return self.code_set.grid(self.low_size)


def build_model(text_model: str, init_from: str | None, group_size: int, low_grid: tuple[int, int],
                codebook_size: int, memory: MemoryConfig | None = None) -> SuperResModel:
    """The starting SuperResModel over the frozen Qwen in `text_model` (see the module docstring),
    memory levers applied before any weights load (fp32 experts whatever the Qwen's dtype)."""
    memory = memory or MemoryConfig()
    config = SuperResConfig(low_grid=tuple(low_grid), group_size=group_size)
    source = Path(init_from) if init_from else None
    if source is not None and source.is_dir() and (source / CONFIG_NAME).is_file():
        base = dataclasses.replace(MarsConfig.load(source / CONFIG_NAME), text_model=None)  # its switches
        if base.codebook_size != codebook_size or tuple(base.image_grid) != config.low_grid:
            raise ValueError(f"{source} predicts {base.codebook_size} codes on a {tuple(base.image_grid)} grid but "
                             f"the config asks for {codebook_size} on {config.low_grid}: make them agree")
    else:
        base = MarsConfig(codebook_size=codebook_size, image_grid=config.low_grid)
    mars = MarsModel.from_qwen(text_model, base, dtype=getattr(torch, memory.frozen_dtype))
    model = configure_memory(SuperResModel(config, mars), memory)
    if source is None:
        return model
    if source.is_dir() and (source / CONFIG_NAME).is_file():
        model.mars.load_trainable(source / WEIGHTS_NAME)  # stage 2's experts and code embeddings
        if (source / SUPERRES_CONFIG_NAME).is_file():  # a SuperResModel export: continue it
            if SuperResConfig.load(source / SUPERRES_CONFIG_NAME) != config:
                raise ValueError(f"{source} was trained with another group_size/low_grid than {config.to_dict()}")
            model.load_superres_trainable(source / SUPERRES_WEIGHTS_NAME)
    elif source.is_file():
        state = torch.load(source, map_location="cpu", weights_only=True).get("state_dict", {})
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        expected = {name: t.shape for name, t in model.state_dict().items() if is_trainable(name)}
        if set(state) != set(expected) or any(state[name].shape != shape for name, shape in expected.items()):
            raise ValueError(f"{source} does not hold this model's trainable weights (missing "
                             f"{sorted(set(expected) - set(state))[:3]}): was it trained with another group_size, "
                             "low_grid or codebook_size?")
        model.load_state_dict(state, strict=False)
    else:
        raise FileNotFoundError(f"init_from={source} not found: give the stage-2 export directory "
                                f"({CONFIG_NAME}), a SuperResModel directory or a .ckpt of this module")
    return model


class SuperResLitModule(L.LightningModule):
    """Teacher-forced cross-entropy over the high-resolution codes; optimiser over the trainable parts only.

    compile: training and validation steps through torch.compile, as in train.modules.MarsLitModule.
    """

    def __init__(self, text_model: str, tokenizer: str | None = None, init_from: str | None = None,
                 group_size: int = 4, low_grid: tuple[int, int] = (8, 8), codebook_size: int = 1024,
                 caption_dropout: float = 0.1, low_code_noise: float = 0.05, history_noise: float = 0.0,
                 compile: bool = False, optim: OptimConfig | None = None, memory: MemoryConfig | None = None,
                 export_dir: str | None = None):
        super().__init__()
        rates = {"caption_dropout": caption_dropout, "low_code_noise": low_code_noise, "history_noise": history_noise}
        if not all(0.0 <= rate < 1.0 for rate in rates.values()):
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in rates.items())} must each lie in [0, 1)")
        self.optim = optim or OptimConfig()
        self.memory = memory or MemoryConfig()
        self.save_hyperparameters({
            "text_model": text_model, "tokenizer": tokenizer, "init_from": init_from, "group_size": group_size,
            "low_grid": list(low_grid), "codebook_size": codebook_size, "caption_dropout": caption_dropout,
            "low_code_noise": low_code_noise, "history_noise": history_noise, "compile": compile,
            "optim": asdict(self.optim), "memory": asdict(self.memory), "export_dir": export_dir})
        self.model = build_model(text_model, init_from, group_size, tuple(low_grid), codebook_size, self.memory)
        # A compiled bound method, not a compiled module: a module attribute would enter the state dict twice.
        self.compiled_forward = torch.compile(self.model.forward, dynamic=True) if compile and can_compile() else None
        self.prompt_tokenizer = PromptTokenizer.from_pretrained(tokenizer or text_model)
        self.strict_loading = False  # checkpoints hold the trainable weights only (on_save_checkpoint)

    # ------------------------------------------------------------------ steps

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        code_set = getattr(data, "code_set", None)
        if code_set is not None and code_set.codebook_size != self.model.mars.config.codebook_size:
            raise ValueError(f"the codes were made with a {code_set.codebook_size}-entry codebook but the model "
                             f"predicts {self.model.mars.config.codebook_size}: set model.codebook_size to match")
        if isinstance(data, SuperResCodesDataModule) and data.low_grid != self.model.config.low_grid:
            raise ValueError(f"the low codes are {data.low_grid} but model.low_grid is {self.model.config.low_grid}")

    def _loss(self, batch: dict, train: bool):
        h = self.hparams
        generator = torch.Generator().manual_seed(int(batch["seed"]))  # the draws repeat on resume
        inputs = build_superres_batch(
            self.model, [self.prompt_tokenizer.encode(text) for text in batch["caption"]],
            batch["low_codes"].long(), batch["high_codes"].long(),
            caption_dropout=h.caption_dropout if train else 0.0,
            low_code_noise=h.low_code_noise if train else 0.0,
            history_noise=h.history_noise if train else 0.0, generator=generator)
        return (self.compiled_forward or self.model)(**inputs), inputs

    def training_step(self, batch, batch_idx):
        out, _ = self._loss(batch, train=True)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch["caption"]))
        return out.loss

    def validation_step(self, batch, batch_idx):
        out, inputs = self._loss(batch, train=False)
        targets = to_group_order(inputs["high_codes"], self.model.config)
        accuracy = (out.logits.argmax(-1) == targets).float().mean()
        size = len(batch["caption"])
        self.log_dict({"val/loss": out.loss, "val/token_accuracy": accuracy}, prog_bar=True, batch_size=size)

    # ------------------------------------------------------------------ optimisation and checkpoints

    def configure_optimizers(self):
        return configure_adamw(self, [(n, p) for n, p in self.model.named_parameters() if p.requires_grad], self.optim)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen Qwen comes back from text_model; a 0.5B checkpoint would otherwise be gigabytes.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_trainable(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted({k for k in self.state_dict() if is_trainable(k)} - set(checkpoint.get("state_dict", {})))
        if missing:
            raise ValueError(f"checkpoint lacks trainable weights {missing[:3]}: it belongs to another config")

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            directory = Path(self.hparams.export_dir)
            staging = directory.with_name(directory.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            self.model.save_pretrained(staging, store_text_model=False)  # trainable parts only; Qwen by path
            shutil.rmtree(directory, ignore_errors=True)  # an export is whole or absent
            staging.rename(directory)
            print(f"super-resolution model saved to {directory}")
