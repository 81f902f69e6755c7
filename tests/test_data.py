"""Offline pack decoding and cache, batched augmentation, the DataModule's subsets and errors.

Decoding is tested on the 10k test split (under a second); the DataModule tests share the
session cache from conftest, so the 50k train split is decoded at most once per run.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import frep_lightning.data.pack as pack_mod
from frep_lightning.data import (
    DATASETS,
    KNOWN_SHA256,
    ImageClassificationData,
    balanced_indices,
    load_pack,
    random_crop_flip,
    resolve_root,
    to_float,
)

PACK_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_SHA = KNOWN_SHA256[("cifar10", "test")]


@pytest.fixture(scope="module")
def pack_root() -> Path:
    if not (PACK_ROOT / "cifar10" / "test.npz").is_file():
        pytest.skip(f"offline dataset pack not found at {PACK_ROOT}")
    return PACK_ROOT


def _no_decode(*args: object, **kwargs: object) -> None:
    raise AssertionError("decoded although the cache should have been used")


# ---- pack ---------------------------------------------------------------------------------------
def test_pack_decodes_and_caches(pack_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = pack_root / "cifar10" / "test.npz"
    t0 = time.perf_counter()
    x, y, classes = load_pack(path, tmp_path)
    first = time.perf_counter() - t0
    assert x.shape == (10_000, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert torch.equal(y.bincount(), torch.full((10,), 1000))
    assert classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    mean = x.double().div(255).mean(dim=(0, 2, 3))
    # the pack README's test-split values (Pillow decoder)
    assert torch.allclose(mean, torch.tensor([0.4941, 0.4851, 0.4504], dtype=torch.float64), atol=2e-3)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 3 and all(n.endswith(".npy") and n.startswith("cifar10-test-") for n in cached)

    monkeypatch.setattr(pack_mod, "_decode", _no_decode)
    monkeypatch.setattr(pack_mod, "file_sha256", _no_decode)  # a warm load does not hash either
    t0 = time.perf_counter()
    x2, y2, classes2 = load_pack(path, tmp_path)
    second = time.perf_counter() - t0
    assert torch.equal(x, x2) and torch.equal(y, y2) and classes2 == classes
    assert second < first / 2, (first, second)
    assert x2.is_contiguous()


def test_cache_key_follows_mtime_and_env(pack_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "cifar10" / "test.npz"
    copy.parent.mkdir()
    shutil.copy(pack_root / "cifar10" / "test.npz", copy)
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv("FREP_CACHE_DIR", str(env_cache))
    x, _, _ = load_pack(copy, None)  # cache_dir=None -> $FREP_CACHE_DIR
    assert len(list(env_cache.glob("*.images.npy"))) == 1
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a touched file is decoded again
    x2, _, _ = load_pack(copy, None)
    assert len(list(env_cache.glob("*.images.npy"))) == 2 and torch.equal(x, x2)
    assert not list(env_cache.glob(".*"))  # no temp files left behind


def test_corrupt_pack_names_file_and_sha(pack_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cifar10" / "test.npz"
    bad.parent.mkdir()
    shutil.copy(pack_root / "cifar10" / "test.npz", bad)
    with open(bad, "r+b") as f:
        f.seek(5_000_000)
        byte = f.read(1)
        f.seek(5_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=TEST_SHA) as err:
        load_pack(bad, tmp_path / "cache")
    assert str(bad) in str(err.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_unreadable_or_missing_pack(tmp_path: Path) -> None:
    junk = tmp_path / "mydata" / "train.npz"  # unknown dataset: no sha to check, the read fails
    junk.parent.mkdir()
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match="train.npz"):
        load_pack(junk, tmp_path / "cache")
    missing = tmp_path / "nothing" / "test.npz"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        load_pack(missing, tmp_path / "cache")


def _toy_pack(path: Path, labels: list[int], classes: list[str]) -> None:
    """A pack file in the documented format; image i is filled with 40 * i (PNG: lossless, pixels exact)."""
    from io import BytesIO

    from PIL import Image

    blobs = []
    for i in range(len(labels)):
        buf = BytesIO()
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=np.array(labels), classes=np.array(classes))


def test_pack_without_known_sha_still_loads(tmp_path: Path) -> None:
    """A small hand-made pack in the documented format decodes to the pixels written."""
    path = tmp_path / "toy" / "train.npz"
    _toy_pack(path, [i % 2 for i in range(6)], ["a", "b"])
    x, y, classes = load_pack(path, tmp_path / "cache")
    assert x.shape == (6, 3, 32, 32) and classes == ["a", "b"] and y.tolist() == [0, 1, 0, 1, 0, 1]
    assert x[:, :, 0, 0].tolist() == [[40 * i] * 3 for i in range(6)]


def test_damaged_cache_entry_is_decoded_again_and_the_cache_stays_readable(tmp_path: Path) -> None:
    """A truncated .npy (a full disk, a copy cut short) costs a decode, not a crash; entries are 0644
    (mkstemp makes 0600, which would lock other users out of a shared cache)."""
    path = tmp_path / "toy" / "train.npz"
    _toy_pack(path, [0, 1, 0, 1], ["a", "b"])
    cache = tmp_path / "cache"
    x, y, _ = load_pack(path, cache)
    files = sorted(cache.iterdir())
    assert len(files) == 3 and all(f.stat().st_mode & 0o777 == 0o644 for f in files)
    (entry,) = cache.glob("*.images.npy")
    entry.write_bytes(entry.read_bytes()[:200])
    x2, y2, _ = load_pack(path, cache)
    assert torch.equal(x2, x) and torch.equal(y2, y)
    assert torch.equal(load_pack(path, cache)[0], x)  # and the entry was rewritten whole


# ---- augmentation -------------------------------------------------------------------------------
def test_identity_without_padding_or_flip() -> None:
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, padding=0, flip=False)
    assert out.dtype == torch.uint8 and torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.int64])
def test_shape_and_dtype_preserved(dtype: torch.dtype) -> None:
    x = (torch.rand(5, 3, 32, 32) * 200).to(dtype)
    out = random_crop_flip(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype


def test_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    h = w = 6
    pad = 2
    base = torch.arange(1, h * w + 1, dtype=torch.int64).view(1, 1, h, w)  # all nonzero, all distinct
    x = base.repeat(300, 2, 1, 1)
    out = random_crop_flip(x, padding=pad, flip=False, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(base[0, 0], (pad, pad, pad, pad))
    seen = set()
    for i in range(len(out)):
        # the top-left original pixel (value 1) sits at (pad - dr, pad - dc) for offset (dr, dc)
        hits = [
            (r, c)
            for r in range(2 * pad + 1)
            for c in range(2 * pad + 1)
            if torch.equal(out[i, 0], padded[r : r + h, c : c + w])
        ]
        assert len(hits) == 1, i
        assert torch.equal(out[i, 0], out[i, 1])  # channels share the offset
        seen.add(hits[0])
    assert len(seen) == (2 * pad + 1) ** 2  # every offset in [0, 2*pad]^2 occurs


def test_flips_about_half_and_mirror_exactly() -> None:
    x = torch.rand(1000, 3, 8, 8)
    out = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(1))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and not bool((same & mirrored).any())
    assert 430 < int(mirrored.sum()) < 570


def test_flip_and_crop_combine_per_image() -> None:
    x = torch.rand(64, 3, 10, 10)
    g = torch.Generator().manual_seed(5)
    out = random_crop_flip(x, padding=3, flip=True, generator=g)
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i in range(64):
        windows = [padded[i, :, r : r + 10, c : c + 10] for r in range(7) for c in range(7)]
        assert any(torch.equal(out[i], wdw) or torch.equal(out[i], wdw.flip(2)) for wdw in windows)


def test_augmentation_is_deterministic_per_generator() -> None:
    x = torch.rand(32, 3, 16, 16)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentation_on_cuda_matches_cpu() -> None:
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    cpu = random_crop_flip(x, generator=torch.Generator().manual_seed(7))
    gpu = random_crop_flip(x.cuda(), generator=torch.Generator().manual_seed(7))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_bad_augment_arguments() -> None:
    with pytest.raises(ValueError, match="B×C×H×W"):
        random_crop_flip(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(torch.zeros(1, 3, 8, 8), padding=-1)


def test_to_float() -> None:
    x = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    f = to_float(x)
    assert f.dtype == torch.float32 and torch.allclose(f, torch.tensor([[0.0, 128 / 255, 1.0]]))
    assert x.tolist() == [[0, 128, 255]]  # input untouched
    assert torch.equal(to_float(f.double()), f)  # floats are taken to be in [0, 1] already: only cast


# ---- balanced subsets ---------------------------------------------------------------------------
def test_balanced_indices_are_balanced_exact_and_fixed() -> None:
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    idx = balanced_indices(labels, 100, seed=0)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert torch.equal(labels[idx].bincount(), torch.full((10,), 10))
    assert torch.equal(idx, balanced_indices(labels, 100, seed=0))
    assert not torch.equal(idx.sort().values, balanced_indices(labels, 100, seed=1).sort().values)
    counts = labels[balanced_indices(labels, 95, seed=0)].bincount(minlength=10)
    assert counts.sum() == 95 and counts.max() == 10 and counts.min() == 9
    assert torch.equal(balanced_indices(labels, None, seed=0), torch.arange(500))
    assert len(balanced_indices(labels, 10_000, seed=0)) == 500


def test_balanced_indices_top_up_a_short_class() -> None:
    labels = torch.tensor([0] * 3 + [1] * 50 + [2] * 50)
    idx = balanced_indices(labels, 30, seed=0)
    assert len(idx) == 30 and labels[idx].bincount().tolist() == [3, 14, 13]


# ---- DataModule ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mnist"}, r"data\.name='mnist' is not valid; allowed: cifar10, cifar100, svhn"),
        ({"format": "zip"}, r"data\.format='zip' is not valid; allowed: auto, pack, torchvision"),
        ({"batch_size": 0}, r"data\.batch_size must be an integer > 0"),
        ({"batch_size": 2.5}, r"data\.batch_size"),
        ({"batch_size": None}, r"data\.batch_size must be an integer > 0, got None"),  # only the n_* take null
        ({"eval_batch_size": True}, r"data\.eval_batch_size must be an integer > 0, got True"),
        ({"eval_batch_size": -4}, r"data\.eval_batch_size"),
        ({"n_train": -1}, r"data\.n_train must be an integer > 0 or null"),
        ({"n_val": 0}, r"data\.n_val"),
        ({"n_test": "all"}, r"data\.n_test"),
        ({"num_workers": -1}, r"data\.num_workers must be an integer >= 0"),
        ({"seed": -3}, r"data\.seed"),
        ({"download": "yes"}, r"data\.download must be true or false"),
        ({"augment": 1}, r"data\.augment"),
        ({"root": ""}, r"data\.root"),
        ({"cache_dir": 5}, r"data\.cache_dir"),
    ],
)
def test_datamodule_validates_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageClassificationData(**kwargs)


def test_missing_root_names_data_root(tmp_path: Path) -> None:
    root = tmp_path / "none"
    for fmt in ("auto", "torchvision", "pack"):
        dm = ImageClassificationData(root=str(root), format=fmt)
        with pytest.raises(FileNotFoundError, match="data.root") as err:
            dm.check_available()
        msg = str(err.value)
        assert "data.download=true" in msg and str(root) in msg
    assert "cifar-10-batches-py" in msg or "train.npz" in msg
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageClassificationData(root=str(root)).setup("fit")


def _fake_torchvision_cifar10(root: Path) -> np.ndarray:
    """A tiny tree in torchvision's CIFAR-10 layout (md5 checks are patched out by the caller)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 20, 3 * 32 * 32), dtype=np.uint8)  # rows are CHW-flattened
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for i, name in enumerate(names):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data[i], "labels": [j % 10 for j in range(20)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, f)
    return data


