"""Lightning callbacks of the MARS stages: a non-finite-loss guard and the shapes-world evaluator.

    FiniteLossGuard     stops the run with a clear error on a NaN/inf training loss, before any
                        checkpoint of the broken weights is written (all ranks stop together).
    EMAWeights          an exponential moving average of the trainable weights: validation, the
                        shapes evaluation and the export use it (it is in every checkpoint too).
    ShapesEvalCallback  every N steps (and at the end of fit): generate images for the spec's
                        category prompts (English and Chinese), decode them with the VQ, score
                        them with mars.shapes, log per-category accuracy (plain and strict) and
                        a grid of samples (TensorBoard image and PNG under the run's log dir).

Used from the stage YAMLs in train/configs/ (trainer.callbacks).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import torch
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_only

from mars.eval import category_prompts
from mars.sampling import generate_images
from mars.shapes import LANGS, score, summarize


class FiniteLossGuard(L.Callback):
    """Raises FloatingPointError when the training loss is NaN or infinite on any rank.

    Lightning runs checkpoint callbacks after all others, so the step that produced the bad loss
    is never saved; `last.ckpt` keeps the last good state to resume from.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return  # manual optimisation modules return nothing
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            value = loss.detach().float().item()
            raise FloatingPointError(
                f"training loss is {value} at batch {batch_idx} (on some rank; {trainer.global_step} optimizer steps "
                "done): "
                "stopped before checkpointing it. Rerun the same command to resume from the last checkpoint with a "
                "lower optim.lr, precision 32 or trainer.gradient_clip_val")


