"""VQ image tokenizer: a convolutional encoder/decoder around a vector-quantize-pytorch quantizer.

Images (B, 3, H, W) in [-1, 1] become a grid of discrete codes (B, H/f, W/f) and back. The
default quantizer follows LlamaGen: l2-normalised (cosine) codes in an 8-dimensional codebook
space, k-means initialised, EMA-updated, dead codes replaced by fresh encoder outputs; FSQ is the
config alternative. Plain torch: training lives in train/vq.py.

    from vq import VQConfig, VQTokenizer
    tok = VQTokenizer.from_pretrained("checkpoints/mars-shapes/vq")
    codes = tok.encode(images)          # LongTensor (B, H/16, W/16)
    images = tok.decode(codes)          # (B, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class VQConfig:
    """Every architectural choice of the tokenizer; `downsample` (f) is derived."""

    # defaults: the shipped shapes-world tokenizer (f = 16, 3.3 M parameters)
    patch_size: int = 4  # pixels folded into channels before the first conv (and unfolded after the last)
    channels: int = 64  # encoder width at the first resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one per resolution: f = patch_size * 2 ** (len - 1)
    decoder_channels: int | None = None  # decoder width at the last resolution (None: = channels)
    res_blocks: int = 1  # per encoder resolution
    decoder_res_blocks: int | None = 2  # per decoder resolution (None: = res_blocks)
    latent_dim: int = 128  # channels of the grid handed to the quantizer
    quantizer: str = "vq"  # "vq" (cosine codebook) or "fsq"
    codebook_size: int = 256  # vq only; fsq's is prod(fsq_levels)
    codebook_dim: int = 8  # vq: low-dimensional code space (LlamaGen)
    kmeans_init: bool = True
    ema_decay: float = 0.8
    dead_code_threshold: float = 0.03  # EMA uses per batch below which a code is re-seeded
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    downsample: int = field(init=False)

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        self.fsq_levels = tuple(self.fsq_levels)
        self.decoder_channels = self.decoder_channels or self.channels
        self.decoder_res_blocks = self.decoder_res_blocks or self.res_blocks
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"VQConfig.quantizer={self.quantizer!r} is unknown: use one of {sorted(QUANTIZERS)}")
        if self.quantizer == "fsq":
            self.codebook_size = math.prod(self.fsq_levels)
        self.downsample = self.patch_size * 2 ** (len(self.channel_mults) - 1)

    @classmethod
    def from_name(cls, name: str, **overrides) -> VQConfig:
        if name not in VQ_PRESETS:
            raise ValueError(f"unknown VQ preset {name!r}: use one of {sorted(VQ_PRESETS)}")
        return cls(**{**VQ_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "downsample"}


VQ_PRESETS = {
    # unit tests: f = 4, a few thousand parameters
    "tiny": dict(patch_size=1, channels=8, channel_mults=(1, 2, 2), decoder_res_blocks=1, latent_dim=16,
                 codebook_size=64, kmeans_init=False),
    # the shipped shapes-world tokenizer, 128 px -> 8x8 codes, 256 px -> 16x16 (the defaults;
    # train/configs/shapes_vq.yaml trains exactly this, and a test keeps the two equal)
    "shapes-f16": dict(),
    # the same at f = 8 (128 px -> 16x16 codes)
    "shapes-f8": dict(channel_mults=(1, 2)),
}


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.skip(x) + self.block(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling then a conv: no checkerboard, unlike a transposed conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def stage(in_channels: int, out_channels: int, blocks: int) -> list[nn.Module]:
    return [ResBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(blocks)]


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mults]
        self.patch_size = cfg.patch_size
        layers: list[nn.Module] = [nn.Conv2d(3 * cfg.patch_size**2, widths[0], 3, padding=1)]
        for level, width in enumerate(widths):
            layers += stage(widths[max(level - 1, 0)], width, cfg.res_blocks)
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [ResBlock(widths[-1], widths[-1]), group_norm(widths[-1]), nn.SiLU(),
                   nn.Conv2d(widths[-1], cfg.latent_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images):  # (B, 3, H, W) -> (B, D, H/f, W/f)
        p = self.patch_size
        return self.layers(rearrange(images, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.decoder_channels * m for m in cfg.channel_mults][::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, widths[0], 3, padding=1), ResBlock(widths[0], widths[0])]
        for level, width in enumerate(widths):
            layers += stage(widths[max(level - 1, 0)], width, cfg.decoder_res_blocks)
            if level < len(widths) - 1:
                layers.append(Upsample(width))
        layers += [group_norm(widths[-1]), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.patch_size = cfg.patch_size
        # kept apart: the GAN's adaptive weight reads it
        self.conv_out = nn.Conv2d(widths[-1], 3 * cfg.patch_size**2, 3, padding=1)

    def forward(self, latents):  # (B, D, h, w) -> (B, 3, h*f, w*f)
        p = self.patch_size
        return rearrange(self.conv_out(self.layers(latents)), "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p)


class Quantized(NamedTuple):
    latents: torch.Tensor  # (B, N, D) quantized, straight-through gradients to the input
    codes: torch.Tensor  # (B, N) long
    commitment: torch.Tensor  # scalar, unweighted (zero for FSQ)


class CosineVQ(nn.Module):
    """VectorQuantize over (B, N, D) with codes compared by cosine in a codebook_dim space."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.vq = VectorQuantize(
            dim=cfg.latent_dim, codebook_size=cfg.codebook_size, codebook_dim=cfg.codebook_dim,
            use_cosine_sim=True, kmeans_init=cfg.kmeans_init, decay=cfg.ema_decay,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            commitment_weight=1.0,  # weighted in vq.losses, with the other terms
        )

    def forward(self, z, freeze_codebook: bool = False) -> Quantized:
        latents, codes, commitment = self.vq(z, freeze_codebook=freeze_codebook)
        return Quantized(latents, codes, commitment)

    def lookup(self, codes):  # (B, N) -> (B, N, D)
        return self.vq.get_output_from_indices(codes)


