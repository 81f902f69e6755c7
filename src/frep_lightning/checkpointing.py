"""Checkpoints that survive preemption: atomic, finite, safe to load, and complete enough to
resume a run exactly.

* :class:`AtomicCheckpointIO` writes a checkpoint to a temp file in the target directory, fsyncs
  it and renames it over the final name, so a crash mid-write never leaves a truncated
  ``last.ckpt`` (Lightning's default stages the file in the system temp dir and *copies* it
  across file systems, which is not atomic). It refuses to write model state holding NaN/Inf,
  so the file on disk is always the last good one, and it loads with ``weights_only=True`` only.
  Pruning masks go to disk as ``bool`` (1 byte instead of 4), stored once when the live and the
  ensemble model hold the same mask (they always do): a quarter of a ResNet-18 checkpoint was masks.
  ``load_state_dict`` copies them into the float buffers as they are; :meth:`AtomicCheckpointIO.load_checkpoint`
  gives them back their saved dtype.
* :class:`LastCheckpoint` keeps one ``last.ckpt``, written at epoch ends (after validation and
  every epoch-end hook) and, optionally, every N optimizer steps inside an epoch, never at the
  epoch's last batch: Lightning resumes a checkpoint taken there as "mid-epoch" and skips that
  epoch's validation, its ``on_train_epoch_end`` and the next ``on_train_epoch_start`` (where
  pruning happens), so the resumed run would diverge.
* :class:`BackgroundCheckpointIO` writes them in a background thread (``checkpoint.background``),
  one write in flight at most.
* :class:`RNGState` puts the global random state (torch, CUDA, numpy, Python) into the
  checkpoint and restores it on resume: the training attack's random start draws from it.
  Batch order and augmentation have their own seeded state, see
  :mod:`frep_lightning.data.resumable`.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from frep_lightning.checks import check_int
from frep_lightning.export import atomic_write_bytes, safe_load

MODEL_STATE_KEYS = ("state_dict", "current_model_state")
MASK_KEY = re.compile(r"\.parametrizations\.[^.]+\.\d+\.mask$")  # the buffer of a frep parametrization
COMPACT_MASKS = "frep_compact_masks"  # checkpoint entry: {model state key: {mask name: saved dtype}}


class NonFiniteStateError(FloatingPointError):
    """Model state holds NaN/Inf; the checkpoint on disk was left as it was."""


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(tree, Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))


def non_finite_entries(checkpoint: dict[str, Any]) -> list[str]:
    """Names of floating-point model tensors (live and ensemble) that hold NaN or Inf."""
    bad = []
    for key in MODEL_STATE_KEYS:
        for name, tensor in _tensors(checkpoint.get(key, {}), key):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    return bad


def compact_masks(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` whose 0/1 floating-point pruning masks are ``bool`` tensors, one
    tensor object for equal masks of the live and the ensemble model (``torch.save`` writes a shared
    tensor once). Masks with other values are left as they are. The input is not modified."""
    out, record, seen = dict(checkpoint), {}, {}
    for key in MODEL_STATE_KEYS:
        state = checkpoint.get(key)
        if not isinstance(state, dict):
            continue
        new, dtypes = dict(state), {}
        for name, t in state.items():
            if not (isinstance(t, Tensor) and t.is_floating_point() and MASK_KEY.search(name)):
                continue
            mask, twin = t.bool(), seen.get(name)
            if not torch.equal(mask, t == 1):  # not a 0/1 mask: keep it as it is
                continue
            new[name] = seen[name] = twin if twin is not None and torch.equal(twin, mask) else mask
            dtypes[name] = str(t.dtype).removeprefix("torch.")
        if dtypes:
            out[key], record[key] = new, dtypes
    if record:
        out[COMPACT_MASKS] = record
    return out


