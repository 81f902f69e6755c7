#!/usr/bin/env bash
# Build .gpu/ (git-ignored), the tree experiments/gpu/*.sh expect on a lent GPU machine, which has torch,
# torchvision and lightning but no internet and none of hydra / omegaconf / pyautoattack:
#   .gpu/site/  hydra (with its yaml), omegaconf, antlr4 runtime, pyautoattack's .py files only (its wheel
#               ships a 44 MB example model), copied from this checkout's .venv
#   .gpu/data/cifar10/  the offline CIFAR-10 pack (train.npz, test.npz, README.md)
# ~58 MB in all, under the device tool's 64 MiB carry limit. Then: run(..., carry=[".gpu"]).
# Usage (repo root, after `make install`): bash experiments/gpu/prepare.sh [PACK_DIR]  (default ../shared/data)
set -euo pipefail
PACK="${1:-${FREP_DATA_DIR:-../shared/data}}"
PY="${PYTHON:-.venv/bin/python}"
[ -f "$PACK/cifar10/train.npz" ] || { echo "no CIFAR-10 pack at $PACK/cifar10 (pass the pack dir)" >&2; exit 1; }
rm -rf .gpu/site .gpu/data
mkdir -p .gpu/site .gpu/data/cifar10
"$PY" - <<'PY'
import importlib, shutil
from pathlib import Path

junk = shutil.ignore_patterns("__pycache__", "*.pyc")
for name in ("hydra", "omegaconf", "antlr4"):
    src = Path(importlib.import_module(name).__file__).parent
    shutil.copytree(src, Path(".gpu/site") / name, ignore=junk)
src = Path(importlib.import_module("pyautoattack").__file__).parent
dst = Path(".gpu/site/pyautoattack")
dst.mkdir()
for f in src.glob("*.py"):
    shutil.copy2(f, dst / f.name)
PY
cp "$PACK/cifar10/train.npz" "$PACK/cifar10/test.npz" .gpu/data/cifar10/
[ -f "$PACK/cifar10/README.md" ] && cp "$PACK/cifar10/README.md" .gpu/data/cifar10/
du -sh .gpu/site .gpu/data
