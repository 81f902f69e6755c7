"""The package's public names: everything in ``__all__`` imports (``from frep_lightning import *`` works)."""

from __future__ import annotations

import importlib


def test_every_public_name_resolves() -> None:
    pkg = importlib.import_module("frep_lightning")
    missing = [name for name in pkg.__all__ if not hasattr(pkg, name)]
    assert missing == []
    namespace: dict[str, object] = {}
    exec("from frep_lightning import *", namespace)
    assert {"FReP", "TemporalEnsemble", "RobustPruning", "MergeReparameterization", "merge"} <= namespace.keys()