class EMAWeights(L.Callback):
    """Keeps `ema = decay * ema + (1 - decay) * w` for every trainable parameter after each optimizer step.

    The average of a noisy end of training samples better than its last step, for the price of one
    copy of the trainable weights. The decay ramps up as (1 + n) / (10 + n) so the first steps are not
    dominated by the initial weights. The average stands in for the weights during validation and the
    shapes evaluation, and replaces them for good when fit ends, so the module's export writes it.
    Its state is saved in the checkpoint and restored on resume.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must lie in [0, 1)")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0
        self._pending: dict[str, torch.Tensor] | None = None  # restored from a checkpoint before the module exists
        self._trained: dict[str, torch.Tensor] | None = None  # the trained weights while validation sees the EMA

    @staticmethod
    def _trainable(pl_module) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module) -> None:
        params = self._trainable(pl_module)
        source = self._pending or {}
        if source and set(source) != set(params):
            raise ValueError("the checkpoint's EMA weights belong to another model: resume with the config that "
                             "wrote it, or start a fresh run directory")
        self.shadow = {name: source.get(name, p.detach()).to(p.device, torch.float32).clone()
                       for name, p in params.items()}
        self._pending = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self.updates:  # gradient accumulation: no optimizer step yet
            return
        self.updates = trainer.global_step
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self._trainable(pl_module).items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def _swap_in(self, pl_module) -> dict[str, torch.Tensor]:
        """Put the EMA weights in place of the trained ones; returns the trained ones."""
        saved = {}
        for name, p in self._trainable(pl_module).items():
            saved[name] = p.detach().clone()
            p.copy_(self.shadow[name])
        return saved

    @staticmethod
    @torch.no_grad()
    def _restore(pl_module, saved: dict[str, torch.Tensor]) -> None:
        for name, p in EMAWeights._trainable(pl_module).items():
            p.copy_(saved[name])

    @contextmanager
    def swapped_in(self, pl_module):
        """The EMA weights in place of the trained ones for the duration of the block."""
        saved = self._swap_in(pl_module)
        try:
            yield
        finally:
            self._restore(pl_module, saved)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.shadow and not trainer.sanity_checking:
            self._trained = self._swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._trained is not None:
            self._restore(pl_module, self._trained)
            self._trained = None

    def on_fit_end(self, trainer, pl_module) -> None:
        # Callbacks' on_fit_end runs before the module's, whose export then writes the average.
        if self.shadow:
            self._restore(pl_module, self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self._pending = state["shadow"]


def ema_of(trainer) -> EMAWeights | None:
    return next((c for c in trainer.callbacks if isinstance(c, EMAWeights)), None)


def image_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 (3, rows*H, columns*W), white where the grid has no image."""
    rows = math.ceil(len(images) / columns)
    pad = images.new_ones(rows * columns - len(images), *images.shape[1:])
    pixels = ((torch.cat([images, pad]).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(pixels, "(r c) ch h w -> ch (r h) (c w)", c=columns)


class ShapesEvalCallback(L.Callback):
    """Scores generated shapes-world images every `every_n_steps` optimizer steps (rank zero only).

    vq: the VQ tokenizer directory the codes came from. Logs eval/overall, eval/overall_strict and
    eval/<category>, eval/<category>_strict; writes samples/step_<N>.png + eval/step_<N>.json under
    the logger's directory (or trainer.default_root_dir).
    """

    def __init__(self, vq: str, every_n_steps: int = 500, num_prompts: int = 48, guidance_scale: float = 3.0,
                 temperature: float = 1.0, top_k: int | None = None, batch_size: int = 16, log_images: int = 16,
                 seed: int = 0, at_fit_end: bool = True):
        super().__init__()
        if every_n_steps < 1 or num_prompts < 1:
            raise ValueError(f"every_n_steps={every_n_steps} and num_prompts={num_prompts} must be >= 1")
        self.vq_dir, self.every_n_steps, self.num_prompts = vq, every_n_steps, num_prompts
        self.sampling = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k)
        self.batch_size, self.log_images, self.seed, self.at_fit_end = batch_size, log_images, seed, at_fit_end
        self.vq = None
        self.last_step = -1
        self.last_summary: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from vq import VQTokenizer

        if self.vq is None:  # at fit start: a wrong path fails now, not after hours of training
            self.vq = VQTokenizer.from_pretrained(self.vq_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.at_fit_end and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    @rank_zero_only
    def evaluate(self, trainer, pl_module) -> dict:
        self.last_step = step = trainer.global_step
        model, tokenizer = pl_module.model, pl_module.prompt_tokenizer
        self.setup(trainer, pl_module, "fit")
        self.vq.to(pl_module.device)
        prompts = [row["prompt"] for row in category_prompts(self.num_prompts, LANGS, self.seed)]
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)  # never the global RNG
        was_training = model.training
        model.eval()
        images = []
        ema = ema_of(trainer)
        with ema.swapped_in(pl_module) if ema and ema.shadow else nullcontext(), torch.inference_mode():
            for first in range(0, len(prompts), self.batch_size):
                chunk = [tokenizer.encode(p) for p in prompts[first:first + self.batch_size]]
                codes = generate_images(model, chunk, generator=generator, **self.sampling)  # (b, h, w)
                images.append(self.vq.decode(codes).float().cpu())  # (b, 3, H, W)
        model.train(was_training)
        images = torch.cat(images)
        from vq import tensor_to_images

        summary = summarize([score(p, im) for p, im in zip(prompts, tensor_to_images(images))])
        metrics = {"eval/overall": summary["overall"], "eval/overall_strict": summary["overall_strict"]}
        for category, result in summary["categories"].items():
            metrics[f"eval/{category}"], metrics[f"eval/{category}_strict"] = result["accuracy"], result["strict"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._write(trainer, step, images[:self.log_images], prompts[:self.log_images], summary)
        self.last_summary = summary
        return summary

    def _write(self, trainer, step: int, images: torch.Tensor, prompts: list[str], summary: dict) -> None:
        from PIL import Image

        root = Path(trainer.log_dir or trainer.default_root_dir)
        grid = image_grid(images, columns=min(8, len(images)))  # (3, H', W') uint8
        (root / "samples").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rearrange(grid, "c h w -> h w c").numpy()).save(root / "samples" / f"step_{step:07d}.png")
        record = {"step": step, "prompts_in_grid": prompts, **summary}
        (root / "samples" / f"step_{step:07d}.json").write_text(json.dumps(record, ensure_ascii=False, indent=1))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard (tensorboardX or tensorboard)
                experiment.add_image("samples", grid.numpy(), global_step=step)
