"""The offline dataset pack (``<root>/<name>/<split>.npz``): JPEGs decoded once, then cached.

Format (see the pack's README): ``jpeg`` (uint8, all files concatenated), ``offsets`` (int64,
N+1), ``labels`` (int64, N), ``classes`` (unicode). No pickles are loaded. Decoding 50k
32x32 JPEGs with a plain Pillow loop takes a few seconds, so no worker pool is used; the
decoded arrays are cached as ``.npy`` files keyed by the pack file's name, size and mtime so a
warm load is one file read (hashing 47 MB on every start would cost more than that read).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

KNOWN_SHA256 = {
    ("cifar10", "train"): "0ab895d8c06e285fd7c803ff228b2685c2b673b616b7100fb660dc9fdf26af47",
    ("cifar10", "test"): "e61cc3b047225301682788b775d4d0a5e2203eb095bfed35eca8526a49c9cf66",
}
CACHE_VERSION = 1  # bump when the decoded layout changes, so stale caches are not reused
_PARTS = ("labels", "classes", "images")  # images last: its presence marks a complete entry


def default_cache_dir() -> Path:
    """``$FREP_CACHE_DIR`` if set, else ``~/.cache/frep_lightning``."""
    env = os.environ.get("FREP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "frep_lightning"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (the train pack is 47 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(path: Path, dataset: str) -> str:
    st = path.stat()
    return f"{dataset}-{path.stem}-{st.st_size}-{st.st_mtime_ns}-v{CACHE_VERSION}"


def _read_cache(cache: Path, key: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    files = {part: cache / f"{key}.{part}.npy" for part in _PARTS}
    if not all(f.is_file() for f in files.values()):
        return None
    try:
        arrays = {part: np.load(f, allow_pickle=False) for part, f in files.items()}
    except (OSError, ValueError, EOFError):  # a damaged entry (EOFError: an empty file) is rebuilt, not fatal
        return None
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        return None
    return images, labels.astype(np.int64, copy=False), [str(c) for c in arrays["classes"]]


def _write_atomic(target: Path, array: np.ndarray) -> None:
    """Temp file in the same directory + os.replace: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename: a crash must not leave an empty entry
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should stay readable
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_cache(cache: Path, key: str, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        arrays = {"labels": labels, "classes": np.array(classes, dtype=str), "images": images}
        for part in _PARTS:
            _write_atomic(cache / f"{key}.{part}.npy", arrays[part])
    except OSError as err:  # an unwritable cache only costs speed
        warnings.warn(
            f"could not write the decoded-data cache in {cache} ({err}); decoding again next time",
            stacklevel=3,
        )


def _decode(path: Path, expected: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Verify (when the sha256 is known), read and decode one split."""
    want = f"expected sha256 {expected}" if expected else "no known sha256 for this file"
    if expected is not None:
        actual = file_sha256(path)
        if actual != expected:
            raise ValueError(
                f"dataset file {path} is corrupt or not the published pack: {want}, got {actual}; "
                "replace it with a fresh copy"
            )
    try:
        with np.load(path, allow_pickle=False) as npz:
            jpeg, offsets, labels, classes = (npz[k] for k in ("jpeg", "offsets", "labels", "classes"))
    except Exception as err:  # zip/format errors, missing keys, pickled members
        raise ValueError(f"cannot read dataset file {path} as a pack npz ({err}); {want}") from err
    n = len(labels)
    if jpeg.dtype != np.uint8 or offsets.shape != (n + 1,) or offsets[0] < 0 or offsets[-1] > len(jpeg):
        raise ValueError(f"dataset file {path} has inconsistent jpeg/offsets/labels arrays; {want}")
    buf = jpeg.tobytes()
    images: np.ndarray | None = None
    for i in range(n):
        try:
            img = np.asarray(Image.open(io.BytesIO(buf[offsets[i] : offsets[i + 1]])).convert("RGB"))
        except Exception as err:
            raise ValueError(f"dataset file {path}: image {i} does not decode ({err}); {want}") from err
        if images is None:
            images = np.empty((n, *img.shape), dtype=np.uint8)
        if img.shape != images.shape[1:]:
            raise ValueError(f"dataset file {path}: image {i} is {img.shape}, image 0 is {images.shape[1:]}")
        images[i] = img
    if images is None:
        raise ValueError(f"dataset file {path} holds no images; {want}")
    return (
        np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
        labels.astype(np.int64),
        [str(c) for c in classes],
    )


def load_pack(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One pack split as (uint8 images N×3×H×W, int64 labels N, class names), decoded once.

    ``dataset`` (default: the file's parent folder name) and the file stem (``train``/``test``)
    select the sha256 in :data:`KNOWN_SHA256`, checked on the first decode only.
    """
    path = Path(path).expanduser()
    dataset = dataset or path.parent.name
    if not path.is_file():
        expected = KNOWN_SHA256.get((dataset, path.stem))
        want = f"expected sha256 {expected}" if expected else "no known sha256 for this file"
        raise FileNotFoundError(f"dataset pack file not found: {path} ({want}; see the pack's README)")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = _cache_key(path, dataset)
    hit = _read_cache(cache, key)
    if hit is None:
        hit = _decode(path, KNOWN_SHA256.get((dataset, path.stem)))
        _write_cache(cache, key, *hit)
    images, labels, classes = hit
    return torch.from_numpy(images), torch.from_numpy(labels), classes