def test_torchvision_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    data = _fake_torchvision_cifar10(tmp_path)
    dm = ImageClassificationData(root=str(tmp_path), n_train=None, n_val=None, eval_batch_size=7)
    assert dm.check_available() == "torchvision"
    dm.setup("fit")
    images, labels = dm._train
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.equal(images[0], torch.from_numpy(data[0, 0].reshape(3, 32, 32)))  # back to CHW exactly
    assert dm.classes == [f"c{k}" for k in range(10)]
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (7, 3, 32, 32) and xv.dtype == torch.float32 and yv.tolist() == list(range(7))
    assert torch.equal(xv[0], to_float(torch.from_numpy(data[5, 0].reshape(3, 32, 32))))


def test_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREP_DATA_DIR", str(tmp_path / "env"))
    assert resolve_root() == tmp_path / "env"
    assert resolve_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert ImageClassificationData().root == tmp_path / "env"
    monkeypatch.delenv("FREP_DATA_DIR")
    expected = PACK_ROOT if PACK_ROOT.is_dir() else Path("data")
    assert resolve_root() == expected


def test_check_available_reads_no_image(pack_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import frep_lightning.data.datamodule as dm_mod

    monkeypatch.setattr(dm_mod, "load_pack", _no_decode)
    assert ImageClassificationData(root=str(pack_root)).check_available() == "pack"
    assert ImageClassificationData(root=str(pack_root), format="pack").check_available() == "pack"
    dm = ImageClassificationData(name="svhn", root=str(pack_root))
    assert not dm.flip and dm.num_classes == 10
    with pytest.raises(FileNotFoundError, match="svhn"):
        dm.check_available()


def test_datamodule_subsets_and_batches(pack_root: Path, cache_dir: Path) -> None:
    dm = ImageClassificationData(
        root=str(pack_root),
        n_train=100,
        n_val=50,
        n_test=200,
        batch_size=32,
        eval_batch_size=64,
        cache_dir=str(cache_dir),
    )
    dm.setup("fit")
    assert dm.num_classes == DATASETS["cifar10"] == 10 and dm.classes[0] == "airplane"
    images, labels = dm._train
    assert len(labels) == 100 and torch.equal(labels.bincount(), torch.full((10,), 10))
    dm.setup("fit")  # idempotent: same tensors
    assert dm._train[1] is labels

    loader = dm.train_dataloader()
    assert len(loader) == 3  # 100 images, batch 32, drop_last
    batches = list(loader)
    for x, y in batches:
        assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (32,) and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    raw = to_float(images)
    x0 = batches[0][0]
    exact = sum(any(torch.equal(x0[i], raw[j]) for j in range(100)) for i in range(32))
    assert exact < 32  # augmentation changed most images (an unshifted, unflipped crop is ~1/81)
    assert pickle.loads(pickle.dumps(loader.collate_fn)) is not None  # num_workers > 0 can ship it

    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (50, 3, 32, 32) and torch.equal(yv.bincount(), torch.full((10,), 5))
    test_batches = list(dm.test_dataloader())
    assert [len(b[1]) for b in test_batches] == [64, 64, 64, 8]
    yt = torch.cat([b[1] for b in test_batches])
    assert torch.equal(yt.bincount(), torch.full((10,), 20))

    sub_a = list(dm.train_subset_loader(40, 16))
    sub_b = list(dm.train_subset_loader(40, 16))
    assert [len(b[1]) for b in sub_a] == [16, 16, 8]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(sub_a, sub_b))
    xs = torch.cat([b[0] for b in sub_a])
    assert torch.equal(torch.cat([b[1] for b in sub_a]).bincount(), torch.full((10,), 4))
    assert all(any(torch.equal(xs[i], raw[j]) for j in range(100)) for i in range(40))  # not augmented

    same = ImageClassificationData(root=str(pack_root), n_train=100, cache_dir=str(cache_dir))
    same.setup("fit")
    assert torch.equal(same._train[1], labels) and torch.equal(same._train[0], images)


