"""Shared test helpers (importable from the test modules: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def quiet_trainer(root: str | Path, callbacks: Sequence[pl.Callback] = (), **overrides: Any) -> pl.Trainer:
    """A CPU Trainer that prints and writes nothing of its own (no logger, checkpoint, progress bar or
    model summary) under ``root``; each test passes only the flags its behaviour depends on."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "callbacks": list(callbacks),
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def tiny_run_overrides(pack_root: str | Path, cache_dir: str | Path) -> list[str]:
    """frep-train on 32 real images, 2 epochs of 2 steps, pruned after the first, an ensemble update every
    step: the smallest run that goes through pruning, the ensemble, the merge and the final evaluation."""
    return [
        "experiment=smoke",
        f"data.root={pack_root}",
        f"data.cache_dir={cache_dir}",
        "model.width=4",
        "data.n_train=32",
        "data.n_val=10",
        "data.batch_size=16",
        "trainer.max_epochs=2",
        "pruning.epoch=1",
        "optim.milestones=[1]",
        "ensemble.every_n_steps=1",
        "ensemble.bn_batches=1",
        "monitor=null",
    ]
