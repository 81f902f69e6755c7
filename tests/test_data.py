"""Offline pack decoding and cache, batched augmentation, the DataModule's subsets and errors."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from frep_lightning.data import ImageClassificationData, balanced_indices, load_pack, random_crop_flip


def test_pack_decodes_and_caches(pack_root: Path, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    x, y, classes = load_pack(pack_root / "cifar10" / "test.npz", tmp_path)
    first = time.perf_counter() - t0
    assert x.shape == (10_000, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and torch.equal(y.bincount(), torch.full((10,), 1000))
    assert classes[0] == "airplane" and classes[9] == "truck"
    mean = x.float().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4941, 0.4851, 0.4504]), atol=2e-3)  # the pack README's values
    t0 = time.perf_counter()
    x2, y2, _ = load_pack(pack_root / "cifar10" / "test.npz", tmp_path)
    assert time.perf_counter() - t0 < first and torch.equal(x, x2) and torch.equal(y, y2)
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_corrupt_or_missing_pack_is_named(pack_root: Path, tmp_path: Path) -> None:
    bad_dir = tmp_path / "cifar10"
    bad_dir.mkdir()
    bad = bad_dir / "test.npz"
    shutil.copy(pack_root / "cifar10" / "test.npz", bad)
    with open(bad, "r+b") as f:
        f.seek(5_000_000)
        byte = f.read(1)
        f.seek(5_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="e61cc3b047225301682788b775d4d0a5e2203eb095bfed35eca8526a49c9cf66"):
        load_pack(bad, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        load_pack(tmp_path / "nothing.npz", tmp_path / "cache")


def test_crop_and_flip() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, flip=False, generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # every crop is a 6x6 window of the zero-padded image
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    many = torch.rand(400, 3, 8, 8)
    flipped = random_crop_flip(many, padding=0, flip=True, generator=torch.Generator().manual_seed(1))
    n_flipped = sum(torch.equal(flipped[i], many[i].flip(2)) for i in range(400))
    assert 150 < n_flipped < 250
    a = random_crop_flip(many, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(many, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == many.shape


def test_balanced_indices_are_balanced_and_fixed() -> None:
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500)]
    idx = balanced_indices(labels, 100, seed=0)
    assert len(idx) == 100 and torch.equal(labels[idx].bincount(), torch.full((10,), 10))
    assert torch.equal(idx, balanced_indices(labels, 100, seed=0))
    assert len(balanced_indices(labels, 95, seed=0)) == 95


def test_datamodule_batches(pack_root: Path, cache_dir: Path) -> None:
    dm = ImageClassificationData(root=str(pack_root), n_train=100, n_val=50, batch_size=32, cache_dir=str(cache_dir))
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert len(dm.train_dataloader()) == 3  # 100 images, drop_last
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape[0] == 50 and torch.equal(yv.bincount(), torch.full((10,), 5))
    assert dm.num_classes == 10


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "mnist"}, "data.name"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"format": "zip"}, "data.format"),
        ({"n_train": -1}, "data.n_train"),
    ],
)
def test_datamodule_validates_arguments(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ImageClassificationData(**kwargs)


def test_missing_root_names_data_root(tmp_path: Path) -> None:
    dm = ImageClassificationData(root=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="data.root"):
        dm.check_available()
