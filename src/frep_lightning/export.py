"""Merge at fit end (Alg. 1 line 19) and atomic writing of ``model.pt`` / ``summary.json``.

``on_train_end`` of :class:`~frep_lightning.ensemble.TemporalEnsemble` has already copied the
ensemble into the live module when ``on_fit_end`` runs, so this callback merges a copy of
whatever the module holds then: the ensemble when there is one. The file is a plain state_dict
of the unmodified backbone (``weight`` keys, no masks, no factors) that loads with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import secrets
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from frep_lightning.pruning import sparsity_report
from frep_lightning.reparam import iter_masked, merge_


def _new_temp_file(path: Path) -> tuple[int, str]:
    """A new empty file beside ``path``, opened for writing, with the permissions a plain ``open`` would
    give (0666 minus the umask; ``tempfile.mkstemp`` makes 0600, which hid models and checkpoints from
    the rest of a team sharing a sweep directory). Thread-safe: the kernel applies the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a power loss after ``os.replace`` could otherwise lose
    it); best effort: some platforms and file systems cannot open or sync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], write: Any) -> None:
    """Write via ``write(file_object)`` to a temp file in the same directory, then rename:
    a crash never leaves a half-written file under the final name, and the data and the rename are
    synced to disk before returning (a checkpoint that was reported saved survives a power loss)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


class NotOurFileError(ValueError):
    """A file is not a state_dict / checkpoint that frep-lightning wrote (or is damaged)."""


def safe_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never arbitrary
    pickled objects (which run code on load); any refusal names the file and says why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n\n")[0].split(". Please")[0]
        raise NotOurFileError(
            f"{path} is not a state_dict or checkpoint written by frep-lightning: it holds objects other than "
            f"tensors and plain containers, or is damaged, and is refused rather than unpickled ({reason.strip()})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:  # truncated zip, not a torch file at all
        raise NotOurFileError(f"{path} is not a readable torch file (truncated or another format): {err}") from err


def load_state_dict_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` state_dict such as ``model.pt``, loaded safely and type-checked."""
    state = safe_load(path, map_location=map_location)
    if isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state:
        raise NotOurFileError(
            f"{path} is a Lightning training checkpoint (reparameterized factors and masks), not an exported "
            "model; use the run's model.pt, or resume training from it with ckpt_path="
        )
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise NotOurFileError(f"{path} is not a state_dict (expected a non-empty dict of name -> tensor)")
    return state


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode()))


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain state_dict of a merged copy of ``model`` (``model`` itself is not changed)."""
    plain = merge_(copy.deepcopy(model))
    return {k: v.detach().cpu().clone() for k, v in plain.state_dict().items()}


class MergeReparameterization(Callback):
    """At fit end, merge W1·W2 (or M·W2) of the module's ``attr`` submodule and save ``model.pt``.

    Args:
        dirpath: output directory (default: the trainer's ``default_root_dir``).
        filename: file name of the merged state_dict.
        attr: submodule of the LightningModule to export (``None``: the whole module).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "model.pt", attr: str | None = "model") -> None:
        if not filename:
            raise ValueError("export.filename must not be empty")
        self.dirpath = dirpath
        self.filename = filename
        self.attr = attr
        self.path: Path | None = None
        self.report: dict[str, Any] | None = None

    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.attr is None:
            return pl_module
        target = getattr(pl_module, self.attr, None)
        if not isinstance(target, nn.Module):
            what = "no such attribute" if target is None else f"a {type(target).__name__}, not a submodule"
            raise AttributeError(
                f"MergeReparameterization(attr={self.attr!r}): in the LightningModule that is {what}; "
                "pass the name of the backbone submodule, or attr=None to export the whole module"
            )
        return target

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.target(pl_module)  # fail before training, not after it

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Delete the temp files of a write of this file that a kill interrupted (a resume into the same
        directory): each is as big as the model, none was ever the file itself (atomic rename)."""
        directory = Path(self.dirpath or trainer.default_root_dir)
        if trainer.is_global_zero and directory.is_dir():
            removed = sorted(directory.glob(f".{self.filename}.*.tmp"))
            for tmp in removed:
                tmp.unlink(missing_ok=True)
            if removed:
                rank_zero_info(f"MergeReparameterization: removed {len(removed)} partial write(s): {removed}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from frep_lightning.ensemble import TemporalEnsemble

        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, TemporalEnsemble):  # the ensemble is what is exported, even before its on_fit_end
                cb.keep(trainer, pl_module)
        model = self.target(pl_module)
        prunable = [f"{n}.weight" for n, _, _ in iter_masked(model)]
        state = merged_state_dict(model)
        self.report = sparsity_report({k: state[k] for k in prunable})
        self.path = Path(self.dirpath or trainer.default_root_dir) / self.filename
        if trainer.is_global_zero:
            save_state_dict(state, self.path)
            rank_zero_info(
                f"MergeReparameterization: wrote {self.path} (merged; {self.report['sparsity']:.4f} of the weights of "
                f"its {len(prunable)} masked layers are zero)"
            )
        trainer.strategy.barrier("frep_export")
