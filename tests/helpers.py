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
