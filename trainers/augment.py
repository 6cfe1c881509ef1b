"""Training augmentation on the device: random crop with padding and horizontal flip.

Every function takes a (B, C, H, W) float batch already on its device and a
`torch.Generator`; the random draws are a few (B,) tensors made with that generator, so
the same seed gives the same augmentation (on one device type). No Python loop over
images: crops are one gather, flips one `torch.where` (after airbench).

Padding: `mode="constant"` pads with zeros. Applied after normalisation (as the workloads
do) a zero is the dataset mean colour, which is what He et al. / Zagoruyko's zero padding
of mean-subtracted images and Hoffer's fill-127 padding amount to. `mode="reflect"`
mirrors the border instead (airbench's choice); it needs padding < H and < W.

The generator may live on another device than the batch (e.g. a CPU generator for a CUDA
batch): draws are made on the generator's device and moved to the batch's.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PadMode = Literal["constant", "reflect"]


def _draw_integers(high: int, count: int, generator: torch.Generator, device: torch.device):
    draws = torch.randint(0, high, (count,), generator=generator, device=generator.device)
    return draws.to(device)


def _draw_coins(count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    draws = torch.rand((count,), generator=generator, device=generator.device) < 0.5
    return draws.to(device)


def crop_windows(padded: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                 height: int, width: int) -> torch.Tensor:
    """Image b of the result is padded[b, :, top[b]:top[b]+height, left[b]:left[b]+width]."""
    batch = padded.shape[0]
    rows = top[:, None] + torch.arange(height, device=padded.device)  # (B, H)
    cols = left[:, None] + torch.arange(width, device=padded.device)  # (B, W)
    index_b = torch.arange(batch, device=padded.device)[:, None, None]  # (B, 1, 1)
    # Advanced indices split by a slice put their broadcast shape first: (B, H, W, C).
    windows = padded[index_b, :, rows[:, :, None], cols[:, None, :]]
    return windows.permute(0, 3, 1, 2)  # (B, C, H, W)


def random_crop(x: torch.Tensor, generator: torch.Generator, *, padding: int,
                mode: PadMode = "constant") -> torch.Tensor:
    """Pad each side by `padding` pixels, then take a random H x W window per image
    (offsets uniform in 0..2*padding). padding=0 returns x unchanged."""
    if padding == 0:
        return x
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), mode=mode)  # (B, C, H+2p, W+2p)
    top = _draw_integers(2 * padding + 1, batch, generator, x.device)
    left = _draw_integers(2 * padding + 1, batch, generator, x.device)
    return crop_windows(padded, top, left, height, width)


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images whose entry of the (B,) bool `mask` is True."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    return flip_where(x, _draw_coins(x.shape[0], generator, x.device))


def crop_and_flip(x: torch.Tensor, generator: torch.Generator, *, padding: int = 4,
                  mode: PadMode = "constant") -> torch.Tensor:
    """The standard CIFAR augmentation: random crop with padding, then a random flip.
    Draw order (crop rows, crop columns, flips) is fixed, so a seed fixes the result."""
    return random_flip(random_crop(x, generator, padding=padding, mode=mode), generator)
