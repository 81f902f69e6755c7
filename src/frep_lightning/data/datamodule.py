"""CIFAR-10/100 and SVHN as a LightningDataModule, from the offline pack or torchvision.

Every batch a model sees is ``(x, y)`` with ``x`` float32 in [0, 1] (B×3×32×32) and ``y``
int64: normalisation lives in the model. Training batches get random crop (pad 4) + flip (no
flip for SVHN, whose digits are not mirror-symmetric), applied per batch in the collate
function. Validation and test use fixed class-balanced subsets of the test split.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from frep_lightning.data.augment import random_crop_flip, to_float
from frep_lightning.data.pack import load_pack

DATASETS = {"cifar10": 10, "cifar100": 100, "svhn": 10}
FORMATS = ("auto", "pack", "torchvision")


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """``root``, else $FREP_DATA_DIR, else ``../shared/data`` beside the checkout, else ./data."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("FREP_DATA_DIR"):
        return Path(os.environ["FREP_DATA_DIR"]).expanduser()
    shared = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def balanced_indices(labels: Tensor, n: int | None, seed: int) -> Tensor:
    """A fixed, class-balanced subset of size ``n`` (all indices when ``n`` is None)."""
    if n is None or n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    classes = labels.unique()
    per_class = math.ceil(n / len(classes))
    chosen = torch.cat([perm[labels[perm] == c][:per_class] for c in classes])
    # interleave classes so trimming keeps the balance, then trim to exactly n
    order = torch.argsort(torch.cat([torch.arange((labels[chosen] == c).sum()) for c in classes]), stable=True)
    return chosen[order][:n].sort().values


def _collate(batch: list[tuple[Tensor, Tensor]], augment: bool, flip: bool) -> tuple[Tensor, Tensor]:
    x = torch.stack([b[0] for b in batch])
    y = torch.stack([b[1] for b in batch])
    if augment:
        x = random_crop_flip(x, padding=4, flip=flip)
    return to_float(x), y


class ImageClassificationData(pl.LightningDataModule):
    """See the module docstring. Arguments are validated here, before anything is read."""

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
    ) -> None:
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"data.name={name!r} is not valid; allowed values: {', '.join(DATASETS)}")
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r} is not valid; allowed values: {', '.join(FORMATS)}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.{key}={value!r} must be an integer > 0")
        for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"data.{key}={value!r} must be null or an integer > 0")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be an integer >= 0")
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
        self.classes: list[str] = []
        self._train: tuple[Tensor, Tensor] | None = None
        self._test: tuple[Tensor, Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return DATASETS[self.name]

    def _pack_dir(self) -> Path:
        return self.root / self.name

    def _torchvision_ready(self) -> bool:
        markers = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "train_32x32.mat"}
        return (self.root / markers[self.name]).exists()

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return "pack" if (self._pack_dir() / "train.npz").is_file() else "torchvision"

    def check_available(self) -> None:
        """Fail early, naming data.root and what was looked for, without reading any image."""
        fmt = self.resolved_format()
        if fmt == "pack":
            for split in ("train", "test"):
                if not (self._pack_dir() / f"{split}.npz").is_file():
                    raise FileNotFoundError(
                        f"data.root={self.root}: offline pack file {self._pack_dir() / split}.npz missing"
                    )
        elif not self.download and not self._torchvision_ready():
            raise FileNotFoundError(
                f"data.root={self.root}: no {self.name} data found (tried the offline pack "
                f"{self._pack_dir()}/train.npz and torchvision files under {self.root}); "
                "set data.root to where they are, or data.download=true"
            )

    def _load_torchvision(self, train: bool) -> tuple[Tensor, Tensor]:
        import torchvision

        root = str(self.root)
        if self.name == "svhn":
            ds = torchvision.datasets.SVHN(root, split="train" if train else "test", download=self.download)
            return torch.from_numpy(ds.data.copy()), torch.from_numpy(ds.labels.astype(np.int64))
        cls = torchvision.datasets.CIFAR10 if self.name == "cifar10" else torchvision.datasets.CIFAR100
        ds = cls(root, train=train, download=self.download)
        self.classes = list(ds.classes)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.int64)

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        self.check_available()
        if self.resolved_format() == "pack":
            xtr, ytr, self.classes = load_pack(self._pack_dir() / "train.npz", self.cache_dir, self.name)
            xte, yte, _ = load_pack(self._pack_dir() / "test.npz", self.cache_dir, self.name)
        else:
            xtr, ytr = self._load_torchvision(True)
            xte, yte = self._load_torchvision(False)
        idx = balanced_indices(ytr, self.n_train, self.seed)
        self._train = (xtr[idx], ytr[idx])
        self._test = (xte, yte)

    def _loader(self, data: tuple[Tensor, Tensor], batch_size: int, train: bool) -> DataLoader:
        collate = functools.partial(_collate, augment=train and self.augment, flip=self.flip)
        return DataLoader(
            TensorDataset(*data),
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and len(data[1]) >= batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def _test_subset(self, n: int | None) -> tuple[Tensor, Tensor]:
        self.setup()
        assert self._test is not None
        idx = balanced_indices(self._test[1], n, self.seed)
        return self._test[0][idx], self._test[1][idx]

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self._train is not None
        return self._loader(self._train, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._test_subset(self.n_val), self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test_subset(self.n_test), self.eval_batch_size, train=False)

    def train_subset_loader(self, n: int, batch_size: int) -> DataLoader:
        """Fixed, unaugmented training images (BN re-estimation, overfitting watch)."""
        self.setup()
        assert self._train is not None
        idx = balanced_indices(self._train[1], n, self.seed + 1)
        return self._loader((self._train[0][idx], self._train[1][idx]), batch_size, train=False)