class ScalarVQ(nn.Module):
    """Finite scalar quantization: an implicit codebook, nothing to initialise or re-seed."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.fsq = FSQ(levels=list(cfg.fsq_levels), dim=cfg.latent_dim)

    def forward(self, z, freeze_codebook: bool = False) -> Quantized:
        latents, codes = self.fsq(z)
        return Quantized(latents, codes.long(), z.new_zeros(()))

    def lookup(self, codes):  # (B, N) -> (B, N, D)
        return self.fsq.indices_to_codes(codes)


QUANTIZERS = {"vq": CosineVQ, "fsq": ScalarVQ}


class VQOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, 3, H, W), unclamped
    codes: torch.Tensor  # (B, H/f, W/f) long
    commitment: torch.Tensor  # scalar


class VQTokenizer(nn.Module):
    """Encoder -> quantizer -> decoder. `forward` trains; `encode`/`decode` are the checked public API."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = QUANTIZERS[config.quantizer](config)
        self.decoder = Decoder(config)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def quantize(self, images, freeze_codebook: bool = False) -> tuple[torch.Tensor, Quantized]:
        z = self.encoder(images)  # (B, D, h, w)
        h = z.shape[-2]
        # Code choice and the EMA codebook update in float32 under bf16 training: bf16 cosines flip near-ties.
        with torch.autocast(z.device.type, enabled=False):
            q = self.quantizer(rearrange(z.float(), "b d h w -> b (h w) d"), freeze_codebook=freeze_codebook)
        latents = rearrange(q.latents, "b (h w) d -> b d h w", h=h)
        return latents, q._replace(codes=rearrange(q.codes, "b (h w) -> b h w", h=h))

    def forward(self, images) -> VQOutput:
        latents, q = self.quantize(images)
        return VQOutput(self.decoder(latents), q.codes, q.commitment)

    def latents_from_codes(self, codes):  # (B, h, w) -> (B, D, h, w)
        h = codes.shape[1]
        latents = self.quantizer.lookup(rearrange(codes, "b h w -> b (h w)"))
        return rearrange(latents, "b (h w) d -> b d h w", h=h)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [-1, 1], H and W multiples of f -> LongTensor (B, H/f, W/f)."""
        self._check_images(images)
        _, q = self.quantize(images.to(self.device, torch.float32), freeze_codebook=True)
        return q.codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor codes (B, h, w) in [0, codebook_size) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        self._check_codes(codes)
        return self.decoder(self.latents_from_codes(codes.to(self.device))).clamp(-1.0, 1.0)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_images(self, images):
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"encode expects float images (B, 3, H, W) in [-1, 1], got {shape}: "
                             "convert PIL images with vq.images_to_tensor")
        if not images.is_floating_point():
            raise ValueError(f"encode expects float images in [-1, 1], got dtype {images.dtype}: "
                             "use vq.images_to_tensor or images.float() / 127.5 - 1")
        f = self.downsample
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the downsampling factor "
                             f"{f}: resize or crop to a multiple of {f} (e.g. 128 or 256)")

    def _check_codes(self, codes):
        if not torch.is_tensor(codes) or codes.ndim != 3 or codes.is_floating_point():
            shape = tuple(codes.shape) if torch.is_tensor(codes) else type(codes).__name__
            raise ValueError(f"decode expects integer codes (B, h, w), got {shape}: pass what encode returned")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes range over [{codes.min().item()}, {codes.max().item()}] but the codebook has "
                             f"{self.codebook_size} entries: pass codes in [0, {self.codebook_size - 1}]")

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Writes config.json and model.safetensors (no pickle) into `directory`.

        dtype=torch.float16 halves the file; from_pretrained loads it back into float32."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        # the EMA buffers travel too: a reloaded tokenizer encodes identically and can train on
        tensors = {k: v.detach().cpu().to(dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
                   for k, v in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> VQTokenizer:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: point at a directory written by VQTokenizer.save_pretrained "
                                        "(or run `python -m vq export --ckpt last.ckpt --out DIR`)")
        try:
            config = VQConfig(**json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{config_path} is not a valid VQConfig ({error}): re-export the tokenizer") from None
        try:
            state = load_file(weights_path, device=str(map_location))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{weights_path} is corrupt ({error}): re-export the tokenizer") from None
        model = cls(config)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
            raise ValueError(f"{weights_path} does not match {config_path} ({first}): "
                             "re-export config and weights together") from None
        return model.to(map_location).eval()


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float (B, 3, H, W) in [-1, 1]."""
    if not images:
        raise ValueError("images_to_tensor got an empty list: pass at least one PIL image")
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"images_to_tensor got several sizes {sorted(sizes)}: resize them to one size first")
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])  # (B, H, W, 3)
    return rearrange(torch.from_numpy(array), "b h w c -> b c h w").float() / 127.5 - 1.0


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """Float (B, 3, H, W) in [-1, 1] -> PIL RGB images (values outside [-1, 1] are clipped)."""
    if images.ndim == 3:
        images = images[None]
    pixels = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(array) for array in rearrange(pixels, "b c h w -> b h w c").cpu().numpy()]
