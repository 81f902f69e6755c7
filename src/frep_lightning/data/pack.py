"""The offline dataset pack (``../shared/data/<name>/<split>.npz``): JPEGs decoded once, cached.

Format (see the pack's README): ``jpeg`` (uint8, all files concatenated), ``offsets`` (int64,
N+1), ``labels`` (int64, N), ``classes``. No pickles are loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

KNOWN_SHA256 = {
    ("cifar10", "train"): "0ab895d8c06e285fd7c803ff228b2685c2b673b616b7100fb660dc9fdf26af47",
    ("cifar10", "test"): "e61cc3b047225301682788b775d4d0a5e2203eb095bfed35eca8526a49c9cf66",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("FREP_CACHE_DIR") or Path.home() / ".cache" / "frep_lightning")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _decode(path: Path, expected: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if expected is not None and sha256(path) != expected:
        raise ValueError(f"dataset file {path} is corrupt or not the published pack: expected sha256 {expected}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            jpeg, offsets, labels, classes = npz["jpeg"], npz["offsets"], npz["labels"], npz["classes"]
    except Exception as err:
        hint = f"; expected sha256 {expected}" if expected else ""
        raise ValueError(f"cannot read dataset file {path} ({err}){hint}") from err
    images = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for i in range(len(labels)):
        img = Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")
        images[i] = np.asarray(img)
    return images.transpose(0, 3, 1, 2).copy(), labels.astype(np.int64), [str(c) for c in classes]


def load_pack(
    path: str | Path, cache_dir: str | Path | None = None, dataset: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images N×3×32×32, int64 labels, class names) of one pack split, via the cache."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    split = path.stem
    expected = KNOWN_SHA256.get((dataset or path.parent.name, split))
    st = path.stat()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = f"{path.parent.name}-{split}-{st.st_size}-{int(st.st_mtime)}"
    cached = cache / f"{key}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as npz:
            return torch.from_numpy(npz["images"]), torch.from_numpy(npz["labels"]), list(npz["classes"])
    images, labels, classes = _decode(path, expected)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz", dir=cache)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels, classes=np.array(classes))
        os.replace(tmp, cached)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return torch.from_numpy(images), torch.from_numpy(labels), classes
