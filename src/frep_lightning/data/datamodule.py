"""CIFAR-10/100 and SVHN as a LightningDataModule, from the offline pack or torchvision.

Every batch a model sees is ``(x, y)`` with ``x`` float32 in [0, 1] (B×3×32×32) and ``y``
int64: normalisation lives in the model, so exported models take raw pixels. Images stay uint8
in memory (150 MB for CIFAR-10 train); training batches get random crop (pad 4) + flip (no flip
for SVHN, whose digits are not mirror-symmetric) in the collate function, per batch, or on the
GPU from a device-resident copy (``data.on_device``, :mod:`frep_lightning.data.device_data`).
Validation and final test use fixed class-balanced subsets of the test split.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from frep_lightning.data.augment import random_crop_flip, to_float
from frep_lightning.data.device_data import DeviceBatches
from frep_lightning.data.pack import KNOWN_SHA256, load_pack
from frep_lightning.data.resumable import EpochSeededSampler, ResumableLoader, SeededPairs, collate_seeded

DATASETS = {"cifar10": 10, "cifar100": 100, "svhn": 10}
# Per-channel training-set (mean, std) of [0, 1] images, the robust-training literature's constants: the
# defaults of model.mean / model.std (the model's first layer, models.Normalize), picked by data.name
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
FORMATS = ("auto", "pack", "torchvision")
CROP_PADDING = 4
DOWNLOAD_STALL_S = 60.0  # data.download: seconds without a byte before a fetch fails (torchvision sets no timeout)
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# what torchvision leaves under root once a dataset is downloaded and extracted
_TORCHVISION_FILES = {
    "cifar10": ("cifar-10-batches-py",),
    "cifar100": ("cifar-100-python",),
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
}


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root`` if given, else ``$FREP_DATA_DIR``, else ``../shared/data`` beside the checkout
    (the offline pack's home) when it exists, else ``./data``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("FREP_DATA_DIR")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]  # src/frep_lightning/data/datamodule.py -> repo root
    shared = repo.parent / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its directory): processes that download into
    one directory take turns, as torchvision writes its files in place, neither atomically nor locked."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # a read-only data.root (a shared dataset directory): nothing can be downloaded into it, so there is
        # no partial file to wait for; torchvision only verifies the files already there
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision opens its download URL without a timeout: on a network that drops packets silently a
    run (and every job of a sweep queued behind its lock) would hang. A stall of ``seconds`` fails instead."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def balanced_indices(labels: Tensor, n: int | None, seed: int) -> Tensor:
    """Indices of a fixed class-balanced subset of exactly ``min(n, len(labels))`` items
    (all indices, in order, when ``n`` is None).

    Takes the first ceil(n / classes) of each class in a permutation seeded by ``seed``, visiting
    classes round-robin, and stops at ``n``: trimming is deterministic and keeps the balance, and
    a class with too few items is topped up from the others. Returned in permutation order, so
    consecutive batches of an unshuffled loader are mixed across classes.
    """
    if n is None:
        return torch.arange(len(labels))
    labels = labels.long()
    n = min(n, len(labels))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    lab = labels[perm]
    order = torch.argsort(lab, stable=True)  # by class, permutation order inside a class
    counts = torch.bincount(lab)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(lab)
    rank[order] = torch.arange(len(lab)) - starts[lab[order]]  # position inside its class
    key = rank * len(counts) + lab  # round-robin over classes, rank by rank
    chosen = torch.zeros(len(lab), dtype=torch.bool)
    chosen[torch.argsort(key)[:n]] = True
    return perm[chosen]


def collate_uint8(
    batch: list[tuple[Tensor, Tensor]], augment: bool = False, flip: bool = True, padding: int = CROP_PADDING
) -> tuple[Tensor, Tensor]:
    """Stack uint8 samples, augment the whole batch at once, return float32 [0, 1] + int64 labels.

    Module-level (used through functools.partial) so DataLoader workers can pickle it.
    """
    x = torch.stack([b[0] for b in batch])
    y = torch.stack([b[1] for b in batch])
    if augment:
        x = random_crop_flip(x, padding=padding, flip=flip)
    return to_float(x), y


def _positive_int(key: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an integer >= {minimum}" if minimum != 1 else "an integer > 0"
        raise ValueError(f"data.{key} must be {what}{' or null' if allow_none else ''}, got {value!r}")


def _one_of(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{key}={value!r} is not valid; allowed: {', '.join(allowed)}")


class ImageClassificationData(pl.LightningDataModule):
    """See the module docstring. Every argument is validated here, before anything is read, and
    errors name the config key (``data.<arg>``) with the allowed values."""

    def __init__(
        self,
        name: str = "cifar10",
        root: str | None = None,
        format: str = "auto",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        n_train: int | None = None,
        n_val: int | None = 1000,
        n_test: int | None = None,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
        cache_dir: str | None = None,
        on_device: bool | None = None,
    ) -> None:
        super().__init__()
        _one_of("name", name, list(DATASETS))
        if root is not None and (not isinstance(root, (str, os.PathLike)) or not str(root)):
            raise ValueError(f"data.root must be a non-empty path or null, got {root!r}")
        _one_of("format", format, FORMATS)
        for key, flag in (("download", download), ("augment", augment)):
            if not isinstance(flag, bool):
                raise ValueError(f"data.{key} must be true or false, got {flag!r}")
        _positive_int("batch_size", batch_size)
        _positive_int("eval_batch_size", eval_batch_size)
        for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            _positive_int(key, value, allow_none=True)
        _positive_int("num_workers", num_workers, minimum=0)
        _positive_int("seed", seed, minimum=0)
        if on_device is not None and not isinstance(on_device, bool):
            raise ValueError(f"data.on_device must be true, false or null (auto: on with CUDA), got {on_device!r}")
        if cache_dir is not None and (not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir)):
            raise ValueError(f"data.cache_dir must be a non-empty path or null, got {cache_dir!r}")
        self.name = name
        self.root = resolve_root(root)
        self.format = format
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.num_workers = num_workers
        self.augment = augment
        self.flip = name != "svhn"
        self.seed = seed
        self.cache_dir = cache_dir
        self.on_device = on_device
        self._classes: list[str] | None = None
        self._train: tuple[Tensor, Tensor] | None = None  # the n_train subset
        self._test: tuple[Tensor, Tensor] | None = None  # the whole test split

    # ---- metadata ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return DATASETS[self.name]

    @property
    def classes(self) -> list[str]:
        """Class names by label (loads the test split when they are not known statically)."""
        if self._classes is None:
            if self.name == "cifar10":
                return list(_CIFAR10_CLASSES)
            if self.name == "svhn":
                return [str(d) for d in range(10)]
            self._ensure_test()
        assert self._classes is not None
        return list(self._classes)

    # ---- locating the files -----------------------------------------------------------------
    def pack_paths(self) -> dict[str, Path]:
        return {split: self.root / self.name / f"{split}.npz" for split in ("train", "test")}

    def torchvision_paths(self) -> list[Path]:
        return [self.root / f for f in _TORCHVISION_FILES[self.name]]

    def _missing(self, tried: list[Path]) -> FileNotFoundError:
        listed = ", ".join(str(p) for p in tried)
        known = {p.name: KNOWN_SHA256.get((self.name, p.stem)) for p in tried}
        shas = [f"{name} sha256 {sha}" for name, sha in known.items() if sha]
        return FileNotFoundError(
            f"data.root={str(self.root)!r}: no {self.name} data found (data.format={self.format}); "
            f"tried {listed}. "
            f"Set data.root to the directory holding {self.name}/train.npz and test.npz (the offline pack"
            f"{'; expected ' + ', '.join(shas) if shas else ''}) "
            f"or torchvision's files, or set data.download=true where a network exists."
        )

    def check_available(self) -> str:
        """Resolve the format ("pack" or "torchvision") from the files present, reading no image,
        so a bad data.root fails before training starts. Raises FileNotFoundError otherwise."""
        packs = self.pack_paths()
        tv = self.torchvision_paths()
        if self.format == "pack" or (self.format == "auto" and packs["train"].is_file()):
            missing = [p for p in packs.values() if not p.is_file()]
            if missing:
                raise self._missing(missing)
            return "pack"
        if self.download or all(p.exists() for p in tv):
            return "torchvision"
        tried = [*packs.values(), *tv] if self.format == "auto" else tv
        raise self._missing(tried)

    # ---- loading ----------------------------------------------------------------------------
    def _load_torchvision(self, train: bool) -> tuple[Tensor, Tensor, list[str]]:
        """torchvision's dataset class, its failures said in this project's keys (its own messages name
        ``download=True`` and no path)."""
        try:
            if not self.download:
                return self._read_torchvision(train)
            # parallel sweep jobs (or DDP ranks) downloading into one data.root at once would read each
            # other's partial files: one at a time, the later ones find the files verified and skip the fetch
            with _exclusive_lock(self.root / f".{self.name}.download.lock"), _socket_timeout(DOWNLOAD_STALL_S):
                return self._read_torchvision(train)
        except ImportError as err:  # SVHN's .mat files need scipy
            need = err.name or str(err)
            raise ImportError(f"data={self.name} in torchvision's format needs {need}: pip install {need}") from err
        except (OSError, RuntimeError) as err:
            if self.download:
                raise FileNotFoundError(
                    f"data.download=true: fetching {self.name} into data.root={str(self.root)!r} failed ({err}). "
                    "Without a network, set data.root to the offline pack (a directory holding "
                    f"{self.name}/train.npz) or to torchvision's extracted files, with data.download=false"
                ) from err
            raise FileNotFoundError(
                f"data.root={str(self.root)!r}: torchvision's {self.name} files there are incomplete or damaged "
                f"({err}); re-extract them, or set data.download=true where a network exists, or use the offline "
                f"pack ({self.name}/train.npz)"
            ) from err

    def _read_torchvision(self, train: bool) -> tuple[Tensor, Tensor, list[str]]:
        import torchvision

        root = str(self.root)
        if self.name == "svhn":
            ds = torchvision.datasets.SVHN(root, split="train" if train else "test", download=self.download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))  # already N×3×32×32
            return (
                images,
                torch.from_numpy(np.asarray(ds.labels, dtype=np.int64)),
                [str(d) for d in range(10)],
            )
        cls = torchvision.datasets.CIFAR10 if self.name == "cifar10" else torchvision.datasets.CIFAR100
        ds = cls(root, train=train, download=self.download)
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2), dtype=np.uint8))
        return images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)

    def _load_split(self, split: str) -> tuple[Tensor, Tensor]:
        if self.check_available() == "pack":
            images, labels, classes = load_pack(self.pack_paths()[split], self.cache_dir, self.name)
        else:
            images, labels, classes = self._load_torchvision(split == "train")
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{self.name} {split}: expected uint8 N×3×H×W images, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (len(images),):
            raise ValueError(f"{self.name} {split}: {tuple(labels.shape)} labels for {len(images)} images")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            # e.g. SVHN's own files label the digit 0 as 10 (torchvision maps it to 0; a pack must too)
            raise ValueError(
                f"{self.name} {split}: labels must be in [0, {self.num_classes - 1}], found "
                f"{int(labels.min())}..{int(labels.max())} (data.name={self.name} has {self.num_classes} classes)"
            )
        self._classes = classes
        return images, labels

    def _ensure_train(self) -> tuple[Tensor, Tensor]:
        if self._train is None:
            images, labels = self._load_split("train")
            idx = balanced_indices(labels, self.n_train, self.seed)
            self._train = (images[idx], labels[idx]) if self.n_train is not None else (images, labels)
        return self._train

    def _ensure_test(self) -> tuple[Tensor, Tensor]:
        if self._test is None:
            self._test = self._load_split("test")
        return self._test

    def prepare_data(self) -> None:
        """Download once (rank 0) when data.download=true and the torchvision format is used."""
        if self.download and self.check_available() == "torchvision":
            self._load_torchvision(True)
            self._load_torchvision(False)

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs, once: train + test for fit (val is a test subset), test otherwise."""
        if stage in (None, "fit"):
            self._ensure_train()
        self._ensure_test()

    # ---- loaders ----------------------------------------------------------------------------
    def _loader(
        self, data: tuple[Tensor, Tensor], batch_size: int, train: bool, persistent: bool = False
    ) -> DataLoader:
        if train:  # shuffled + augmented, resumable mid-epoch, split across DDP ranks
            sampler = EpochSeededSampler(
                SeededPairs(*data),
                batch_size,
                self.seed,
                drop_last=self._full_batch(len(data[1]), batch_size),
                **self._replica(),
            )
            return ResumableLoader(
                sampler.dataset,
                batch_size=batch_size,
                sampler=sampler,
                drop_last=sampler.batch_drop_last,
                num_workers=self.num_workers,
                persistent_workers=persistent and self.num_workers > 0,
                collate_fn=functools.partial(collate_seeded, augment=self.augment, flip=self.flip),
                generator=torch.Generator().manual_seed(self.seed),  # iter() must not draw from the global RNG
                progress=self._trained_batches,
                epoch=self._next_epoch,
            )
        return DataLoader(
            TensorDataset(*data),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=persistent and self.num_workers > 0,
            collate_fn=functools.partial(collate_uint8, augment=False, flip=self.flip),
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds: not from the global RNG
        )

    def _replica(self) -> dict[str, int]:
        """This process's share of the training set under DDP (the whole set without a trainer)."""
        trainer = self.trainer
        return (
            {"num_replicas": 1, "rank": 0}
            if trainer is None
            else {"num_replicas": trainer.world_size, "rank": trainer.global_rank}
        )

    def _full_batch(self, n: int, batch_size: int) -> bool:
        """Drop the last incomplete batch only if this rank's share (DDP splits the set) holds a full one:
        otherwise a small set would give no batch at all."""
        return math.ceil(n / self._replica()["num_replicas"]) >= batch_size

    def _next_epoch(self) -> int:
        """The epoch the trainer runs next (what Lightning passes to ``set_epoch``)."""
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.fit_loop.epoch_progress.current.processed)

    def _trained_batches(self) -> int:
        """Batches of the current epoch already trained on (what a checkpoint must not repeat)."""
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _test_subset(self, n: int | None) -> tuple[Tensor, Tensor]:
        images, labels = self._ensure_test()
        if n is None:
            return images, labels
        idx = balanced_indices(labels, n, self.seed)
        return images[idx], labels[idx]

    def train_device(self) -> torch.device | None:
        """Where training batches are made: the trainer's device with ``data.on_device=true`` (CPU
        without a trainer), or with ``null`` when that device is a GPU; None: the CPU loader."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if self.on_device is True or (self.on_device is None and device.type == "cuda"):
            return device
        return None

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        """Shuffled (seeded), augmented batches of the n_train subset (made on the GPU with ``data.on_device``)."""
        device = self.train_device()
        if device is None:
            return self._loader(self._ensure_train(), self.batch_size, train=True, persistent=True)
        images, labels = self._ensure_train()
        return DeviceBatches(
            images,
            labels,
            self.batch_size,
            augment=self.augment,
            flip=self.flip,
            padding=CROP_PADDING,
            drop_last=self._full_batch(len(labels), self.batch_size),
            seed=self.seed,
            **self._replica(),
            device=device,
            progress=self._trained_batches,
        )

    def val_dataloader(self) -> DataLoader:
        """A fixed class-balanced subset (n_val) of the test split, for per-epoch validation."""
        return self._loader(self._test_subset(self.n_val), self.eval_batch_size, train=False, persistent=True)

    def test_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """A fixed class-balanced subset (n_test, null = all) of the test split, for final evaluation
        (in batches of ``batch_size``, default ``eval_batch_size``: the fit-end eval has its own key)."""
        if batch_size is not None:
            _positive_int("eval_batch_size", batch_size)
        return self._loader(self._test_subset(self.n_test), batch_size or self.eval_batch_size, train=False)

    def train_subset_loader(self, n: int, batch_size: int) -> DataLoader:
        """A fixed, unaugmented, class-balanced set of n training images in a fixed order: watching
        PGD accuracy on it exposes catastrophic overfitting; BN re-estimation uses it too."""
        for key, value in (("n", n), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"train_subset_loader: {key} must be an integer > 0, got {value!r}")
        images, labels = self._ensure_train()
        idx = balanced_indices(labels, n, self.seed + 1)
        return self._loader((images[idx], labels[idx]), batch_size, train=False)