def test_small_subset_keeps_last_batch_and_no_augment(pack_root: Path, cache_dir: Path) -> None:
    dm = ImageClassificationData(
        root=str(pack_root), n_train=20, batch_size=32, augment=False, cache_dir=str(cache_dir)
    )
    x, y = next(iter(dm.train_dataloader()))  # loads on demand
    assert x.shape == (20, 3, 32, 32) and len(y) == 20  # fewer than batch_size: not dropped
    raw = to_float(dm._train[0])
    assert all(any(torch.equal(x[i], raw[j]) for j in range(20)) for i in range(20))


def test_torchvision_failures_name_the_config_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision says "use download=True" and names no path; ours names data.root / data.download."""
    (tmp_path / "cifar-10-batches-py").mkdir()  # extracted folder present, files missing
    dm = ImageClassificationData(root=str(tmp_path), n_train=None, n_val=None)
    assert dm.check_available() == "torchvision"
    with pytest.raises(FileNotFoundError, match=rf"data\.root='{tmp_path}': torchvision's cifar10 files there are"):
        dm.setup("fit")

    import urllib.error

    import torchvision.datasets.cifar as tv_cifar

    def offline(self: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_cifar.CIFAR10, "download", offline)
    dm = ImageClassificationData(root=str(tmp_path / "new"), download=True, n_train=None, n_val=None)
    with pytest.raises(FileNotFoundError, match=r"data\.download=true: fetching cifar10 into data\.root=.*failed"):
        dm.prepare_data()


def test_svhn_pack_labels_outside_its_classes_are_refused(tmp_path: Path) -> None:
    """SVHN's own files label the digit 0 as 10 (torchvision maps it to 0): a pack that kept it would fail
    only inside the loss (an index error on CPU, a device-side assert on CUDA) after setup."""
    for split in ("train", "test"):
        _toy_pack(tmp_path / "svhn" / f"{split}.npz", [1, 10, 3, 10], [str(d) for d in range(10)])
    dm = ImageClassificationData(name="svhn", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), n_val=None)
    with pytest.raises(ValueError, match=r"svhn train: labels must be in \[0, 9\], found 1\.\.10"):
        dm.setup("fit")


def test_svhn_torchvision_files_must_all_be_there(tmp_path: Path) -> None:
    (tmp_path / "train_32x32.mat").write_bytes(b"")
    dm = ImageClassificationData(name="svhn", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="test_32x32.mat"):
        dm.check_available()


@pytest.mark.parametrize("on_device", [False, True])
def test_svhn_training_batches_are_cropped_but_never_mirrored(on_device: bool) -> None:
    """Digits are not mirror-symmetric: no flip for SVHN, on either training path (CIFAR-10 flips: the
    check below sees mirrors)."""
    columns = (10 + 20 * torch.arange(8)).to(torch.uint8)  # every row rises left to right, no zero pixel
    images, labels = columns.expand(64, 3, 8, 8).contiguous(), torch.arange(64) % 10
    mirrored = {}
    for name in ("svhn", "cifar10"):
        dm = ImageClassificationData(name=name, batch_size=16, on_device=on_device)
        dm._train = (images, labels)  # what setup() would load
        x = torch.cat([x for x, _ in dm.train_dataloader()])[:, 0]
        real = (x[..., 1:] > 0) & (x[..., :-1] > 0)  # neighbours both inside the image (not zero padding)
        assert bool(real.any()) and not torch.equal(x, to_float(images[:, 0]))  # cropped
        mirrored[name] = int(((x.diff(dim=-1) < 0) & real).flatten(1).any(1).sum())
    assert mirrored["svhn"] == 0 and 10 < mirrored["cifar10"] < 54, mirrored


def test_a_small_set_under_ddp_still_gives_each_rank_a_batch(pack_root: Path, cache_dir: Path) -> None:
    """24 images, batches of 16, 2 ranks: 12 per rank, so the incomplete batch is kept (not 0 batches)."""
    from types import SimpleNamespace

    for loader_on_device in (False, True):
        dm = ImageClassificationData(
            root=str(pack_root), n_train=24, batch_size=16, on_device=loader_on_device, cache_dir=str(cache_dir)
        )
        progress = SimpleNamespace(
            epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=0)),
            epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(ready=0))),
        )
        dm.trainer = SimpleNamespace(
            world_size=2, global_rank=1, strategy=SimpleNamespace(root_device=torch.device("cpu")), fit_loop=progress
        )
        dm.setup("fit")
        batches = [y for _, y in dm.train_dataloader()]
        assert [len(y) for y in batches] == [12], loader_on_device


def test_empty_cache_entry_is_decoded_again(tmp_path: Path) -> None:
    """An empty .npy (what a node crash right after the rename can leave without fsync) makes np.load raise
    EOFError, not OSError/ValueError: it must cost a decode, not crash every later run."""
    path = tmp_path / "toy" / "train.npz"
    _toy_pack(path, [0, 1, 0, 1], ["a", "b"])
    cache = tmp_path / "cache"
    x, y, _ = load_pack(path, cache)
    for part in ("images", "labels", "classes"):
        (entry,) = cache.glob(f"*.{part}.npy")
        entry.write_bytes(b"")
        x2, y2, _ = load_pack(path, cache)
        assert torch.equal(x2, x) and torch.equal(y2, y), part
        assert entry.stat().st_size > 0, part  # rewritten


def test_a_download_stall_times_out_instead_of_hanging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's urlopen has no timeout: the fetch runs under a socket timeout, restored afterwards, and
    reading files already there (download=false) leaves the process's setting alone."""
    import socket

    from frep_lightning.data.datamodule import DOWNLOAD_STALL_S

    seen: list[float | None] = []

    def fake_read(self: ImageClassificationData, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        seen.append(socket.getdefaulttimeout())
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), ["a"]

    monkeypatch.setattr(ImageClassificationData, "_read_torchvision", fake_read)
    before = socket.getdefaulttimeout()
    for download in (True, False):
        ImageClassificationData(root=str(tmp_path), format="torchvision", download=download)._load_torchvision(True)
    assert seen == [DOWNLOAD_STALL_S, before] and socket.getdefaulttimeout() == before
    assert 0 < DOWNLOAD_STALL_S <= 300


