"""Shared fixtures: offline W&B, quiet Lightning, paths to the offline dataset pack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models on a 2-core CI machine: one intra-op thread is several times faster than two
# (thread hand-off dominates), and immune to an oversubscribed CPU.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
PACK_ROOT = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb_dir = tmp_path_factory.mktemp("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(wandb_dir / "netrc"))  # a developer's `wandb login` key stays out of tests
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def pack_root() -> Path:
    if not (PACK_ROOT / "cifar10" / "test.npz").exists():
        pytest.skip(f"offline dataset pack not found at {PACK_ROOT}")
    return PACK_ROOT


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decode cache for the whole session (decoding is the slow part of data tests)."""
    path = os.environ.get("FREP_TEST_CACHE_DIR")
    return Path(path) if path else tmp_path_factory.mktemp("frep-cache")
