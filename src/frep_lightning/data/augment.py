"""Batched random crop (zero padding) + horizontal flip, on whatever device the batch is on.

One gather per batch instead of a Python loop over images, so it is cheap inside a collate
function on CPU and equally usable on a GPU batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_crop_flip(
    x: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Crop each image of ``x`` (B×C×H×W, any dtype) at an independent offset in [0, 2*padding]
    of its zero-padded copy, and mirror it left-right with probability 1/2 when ``flip``.

    Random numbers come from ``generator`` (on its own device) or the global CPU generator, so
    the same seed gives the same augmentation whatever device ``x`` is on.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects a B×C×H×W batch, got shape {tuple(x.shape)}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    b, c, h, w = x.shape
    dev = x.device
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    off_h = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_dev).to(dev)
    off_w = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_dev).to(dev)
    if padding > 0:
        padded = x.new_zeros((b, c, h + 2 * padding, w + 2 * padding))
        padded[:, :, padding : padding + h, padding : padding + w] = x
    else:
        padded = x
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    cols = ar_w.expand(b, w)
    if flip:
        flips = torch.rand(b, generator=generator, device=gen_dev).to(dev) < 0.5
        cols = torch.where(flips[:, None], ar_w.flip(0), ar_w)  # mirrored window = reversed column index
    rows = (off_h[:, None] + ar_h)[:, None, :, None]
    cols = (off_w[:, None] + cols)[:, None, None, :]
    batch = torch.arange(b, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def to_float(x: Tensor) -> Tensor:
    """uint8 pixels [0, 255] -> float32 [0, 1] (the range every model here takes).

    Floating-point input is taken to be in [0, 1] already and only cast to float32.
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.is_floating_point():
        return x.to(torch.float32)
    raise TypeError(f"to_float expects uint8 or floating-point pixels, got {x.dtype}")