def expand_masks(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`compact_masks` in place: every compacted mask back in its saved dtype, its own tensor."""
    record = checkpoint.pop(COMPACT_MASKS, None) or {}
    for key, dtypes in record.items():
        state = checkpoint.get(key)
        for name, dtype in dtypes.items():
            target = getattr(torch, str(dtype), None)
            if not isinstance(state, dict) or name not in state or not isinstance(target, torch.dtype):
                raise ValueError(f"damaged checkpoint: its {COMPACT_MASKS} entry names {key}/{name} as {dtype!r}")
            state[name] = state[name].to(target)
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes, a finiteness guard and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options")
        bad = non_finite_entries(checkpoint)
        if bad:
            raise NonFiniteStateError(
                f"refusing to write checkpoint {path}: non-finite values in {', '.join(bad[:5])}"
                f"{' and more' if len(bad) > 5 else ''} (step {checkpoint.get('global_step')}). The file on disk "
                "is the last good checkpoint. A resume restores its optimizer and LR schedule (another optim.lr "
                "is refused): to train with a lower optim.lr, start a new run."
            )
        checkpoint = compact_masks(checkpoint)
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)  # remote stores: fsspec's transactional write
            return
        atomic_write_bytes(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("frep-lightning loads checkpoints with weights_only=True only (no arbitrary unpickling)")
        if not _is_local_file_protocol(path):
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        else:
            checkpoint = safe_load(path, map_location=map_location)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry); cannot resume from it")
        return expand_masks(checkpoint)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's ``AsyncCheckpointIO`` (state cloned at the save point, written by one worker thread)
    with at most one write in flight: a save first waits for the previous one. Frequent saves
    (``checkpoint.every_n_train_steps``) then slow training to the disk's pace instead of queueing a
    device-side clone of the whole state per save until memory runs out. Loads and removals wait too."""

    def _wait(self) -> None:
        if self._executor is not None:
            self._executor.submit(lambda: None).result()  # one FIFO worker: everything before is done

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self._wait()
        super().save_checkpoint(*args, **kwargs)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._wait()
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self._wait()
        super().remove_checkpoint(*args, **kwargs)


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, overwritten at every save (through the trainer's CheckpointIO, i.e.
    atomically with :class:`AtomicCheckpointIO`).

    Saves at the end of every training epoch (after validation and the other callbacks'
    epoch-end hooks) and, with ``every_n_train_steps``, also every N optimizer steps except at an
    epoch's last batch, whose state the epoch-end save records instead (see the module docstring).
    """

    def __init__(self, dirpath: Any, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None:
            every_n_train_steps = check_int("checkpoint.every_n_train_steps", every_n_train_steps, 1)
        super().__init__(
            dirpath=dirpath,
            filename="last",
            save_top_k=1,
            enable_version_counter=False,
            every_n_train_steps=every_n_train_steps,
            save_on_train_epoch_end=True,
        )
        self.step_interval = every_n_train_steps

    @property
    def path(self) -> Path:
        return Path(str(self.dirpath)) / "last.ckpt"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        self.remove_partial_writes()
        resumed = Path(str(trainer.ckpt_path)) if trainer.ckpt_path else None
        if resumed is not None and trainer.max_steps != -1:
            rank_zero_warn(
                f"LastCheckpoint: resuming with max_steps={trainer.max_steps}. Lightning restores step-limited "
                "training inexactly from an epoch-end checkpoint: it replays that epoch's end and counts the epoch "
                "twice (the run can stop early at max_epochs, or train one batch too many). Limit the run with "
                "max_epochs for an exact resume"
            )
        if resumed is not None and resumed.parent != self.path.parent:
            left = sorted(resumed.parent.glob(f".{resumed.name}.*.tmp"))
            if left:  # another run's directory: that run may still be writing, so say it, do not delete
                rank_zero_warn(
                    f"LastCheckpoint: {len(left)} partial write(s) beside the resumed checkpoint, left by an "
                    f"interrupted save (each as big as a checkpoint; safe to delete once that run is over): {left}"
                )

    def remove_partial_writes(self) -> list[Path]:
        """Delete the temp files of writes a kill interrupted in this run's directory (each as big as a
        checkpoint; a resume into the same directory, e.g. a requeued job with a pinned hydra.run.dir).
        The atomic rename means none of them was ever ``last.ckpt``, and no write is in flight at fit start."""
        removed = sorted(self.path.parent.glob(f".{self.path.name}.*.tmp")) if self.path.parent.is_dir() else []
        for tmp in removed:
            tmp.unlink(missing_ok=True)
        if removed:
            rank_zero_info(f"LastCheckpoint: removed {len(removed)} partial write(s) of an interrupted run: {removed}")
        return removed

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end save records this state, after validation
        if pl_module.automatic_optimization:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif (
            self.step_interval is not None
            and trainer.global_step % self.step_interval == 0
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            # Manual optimization (the fast path): the state after the step is the one to save, as with
            # automatic optimization, since a resume counts this batch as trained. Lightning's own branch
            # for it warns about a "pre-optimization state" at every save; nothing is missing here.
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.step_interval is None:
            super().on_train_epoch_end(trainer, pl_module)
        elif not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch-end saves happen in ``on_train_epoch_end``, after this."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run usually writes into a new run directory: there is no best-k bookkeeping to
        carry over for a single ``last.ckpt`` (and Lightning would warn about the new dirpath)."""
        if state_dict.get("dirpath") == self.dirpath:
            super().load_state_dict(state_dict)


