"""Losses for training the VQ tokenizer: edge-weighted reconstruction, LPIPS, PatchGAN.

The codebook itself is updated by EMA inside vector-quantize-pytorch (the VQ-VAE alternative to a
codebook loss, and the only option it offers for cosine codebooks); the commitment term comes
back from the quantizer and is weighted here with the rest. Used by train/vq.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


@dataclass
class VQLossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    # extra weight on pixels near colour edges (target gradient, dilated): edges decide shape and
    # colour fringes but are a few percent of the pixels
    edge_weight: float = 0.0
    edge_radius: int = 2
    commitment_weight: float = 0.25
    perceptual_weight: float = 0.0
    lpips_path: str | None = None  # local LPIPS-VGG16 weights; nothing is ever downloaded
    gan_weight: float = 0.0  # 0 switches the discriminator off
    gan_start_step: int = 2000  # the discriminator joins once reconstructions are roughly right
    disc_channels: int = 32
    disc_layers: int = 3

    def __post_init__(self):
        if self.perceptual_weight > 0 and not self.lpips_path:
            raise ValueError("perceptual_weight > 0 needs lpips_path: a local file with LPIPS-VGG16 weights "
                             "(or set perceptual_weight: 0)")


def edge_map(target: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) in {0, 1}: pixels within `radius` of a colour change."""
    dx = (target[..., :, 1:] - target[..., :, :-1]).abs().amax(1, keepdim=True)  # (B, 1, H, W-1)
    dy = (target[..., 1:, :] - target[..., :-1, :]).abs().amax(1, keepdim=True)  # (B, 1, H-1, W)
    edges = F.pad(dx, (0, 1)).maximum(F.pad(dy, (0, 0, 0, 1))) > 0.05
    return F.max_pool2d(edges.float(), 2 * radius + 1, stride=1, padding=radius)


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, cfg: VQLossConfig) -> torch.Tensor:
    """Per-pixel L1 + L2, pixels near edges weighted (1 + edge_weight); a scalar."""
    per_pixel = cfg.l1_weight * (reconstruction - target).abs() + cfg.l2_weight * (reconstruction - target).square()
    if cfg.edge_weight <= 0:
        return per_pixel.mean()
    weights = 1.0 + cfg.edge_weight * edge_map(target, cfg.edge_radius)  # (B, 1, H, W)
    return (per_pixel * weights).mean()


# ----------------------------------------------------------------------------- perceptual (LPIPS)

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) on a VGG16 trunk, weights from one local file, frozen.

    The file holds torchvision's `features.{i}.weight/bias` names for the trunk and the lpips
    package's `lin{k}.model.1.weight` for the five linear heads (safetensors or a torch state dict)."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for item in VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights {path} not found: give a local file (nothing is downloaded) "
                                    "or set perceptual_weight: 0")
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                 weights_only=True)
        state = {re.sub(r"^lin(\d)\.model\.1\.", r"lins.\1.", k): v for k, v in state.items()}
        model = cls()
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in ("shift", "scale")]
        if missing:
            raise ValueError(f"LPIPS weights {path} lack {missing[:3]}...: expected VGG16 `features.*` and `lin0..4`")
        return model.eval().requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # images in [-1, 1] -> scalar
        x, y = (a - self.shift) / self.scale, (b - self.shift) / self.scale
        total = a.new_zeros(())
        tap = 0
        for index, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if index == LPIPS_TAPS[tap]:
                nx, ny = F.normalize(x, dim=1, eps=1e-10), F.normalize(y, dim=1, eps=1e-10)
                total = total + self.lins[tap]((nx - ny).square()).mean()
                tap += 1
                if tap == len(LPIPS_TAPS):
                    break
        return total


# ----------------------------------------------------------------------------- adversarial

class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): a grid of real/fake logits, one per overlapping patch."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, out), out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images):  # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.net(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: scale the GAN term so its gradient at the decoder's last layer matches the
    reconstruction's, so neither drowns the other whatever their raw scales."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
