"""Batched random crop (zero padding) + horizontal flip, on whatever device the batch is on."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def random_crop_flip(
    x: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Per-image independent crop offsets in [0, 2*padding] and flips; no Python loop over images."""
    b, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        off_h = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
        off_w = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
        rows = (off_h[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (off_w[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        batch = torch.arange(b, device=dev)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(dev)
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    return x


def to_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return x.float().div_(255.0)