def test_downloads_into_one_root_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel sweep jobs with data.download=true on a fresh data.root: torchvision writes the archive and
    extracts it in place, so a second job reading while the first writes fails ("corrupted"). One at a time."""
    import threading

    active, overlaps, errors = [0], [], []
    guard = threading.Lock()

    def fake_read(self: ImageClassificationData, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        with guard:
            active[0] += 1
            overlaps.append(active[0])
        time.sleep(0.2)  # the "download"
        with guard:
            active[0] -= 1
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), ["a"]

    monkeypatch.setattr(ImageClassificationData, "_read_torchvision", fake_read)
    start = threading.Barrier(3)

    def job() -> None:
        try:
            dm = ImageClassificationData(root=str(tmp_path / "fresh"), format="torchvision", download=True)
            start.wait()
            dm._load_torchvision(True)
        except Exception as err:  # reported below: an exception in a thread would only warn
            errors.append(err)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(overlaps) == 3 and max(overlaps) == 1, (errors, overlaps)


def test_a_download_into_a_read_only_root_still_reads_the_files_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.download=true over a read-only data.root (a shared dataset directory) holding torchvision's files:
    torchvision verifies them and downloads nothing, so the lock file that cannot be created there must not
    turn a working run into "fetching ... failed (Permission denied)"."""
    import errno

    from frep_lightning.data import datamodule

    real_open = os.open

    def read_only_open(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(".download.lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    def fake_read(self: ImageClassificationData, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), ["a"]

    monkeypatch.setattr(ImageClassificationData, "_read_torchvision", fake_read)
    monkeypatch.setattr(datamodule.os, "open", read_only_open)
    dm = ImageClassificationData(root=str(tmp_path), format="torchvision", download=True)
    images, labels, _ = dm._load_torchvision(True)
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [0]
