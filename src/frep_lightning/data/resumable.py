"""Training batches that a checkpoint can resume exactly, mid-epoch, on any number of ranks.

Lightning resumes a training epoch where it stopped only when the dataloader has
``state_dict``/``load_state_dict``; any other loader starts the epoch over with a fresh shuffle
(and a warning). A resumed run then sees other batches than the uninterrupted one. Here:

* the shuffle of epoch ``e`` is a permutation seeded by ``(seed, e)``, so it needs no running
  generator to be saved, and it is split across ranks as ``DistributedSampler`` does (the sampler
  *is* one, so Lightning does not replace it under DDP);
* every batch is augmented with its own generator seeded by ``(seed, epoch, rank, batch)``:
  the crops and flips do not depend on the global RNG, on how many batches were prefetched, or
  on which worker process collates the batch;
* the loader's state is ``(epoch, batches already trained on)``; the count comes from the
  trainer's progress, not from the iterator, which runs ahead of training by the prefetched
  batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from frep_lightning.data.augment import random_crop_flip, to_float

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser per value): neighbouring inputs such as
    (seed, epoch) and (seed + 1, epoch - 1) give unrelated streams, unlike ``seed + epoch``."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def check_position(saved: dict[str, Any], current: dict[str, Any], epoch: int, batches: int) -> None:
    """A mid-epoch position counts batches of one size, on one number of ranks, in one shuffle order of
    one training set, seeded by one seed (Lightning's progress counts them too): resumed with another,
    part of the epoch would be trained twice or skipped. Refuse it, naming the keys; an epoch-end
    position may change all of them."""
    differ = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
    if not batches or not differ:
        return
    names = {
        "order": "data.on_device (shuffle order)",
        "batch_size": "data.batch_size",
        "num_replicas": "ranks",
        "seed": "seed (shuffle order)",
        "n": "training images (data.n_train)",
    }
    what = ", ".join(f"{names.get(k, k)}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
    raise ValueError(
        f"the checkpoint was saved mid-epoch (epoch {epoch}, after {batches} batch{'es' * (batches != 1)}) and "
        f"this run changes {what}: "
        "resume it with the saved values, or from a checkpoint saved at an epoch end "
        "(checkpoint.every_n_train_steps=null), where these may change"
    )


class SeededPairs(Dataset):
    """Wraps (images, labels) so that a sampler key ``(index, batch_seed)`` returns
    ``(image, label, batch_seed)``; the collate function reads the seed of its batch from it."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, int]:
        index, seed = key
        return self.images[index], self.labels[index], seed


def collate_seeded(
    batch: list[tuple[Tensor, Tensor, int]], augment: bool = True, flip: bool = True, padding: int = 4
) -> tuple[Tensor, Tensor]:
    """Stack a batch and augment it with a generator seeded by the batch's own seed.

    Module-level (used through functools.partial) so DataLoader workers can pickle it."""
    x = torch.stack([b[0] for b in batch])
    y = torch.stack([b[1] for b in batch])
    if augment:
        x = random_crop_flip(x, padding=padding, flip=flip, generator=torch.Generator().manual_seed(batch[0][2]))
    return to_float(x), y


class EpochSeededSampler(DistributedSampler):
    """Keys ``(index, batch_seed)`` of this rank's share of a permutation seeded by (seed, epoch).

    ``set_epoch`` (Lightning calls it every epoch) selects the permutation; ``skip_batches`` (set
    on resume) drops the batches of the current epoch that were already trained on.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"data.batch_size must be an integer > 0, got {batch_size!r}")
        self.batch_size = batch_size
        self.batch_drop_last = drop_last
        self.skip_batches = 0

    @property
    def batches_per_epoch(self) -> int:
        if self.batch_drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices of ``epoch``, padded like DistributedSampler to equal lengths."""
        n = len(self.dataset)  # type: ignore[arg-type]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch))).tolist()
        perm += perm[: self.total_size - n]  # pad (only with several ranks)
        return perm[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch, skip = self.epoch, self.skip_batches
        self.skip_batches = 0
        indices = self.indices(epoch)
        for pos in range(skip * self.batch_size, len(indices)):
            yield indices[pos], mix_seed(self.seed, epoch, self.rank, pos // self.batch_size)


class ResumableLoader(DataLoader):
    """A DataLoader over :class:`EpochSeededSampler` whose state Lightning saves in checkpoints.

    Args:
        progress: returns how many batches of the current epoch have been trained on (the
            datamodule reads it from the trainer); without it the state restarts the epoch.
        epoch: returns the epoch the trainer runs next, read when an iterator is made. Lightning
            calls ``set_epoch`` only after the first ``iter()`` of a fit, and on a resume from an
            epoch-end checkpoint it restores no loader state at all; a lazy sampler still sees
            the right epoch, but worker processes draw their indices inside ``iter()``.
    """

    def __init__(
        self,
        *args: Any,
        progress: Callable[[], int] | None = None,
        epoch: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSeededSampler):
            raise TypeError("ResumableLoader needs an EpochSeededSampler as its sampler")
        self.progress = progress
        self.epoch = epoch

    def __iter__(self) -> Any:
        if self.epoch is not None:
            sampler: EpochSeededSampler = self.sampler  # type: ignore[assignment]
            # max: a state loaded from a save after an epoch's last batch already points past the
            # epoch that Lightning's counter still shows at this point
            sampler.set_epoch(max(int(sampler.epoch), int(self.epoch())))
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        sampler: EpochSeededSampler = self.sampler  # type: ignore[assignment]
        return {
            "epoch": int(sampler.epoch),
            "batches": int(self.progress()) if self.progress is not None else 0,
            **self.position_key(),
        }

    def position_key(self) -> dict[str, Any]:
        sampler: EpochSeededSampler = self.sampler  # type: ignore[assignment]
        return {
            "order": "epoch_seeded",
            "batch_size": sampler.batch_size,
            "num_replicas": int(sampler.num_replicas),
            "seed": int(sampler.seed),
            "n": len(sampler.dataset),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        sampler: EpochSeededSampler = self.sampler  # type: ignore[assignment]
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= sampler.batches_per_epoch:  # saved after the epoch's last batch: resume at the next one
            epoch, batches = epoch + 1, 0
        check_position(state_dict, self.position_key(), epoch, batches)
        sampler.set_epoch(epoch)
        sampler.skip_batches = batches
