"""Lightning training of the VQ tokenizer (vq/) on images at mixed sizes: shapes-world scenes or an image folder.

    python -m train fit --config train/configs/shapes_vq.yaml
    python -m train fit --config train/configs/emoji_vq.yaml    # a folder (path: its train/, val_path: its test/)

An image folder (captions.jsonl; the emoji set, or your own) is read at every size the tokenizer will
encode (the base model's and super-resolution's), each resized from the file as code extraction does;
`val_verdicts: false` there (the shapes scorer's verdicts mean nothing for other images).

`VQLitModule`: L1 + L2 (edge-weighted) reconstruction, commitment, optional LPIPS (local weights
only) and a PatchGAN discriminator after a warm-up step, under manual optimisation. Logs PSNR and
SSIM per image size, scorer verdict agreement on the validation images, and codebook usage and
perplexity every epoch; exports the tokenizer with save_pretrained at the end of fit.
`MixedSizeImages`: batches that alternate image sizes; batch g of a run depends only on g, so a resumed
run (python -m train's auto-resume) sees the same data.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from mars.eval import verdicts_agree
from train.codes import resume_batch
from train.data import ImageCaptionFolder, ShapesWorldDataset, collate_captions, distributed_rank
from train.modules import warmup_cosine
from vq.losses import LPIPS, PatchDiscriminator, VQLossConfig, adaptive_gan_weight, hinge_discriminator_loss, \
    reconstruction_loss
from vq.model import VQConfig, VQTokenizer
from vq.reconstruct import codebook_stats


class MixedSizeBatches(IterableDataset):
    """Whole batches of images; global batch g has sizes[g % len(sizes)] and batch_sizes[...]: shapes-world
    scenes, or the images of `folder` (its captions.jsonl), each resized from its file.

    Batch g is a pure function of (seed, g, rank): shapes batches show new scenes every time, a folder's
    show every image once a pass over it, in an order drawn for that pass; DataLoader workers and DDP
    ranks share the work without overlap. An epoch is `batches` consecutive global batches; iteration
    starts at `start_batch` (set from the restored global step, see MixedSizeImages) and ends with that
    batch's epoch, so a resumed run, even one killed mid-epoch, sees exactly the batches an uninterrupted
    one would."""

    start_batch = 0

    def __init__(self, sizes: tuple[int, ...], batch_sizes: tuple[int, ...], batches: int, seed: int,
                 folder: str | Path | None = None):
        if len(sizes) != len(batch_sizes):
            raise ValueError(f"sizes {sizes} and batch_sizes {batch_sizes} need one entry each")
        if batches < 1:
            raise ValueError(f"batches={batches}: an epoch needs at least one batch")
        self.batch_sizes, self.batches, self.seed = batch_sizes, batches, seed
        if folder is None:
            self.sources = [ShapesWorldDataset(size, None, seed * 1000 + j, lang="both", captions="category")
                            for j, size in enumerate(sizes)]
        else:
            self.sources = [ImageCaptionFolder(folder, size, lang="en") for size in sizes]  # one item an image
        self._order: tuple[tuple[int, int], np.ndarray] | None = None  # the last (size, pass) order drawn

    def __len__(self) -> int:
        return self.batches

    def item(self, j: int, p: int) -> dict:
        """Item p of size j's stream: scene p, or a folder's image at place p % n of pass p // n."""
        source = self.sources[j]
        if isinstance(source, ImageCaptionFolder):
            key = (j, p // len(source))
            if self._order is None or self._order[0] != key:
                self._order = key, np.random.default_rng([self.seed, *key]).permutation(len(source))
            p = int(self._order[1][p % len(source)])
        return source[p]

    def make_batch(self, g: int, rank: int = 0, world: int = 1) -> dict:
        """Global batch g: rank `rank` of `world` builds its own rows of it."""
        j = g % len(self.sources)
        size = self.batch_sizes[j]
        first = ((g // len(self.sources)) * world + rank) * size
        return collate_captions([self.item(j, p) for p in range(first, first + size)])

    def __iter__(self):
        rank, world = distributed_rank(None, None)
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        end = (self.start_batch // self.batches + 1) * self.batches  # the end of start_batch's epoch
        for g in range(self.start_batch + worker, end, workers):  # workers are read round-robin: order is kept
            yield self.make_batch(g, rank, world)


class MixedSizeImages(L.LightningDataModule):
    """Batches alternating between sizes (default 128 and 256 px; equal pixels a batch keeps steps even):
    shapes-world scenes, or with `path` an image folder (captions.jsonl) whose images are read at each
    size, validated on `val_path` (or on `path` in another order)."""

    def __init__(self, sizes: tuple[int, ...] = (128, 256), batch_sizes: tuple[int, ...] = (16, 4),
                 batches_per_epoch: int = 200, val_batches: int = 4, num_workers: int = 0, seed: int = 0,
                 path: str | None = None, val_path: str | None = None):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        self.train_set = MixedSizeBatches(h.sizes, h.batch_sizes, h.batches_per_epoch, h.seed, h.path)
        self.val_set = MixedSizeBatches(h.sizes, h.batch_sizes, h.val_batches, h.seed + 1, h.val_path or h.path)

    def _loader(self, dataset: MixedSizeBatches) -> DataLoader:
        workers = self.hparams.num_workers
        # Workers are made afresh each epoch, so they read the start_batch set at the epoch's start.
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                          prefetch_factor=4 if workers else None)

    def train_dataloader(self) -> DataLoader:
        # Lightning iterates the first epoch's loader before on_train_epoch_start runs (VQLitModule
        # moves start_batch on for later epochs): a resumed run starts where its checkpoint stopped.
        self.train_set.start_batch = resume_batch(self.trainer)
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)


class VQLitModule(L.LightningModule):
    """Trains a VQTokenizer. `global_step` counts tokenizer updates (the discriminator's are not counted)."""

    def __init__(self, vq: VQConfig | None = None, loss: VQLossConfig | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.99), warmup_steps: int = 100, min_lr_ratio: float = 0.02,
                 grad_clip: float = 1.0, export_dir: str | None = None, export_dtype: str = "float32",
                 val_verdicts: bool = True):
        super().__init__()
        self.vq_config = vq or VQConfig()
        self.loss_config = loss or VQLossConfig()
        # plain values only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"vq": self.vq_config.to_dict(), "loss": asdict(self.loss_config), "lr": lr,
                                   "betas": tuple(betas), "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
                                   "grad_clip": grad_clip, "export_dir": export_dir, "export_dtype": export_dtype,
                                   "val_verdicts": val_verdicts})
        self.automatic_optimization = False
        self.tokenizer = VQTokenizer(self.vq_config)
        cfg = self.loss_config
        self.discriminator = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers) if cfg.gan_weight > 0 else None
        self.lpips = LPIPS.from_file(cfg.lpips_path) if cfg.perceptual_weight > 0 else None
        # code histograms for usage and perplexity, reset every epoch
        self.register_buffer("train_code_counts", torch.zeros(self.vq_config.codebook_size), persistent=False)
        self.register_buffer("val_code_counts", torch.zeros(self.vq_config.codebook_size), persistent=False)
        self.val_metrics = torch.nn.ModuleDict()  # per image size, made on first sight

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        h = self.hparams
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 10_000
        opt = torch.optim.Adam(self.tokenizer.parameters(), lr=h.lr, betas=h.betas)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, h.warmup_steps, total, h.min_lr_ratio))
        if self.discriminator is None:
            return [opt], [schedule]
        disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=h.lr, betas=(0.5, 0.9))
        return [opt, disc_opt], [schedule]

    def on_train_epoch_start(self):
        dataset = self.trainer.train_dataloader.dataset
        if isinstance(dataset, MixedSizeBatches):
            dataset.start_batch = resume_batch(self.trainer)  # this epoch's batches (its loader is iterated next)

    def training_step(self, batch, batch_idx):
        cfg, images = self.loss_config, batch["image"]
        optimizers = self.optimizers()
        opt, disc_opt = optimizers if isinstance(optimizers, list) else (optimizers, None)
        out = self.tokenizer(images)
        rec = reconstruction_loss(out.reconstruction, images, cfg)
        terms = {"rec": rec, "commit": out.commitment}
        nll = rec + (cfg.perceptual_weight * self.lpips(out.reconstruction, images) if self.lpips else 0.0)
        loss = nll + cfg.commitment_weight * out.commitment
        gan_on = disc_opt is not None and self.global_step >= cfg.gan_start_step
        if gan_on:
            self.discriminator.requires_grad_(False)
            gen = -self.discriminator(out.reconstruction).mean()
            weight = cfg.gan_weight * adaptive_gan_weight(nll, gen, self.tokenizer.decoder.conv_out.weight)
            loss = loss + weight * gen
            terms |= {"gen": gen, "gan_weight": weight}
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.lr_schedulers().step()
        if gan_on:
            self.discriminator.requires_grad_(True)
            disc = hinge_discriminator_loss(self.discriminator(images), self.discriminator(out.reconstruction.detach()))
            disc_opt.zero_grad(set_to_none=True)
            self.manual_backward(disc)
            disc_opt.optimizer.step()  # the raw optimizer: a LightningOptimizer step would advance global_step
            terms["disc"] = disc
        self.train_code_counts += torch.bincount(out.codes.flatten(), minlength=self.train_code_counts.numel())
        self.log_dict({f"train/{k}": v for k, v in terms.items()} | {"train/loss": loss}, prog_bar=False)
        self.log(f"train/psnr_{images.shape[-1]}", psnr(out.reconstruction.detach(), images), prog_bar=True)

    def on_train_epoch_end(self):
        self.log_dict(prefixed(codebook_stats(self.trainer.strategy.reduce(self.train_code_counts, reduce_op="sum")), "train"))
        self.train_code_counts.zero_()

    # ------------------------------------------------------------------ validation and export

    def validation_step(self, batch, batch_idx):
        images = batch["image"]
        out = self.tokenizer(images)
        reconstruction = out.reconstruction.clamp(-1, 1)
        key = str(images.shape[-1])
        if key not in self.val_metrics:
            self.val_metrics[key] = MetricCollection({
                "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)}, prefix="val/", postfix=f"_{key}",
            ).to(self.device)
        # in float32 outside autocast: SSIM's convolutions in bf16 stray above 1
        with torch.autocast(self.device.type, enabled=False):
            self.val_metrics[key].update((reconstruction.float() + 1) / 2, (images.float() + 1) / 2)
        self.val_code_counts += torch.bincount(out.codes.flatten(), minlength=self.val_code_counts.numel())
        if self.hparams.val_verdicts:
            agree = verdicts_agree(batch["caption"], images, reconstruction)
            self.log(f"val/agreement_{key}", sum(agree) / len(agree), batch_size=len(agree))

    def on_validation_epoch_end(self):
        for metrics in self.val_metrics.values():  # computed here: the per-size metrics are made lazily
            self.log_dict(metrics.compute(), sync_dist=False)
            metrics.reset()
        self.log_dict(prefixed(codebook_stats(self.trainer.strategy.reduce(self.val_code_counts, reduce_op="sum")), "val"))
        self.val_code_counts.zero_()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["vq_config"] = self.vq_config.to_dict()  # what `python -m vq export` rebuilds from

    def on_fit_end(self):
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.tokenizer.save_pretrained(self.hparams.export_dir, getattr(torch, self.hparams.export_dtype))
            print(f"tokenizer saved to {self.hparams.export_dir}")


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstruction.clamp(-1, 1) - target).square().flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


def prefixed(figures: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{name}": value for name, value in figures.items()}
