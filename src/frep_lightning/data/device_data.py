"""Training batches made on the device from a uint8 copy of the training set that lives there.

Why: a captured FReP step on an H100 takes ~10 ms for 128 images; a worker-based loader that
augments on the CPU and copies every batch to the GPU adds host work, pinned-memory copies and
synchronisation to each step. CIFAR-10's training set is 150 MB as uint8, so it is moved to the
GPU once, and each batch is a gather + random crop (pad 4) + flip there, in a few small kernels,
with no worker process and no per-step host copy (one index vector per epoch goes to the device).

Semantics are those of the CPU loader (:mod:`frep_lightning.data.resumable`), batch for batch:
the order of epoch ``e`` is the same permutation seeded by ``(seed, e)`` (split across ranks as
``DistributedSampler`` does), and batch ``b`` is augmented by
:func:`~frep_lightning.data.augment.random_crop_flip` with a generator seeded by
``(seed, e, rank, b)``. The generator lives on the data's device: on CPU tensors the batches are
exactly the CPU loader's; on a GPU the crops and flips are drawn by the GPU's generator (same
distribution, other numbers). The loader's state (``epoch``, batches trained) has the CPU
loader's format, so a checkpoint saved at an epoch end resumes on either path; one saved mid-epoch
resumes on the path that saved it (switching is refused, naming ``data.on_device``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from frep_lightning.data.augment import random_crop_flip, to_float
from frep_lightning.data.resumable import check_position, mix_seed


class _EpochSetter:
    """What Lightning's ``_set_sampler_epoch`` looks for at ``loader.sampler``: a ``set_epoch`` method."""

    def __init__(self, loader: DeviceBatches) -> None:
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)


class DeviceBatches:
    """An iterable of shuffled, augmented ``(x, y)`` training batches built on ``device``.

    Args:
        images: uint8 ``N×C×H×W`` images (copied to ``device`` once).
        labels: int64 labels of length N.
        batch_size: images per batch.
        augment: random crop (zero padding ``padding``) and, when ``flip``, horizontal flip.
        drop_last: drop the last incomplete batch (every batch then has one shape, as a captured
            step wants).
        seed: seed of the per-epoch permutation and of the per-batch augmentation.
        num_replicas, rank: this process's share of each epoch (DDP), as ``DistributedSampler``.
        device: where the images live and batches are made (default: where ``images`` are).
        progress: returns how many batches of the current epoch were trained on (for the
            checkpointed state; the datamodule reads it from the trainer).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        augment: bool = True,
        flip: bool = True,
        padding: int = 4,
        drop_last: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        device: torch.device | str | None = None,
        progress: Callable[[], int] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"DeviceBatches: images must be uint8 N×C×H×W, got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images) or len(labels) == 0:
            raise ValueError(
                f"DeviceBatches: labels must be 1-D with one label per image, got {tuple(labels.shape)} "
                f"for {len(images)} images"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"data.batch_size must be an integer > 0, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"data.seed must be an integer >= 0, got {seed!r}")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
        if not isinstance(num_replicas, int) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"DeviceBatches: rank={rank!r} must be in [0, num_replicas={num_replicas!r})")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.augment, self.flip, self.padding = bool(augment), bool(flip), padding
        self.drop_last = bool(drop_last)
        self.seed = seed
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(len(self.labels) / num_replicas)
        self.progress = progress
        self.epoch = 0
        self.skip_batches = 0
        self.sampler = _EpochSetter(self)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next ``iter()`` yields (Lightning calls this each epoch)."""
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> Tensor:
        """This rank's sample indices of ``epoch`` (CPU), padded like ``DistributedSampler`` to equal lengths."""
        n = len(self.labels)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
        total = self.num_samples * self.num_replicas
        perm = torch.cat([perm, perm[: total - n]])
        return perm[self.rank : total : self.num_replicas]

    def batch_generator(self, epoch: int, batch: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, epoch, self.rank, batch))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: the epoch is read at the first next(), after Lightning's set_epoch (on a
        # resume from an epoch-end checkpoint Lightning calls set_epoch only after iter()).
        epoch, skip = self.epoch, self.skip_batches
        self.skip_batches = 0
        yield from self._batches(epoch, skip)

    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.indices(epoch).to(self.device)  # the epoch's one host-to-device copy
        for b in range(skip, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = random_crop_flip(x, padding=self.padding, flip=self.flip, generator=self.batch_generator(epoch, b))
            yield to_float(x), self.labels[idx]

    # ---- checkpointed state (Lightning saves it for stateful train loaders) -------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": int(self.epoch),
            "batches": int(self.progress()) if self.progress is not None else 0,
            **self.position_key(),
        }

    def position_key(self) -> dict[str, Any]:
        return {
            "order": "device",
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "seed": int(self.seed),
            "n": len(self.labels),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self) > 0:  # saved after the epoch's last batch: resume at the next one
            epoch, batches = epoch + 1, 0
        check_position(state_dict, self.position_key(), epoch, batches)
        self.set_epoch(epoch)
        self.skip_batches = batches