def collect_rng_states() -> dict[str, Any]:
    """The global random states, as tensors and plain Python values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }  # fmt: skip


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = states.get("torch.cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


class RNGState(Callback):
    """Saves the global random states with every checkpoint and restores them on resume.

    Under DDP rank 0 writes the checkpoint; every rank starts from the same seed and draws the
    same amount, so rank 0's state stands for all of them.
    """

    def __init__(self) -> None:
        self.restored = False

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng_states(state_dict)
        self.restored = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.restored = False


class TrainingClock(Callback):
    """Training wall time across resumes: a checkpoint records the seconds trained up to it, a resumed fit
    adds its own (``summary.json``'s ``train_seconds_total``; work redone after the checkpoint counts once)."""

    def __init__(self) -> None:
        self.before = 0.0
        self.started: float | None = None

    @property
    def seconds(self) -> float:
        return self.before + (0.0 if self.started is None else time.perf_counter() - self.started)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A new fit starts from zero (a resumed one then loads its checkpoint's seconds): a clock reused
        across fits must not add them up."""
        if stage == "fit":
            self.before, self.started = 0.0, None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before, self.started = self.seconds, None  # stopped: the final evaluation is not training

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("seconds", 0.0))


def record_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: checkpoint value -> this run's value`` for every key both records hold and disagree on."""
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in current if k in saved and saved[k] != current[k]]


class RunRecord(Callback):
    """Writes the settings that make a run *this* run (model, method, pruning target, ensemble, train step)
    into every checkpoint, and refuses to resume a checkpoint whose settings differ.

    A resume continues the saved run: silently resuming a 90 %-pruned checkpoint as a 50 % run, dropping
    its ensemble, or switching between step implementations with separate step counters gives a model
    and a ``summary.json`` that describe two different runs. ``frep-train`` compares before loading
    anything (:func:`read_run_record`); the check here also covers a Trainer built by hand.
    """

    def __init__(self, record: dict[str, Any]) -> None:
        if not isinstance(record, dict) or not all(isinstance(k, str) for k in record):
            raise ValueError(f"RunRecord(record={record!r}) must be a dict with string keys")
        self.record = dict(record)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.record)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mismatches = record_mismatches(state_dict, self.record)
        if mismatches:
            raise ValueError(mismatch_message("the checkpoint", mismatches))


def mismatch_message(what: str, mismatches: list[str]) -> str:
    return (
        f"{what} was saved by a run with other settings than this one ({'; '.join(mismatches)}). A resume "
        "continues the same run: resume with the checkpoint's values, or start a new run without ckpt_path"
    )


def callback_states(checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A checkpoint's callback states by class name (Lightning keys them ``Name{...init args}``)."""
    states = checkpoint.get("callbacks") or {}
    return {key.split("{")[0]: state for key, state in states.items() if isinstance(state, dict)}


def read_run_record(path: str | Path) -> dict[str, Any] | None:
    """The :class:`RunRecord` of a checkpoint file (memory-mapped: the weights are not read), or None."""
    return callback_states(torch.load(path, map_location="cpu", weights_only=True, mmap=True)).get("RunRecord")
