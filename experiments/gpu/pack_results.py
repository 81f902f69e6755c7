"""Pack run dirs (summary, config, metrics, logs) and their model.pt as bitmask + nonzero values into one
tarball, small enough to come back from a lent GPU machine; `--unpack` restores model.pt files here."""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np
import torch


def compact(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in state.items():
        a = v.detach().cpu().numpy()
        if a.dtype.kind == "f" and a.size > 64:
            nz = a != 0
            out[f"{k}::bits"] = np.packbits(nz.ravel())
            out[f"{k}::values"] = a[nz]
            out[f"{k}::shape"] = np.asarray(a.shape, dtype=np.int64)
        else:
            out[k] = a
    return out


def expand(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for k in arrays:
        if k.endswith("::bits"):
            name = k[: -len("::bits")]
            shape = tuple(int(s) for s in arrays[f"{name}::shape"])
            n = int(np.prod(shape))
            nz = np.unpackbits(arrays[k])[:n].astype(bool)
            flat = np.zeros(n, dtype=arrays[f"{name}::values"].dtype)
            flat[nz] = arrays[f"{name}::values"]
            state[name] = torch.from_numpy(flat.reshape(shape))
        elif "::" not in k:
            state[k] = torch.from_numpy(np.asarray(arrays[k]))
    return state


def pack(run_dirs: list[Path], tar_path: Path) -> None:
    with tarfile.open(tar_path, "w:gz") as tar:
        for run in run_dirs:
            for f in sorted(run.rglob("*")):
                if f.is_file() and f.suffix in {".json", ".yaml", ".csv", ".log", ".txt"}:
                    tar.add(f, arcname=f"{run.name}/{f.relative_to(run)}")
            model = run / "model.pt"
            if model.is_file():
                buf = io.BytesIO()
                np.savez_compressed(buf, **compact(torch.load(model, map_location="cpu", weights_only=True)))
                info = tarfile.TarInfo(f"{run.name}/model.npz")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)


def unpack(tar_path: Path, dest: Path) -> None:
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    for npz in dest.rglob("model.npz"):
        with np.load(npz) as z:
            torch.save(expand(dict(z)), npz.with_suffix(".pt"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("tar", type=Path)
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--unpack", type=Path, help="extract into this folder and rebuild model.pt files")
    args = ap.parse_args()
    if args.unpack:
        unpack(args.tar, args.unpack)
    else:
        pack(args.runs, args.tar)
