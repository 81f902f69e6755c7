"""Exact resume, atomic and finite checkpoints, safe loading, and failures that say what to do.

A "kill" is a callback raising at the start of a given optimizer step, after ``last.ckpt`` was
written; the next run resumes with ``ckpt_path=<that file>``. The resumed chain must reproduce
the uninterrupted run step by step: same batches, same global RNG, same learning rate, same
weights and ensemble after every step, same masks, same final metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

import frep_lightning.train as train_module
from frep_lightning.checkpointing import (
    COMPACT_MASKS,
    AtomicCheckpointIO,
    BackgroundCheckpointIO,
    LastCheckpoint,
    NonFiniteStateError,
    RNGState,
)
from frep_lightning.config import ConfigError, config_dir
from frep_lightning.data import ImageClassificationData
from frep_lightning.ensemble import TemporalEnsemble
from frep_lightning.export import NotOurFileError, load_state_dict_file, safe_load, save_state_dict
from frep_lightning.module import FReP
from helpers import quiet_trainer

SRC = Path(__file__).resolve().parents[1] / "src" / "frep_lightning"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Killed(RuntimeError):
    """The simulated preemption."""


class Recorder(pl.Callback):
    """Records what every optimizer step saw and produced; raises at step ``kill_at``."""

    def __init__(self, log: dict[str, dict[int, Any]], kill_at: int | None = None) -> None:
        self.rec, self.kill_at = log, kill_at

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self.epoch_means(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_means(trainer, trainer.current_epoch - 1)

    def epoch_means(self, trainer: pl.Trainer, epoch: int) -> None:
        """The logged means of a finished epoch (an epoch cut by a kill included)."""
        metrics = trainer.callback_metrics
        names = ("train/loss_epoch", "train/acc", "train/acc_adv")
        means = {k: float(metrics[k]) for k in names if k in metrics}
        if means:  # a run resumed at an epoch start has logged nothing yet
            self.rec["epoch_means"][epoch] = means

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        step = trainer.global_step
        if step == self.kill_at:
            raise Killed(f"killed at step {step}")
        self.rec["batch"][step] = digest({"x": batch[0], "y": batch[1]})
        self.rec["rng"][step] = digest({"rng": torch.get_rng_state()})
        self.rec["lr"][step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.rec["where"][step] = (trainer.current_epoch, idx)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.rec["live"][trainer.global_step] = digest(pl_module.state_dict())
        ensemble = next(cb for cb in trainer.callbacks if isinstance(cb, TemporalEnsemble))  # type: ignore[attr-defined]
        if ensemble.n_updates > 0:  # before its first update (tau = 0: a copy) the ensemble is not used
            self.rec["ensemble"][trainer.global_step] = digest(ensemble._average_model.state_dict())


def new_log() -> dict[str, dict[int, Any]]:
    return {k: {} for k in ("batch", "rng", "lr", "where", "live", "ensemble", "epoch_means")}


@pytest.fixture
def deterministic() -> Iterator[None]:
    """trainer.deterministic=true flips a process-wide switch; put it back for the other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def tiny_cfg(pack_root: Path, cache_dir: Path, run_dir: Path, *extra: str) -> DictConfig:
    """2 steps per epoch, 3 epochs: prune at the start of epoch 1, LR /10 at epoch 2."""
    overrides = [
        "experiment=smoke",
        "model.width=2",
        f"data.root={pack_root}",
        f"data.cache_dir={cache_dir}",
        "data.n_train=8",
        "data.batch_size=4",
        "data.n_val=8",
        "data.eval_batch_size=8",
        "eval.n_test=8",
        "eval.pgd_steps=1",
        "eval.batch_size=8",
        "val_attack_steps=1",
        "monitor.n_images=8",
        "monitor.steps=1",
        "trainer.max_epochs=3",
        "pruning.epoch=1",
        "optim.milestones=[2]",
        "ensemble.every_n_steps=2",
        "ensemble.bn_batches=1",
        "logger=none",
        "checkpoint.every_n_train_steps=1",
        "trainer.deterministic=true",
        *extra,
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def run_with(cfg: DictConfig, monkeypatch: pytest.MonkeyPatch, *extra: pl.Callback) -> dict[str, Any]:
    """``train.run`` with extra callbacks first in the list (before the checkpoint callback)."""
    build = train_module.build_callbacks

    def with_extra(cfg: DictConfig, run_dir: Path) -> Any:
        callbacks, export = build(cfg, run_dir)
        return [*extra, *callbacks], export

    with monkeypatch.context() as m:
        m.setattr(train_module, "build_callbacks", with_extra)
        return train_module.run(cfg)


def final_state(run_dir: Path) -> dict[str, Any]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {
        "masks": {k: v for k, v in ckpt["state_dict"].items() if k.endswith(".mask")},
        "ensemble": ckpt["state_dict"],
        "live": ckpt["current_model_state"],
        "callbacks": ckpt["callbacks"],
        "model.pt": load_state_dict_file(run_dir / "model.pt"),
    }


# kill points (global step at which the next step would start; last.ckpt holds the state before it)
# (every step of a run, epoch boundaries included, is covered cheaply by the loader test below)
KILLS = {
    2: "before pruning, at the epoch-0 boundary (after validation, before epoch 1 prunes)",
    3: "right after pruning, mid-epoch 1",
    5: "after the LR drop, mid-epoch 2",
}


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("path", ["plain", "fast"])
def test_resume_from_any_point_equals_uninterrupted_run(
    pack_root: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """``fast``: FastFReP (manual optimization, its own step and running sums; eager on the CPU)."""
    fast = ["fast.enabled=true"] if path == "fast" else []

    def tiny(run_dir: Path, *extra: str) -> DictConfig:
        return tiny_cfg(pack_root, cache_dir, run_dir, *fast, *extra)

    ref_log = new_log()
    ref = run_with(tiny(tmp_path / "ref"), monkeypatch, Recorder(ref_log))
    assert ref["global_steps"] == 6 and ref_log["lr"][5] == pytest.approx(0.01)
    assert sorted(ref_log["epoch_means"]) == [0, 1, 2] and all(len(m) == 3 for m in ref_log["epoch_means"].values())

    log, ckpt, clock = new_log(), None, [0.0]
    for i, step in enumerate(KILLS):
        run_dir = tmp_path / f"part{i}"
        extra = [f"ckpt_path={ckpt}"] if ckpt else []
        with pytest.raises(Killed):
            run_with(tiny(run_dir, *extra), monkeypatch, Recorder(log, kill_at=step))
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        saved = torch.load(ckpt, weights_only=True)
        assert saved["global_step"] == step, KILLS[step]
        check_checkpoint_contents(saved, step)
        clock.append(saved["callbacks"]["TrainingClock"]["seconds"])
    resumed = run_with(tiny(tmp_path / "final", f"ckpt_path={ckpt}"), monkeypatch, Recorder(log))
    # training time adds up across the segments (each checkpoint holds the time trained up to it)
    assert clock == sorted(clock) and clock[-1] > clock[1] > 0
    assert resumed["train_seconds_total"] > clock[-1]  # the earlier segments plus this one (train_seconds also
    # counts this process's set-up, which can exceed the short earlier segments: no order between the two)
    assert 0 < ref["train_seconds_total"] <= ref["train_seconds"]

    for key in ref_log:  # step by step, from every resume point on
        assert log[key] == ref_log[key], key

    a, b = final_state(tmp_path / "ref"), final_state(tmp_path / "final")
    assert a["masks"] and all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])  # exact
    for k, v in a["ensemble"].items():
        torch.testing.assert_close(b["ensemble"][k], v, rtol=1e-6, atol=1e-7)
    for k, v in a["model.pt"].items():
        torch.testing.assert_close(b["model.pt"][k], v, rtol=1e-6, atol=1e-7)
    for name in ("RobustPruning", "TemporalEnsemble", "RobustnessMonitor"):
        states = [v for k, v in a["callbacks"].items() if k.startswith(name)]
        assert states == [v for k, v in b["callbacks"].items() if k.startswith(name)], name
    for key in ("clean_acc", "pgd_acc", "sparsity", "epochs", "global_steps", "overfitting_epochs", "n_test"):
        assert resumed[key] == pytest.approx(ref[key]), key

    # killed after the last checkpoint but before model.pt: resuming from a finished run's last.ckpt
    # trains 0 steps (Lightning skips the loop and on_train_end) and must still export the ensemble
    done = tmp_path / "final" / "checkpoints" / "last.ckpt"
    again = run_with(tiny(tmp_path / "again", f"ckpt_path={done}"), monkeypatch)
    exported = load_state_dict_file(tmp_path / "again" / "model.pt")
    assert exported.keys() == b["model.pt"].keys()
    assert all(torch.equal(exported[k], v) for k, v in b["model.pt"].items())
    assert again["clean_acc"] == resumed["clean_acc"] and again["pgd_acc"] == resumed["pgd_acc"]


def check_checkpoint_contents(ckpt: dict[str, Any], step: int) -> None:
    """Everything a resume needs is in the file (and it loaded with weights_only=True)."""
    ensemble_sd, live_sd = ckpt["state_dict"], ckpt["current_model_state"]
    factors = [k for k in live_sd if k.endswith("parametrizations.weight.original1")]
    masks = [k for k in live_sd if k.endswith("parametrizations.weight.0.mask")]
    assert factors and len(factors) == len(masks) and set(ensemble_sd) == set(live_sd)
    pruned = step >= 3
    sparsity = sum(int((live_sd[k] == 0).sum()) for k in masks) / sum(live_sd[k].numel() for k in masks)
    assert (sparsity == pytest.approx(0.9, abs=1e-3)) if pruned else sparsity == 0.0
    assert all(torch.equal(ensemble_sd[k], live_sd[k]) for k in masks)  # same masks in both models
    assert all(live_sd[k].dtype == torch.bool for k in masks)  # stored compactly through the trainer's IO
    states = {k.split("{")[0]: v for k, v in ckpt["callbacks"].items()}
    assert states["RobustPruning"]["pruned"] is pruned
    ens = states["TemporalEnsemble"]
    assert ens["interval"] == (20 if step >= 5 else 2) and ens["lr_at_interval_change"] > 0
    # updates at steps t with t % 2 == 0 while the interval is 2: steps 2 and 4 (the LR drop seen after
    # step 4, the epoch's last, applies from step 5 on)
    assert ens["latest_update_step"] == (4 if step >= 5 else 2 if step >= 2 else 0)
    assert int(ckpt["averaging_state"]["n_averaged"]) == (2 if step >= 5 else 1 if step >= 2 else 0)  # updates
    assert set(states["RNGState"]) == {"torch", "torch.cuda", "numpy", "python"}
    momentum = [s["momentum_buffer"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert momentum and all(isinstance(m, torch.Tensor) for m in momentum)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == step // 2
    # the training loader's position: (epoch, batches of it already trained on)
    epoch, batches = {2: (0, 2), 3: (1, 1), 5: (2, 1)}[step]
    (position,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position == {
        "epoch": epoch,
        "batches": batches,
        "order": "epoch_seeded",
        "batch_size": 4,
        "num_replicas": 1,
        "seed": 0,
        "n": 8,
    }


# ---- the training loader alone: every kill point of a run, cheaply ---------------------------------
class Linear(pl.LightningModule):
    """Draws from the global RNG in training and validation, as the attacks do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        x, y = batch
        noise = torch.rand(()).item()
        return nn.functional.cross_entropy(self.fc(x.flatten(1)), y) * (1 + noise)

    def validation_step(self, batch: Any, idx: int) -> None:
        torch.rand(3)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [1, 2], 0.5)}


class HookLog(pl.Callback):
    def __init__(self, out: list[Any], kill_at: int | None = None) -> None:
        self.out, self.kill_at = out, kill_at

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out.append(("epoch_start", trainer.current_epoch))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out.append(("val", trainer.current_epoch))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out.append(("epoch_end", trainer.current_epoch))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.kill_at:
            raise Killed
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        rng = digest({"r": torch.get_rng_state()})
        self.out.append((trainer.current_epoch, idx, lr, digest({"x": batch[0], "y": batch[1]}), rng))


def synthetic_datamodule(on_device: bool = False, workers: int = 0) -> ImageClassificationData:
    g = torch.Generator().manual_seed(0)
    dm = ImageClassificationData(
        n_train=12, n_val=4, batch_size=4, eval_batch_size=4, seed=3, on_device=on_device, num_workers=workers
    )
    dm._train = (torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(12) % 10)
    dm._test = (torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(4))
    return dm


def fit_linear(
    root: Path, out: list[Any], kill_at: int | None = None, ckpt: Path | None = None, loader: str = "cpu"
) -> None:
    pl.seed_everything(0)
    trainer = quiet_trainer(
        root,
        [HookLog(out, kill_at), RNGState(), LastCheckpoint(root, every_n_train_steps=1)],
        accelerator="auto",
        max_epochs=3,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=True,
        num_sanity_val_steps=0,
    )
    with contextlib.suppress(Killed):
        dm = synthetic_datamodule(on_device=loader == "device", workers=1 if loader == "workers" else 0)
        trainer.fit(Linear(), datamodule=dm, ckpt_path=ckpt, weights_only=True)


@pytest.mark.parametrize("loader", ["cpu", "workers", "device"])
def test_batches_hooks_and_rng_resume_exactly_from_every_step(tmp_path: Path, loader: str) -> None:
    """3 batches per epoch, 3 epochs: a kill before each of the 9 steps, epoch boundaries included
    (where Lightning would skip validation and the epoch hooks if the save were at the last batch).
    The datamodule's training loaders: collate in the main process, in a worker process (which
    draws its indices when the iterator is made), and data.on_device (batches made where the
    model is; on the CPU here)."""
    ref: list[Any] = []
    fit_linear(tmp_path / "ref", ref, loader=loader)
    assert sum(1 for r in ref if isinstance(r[0], int)) == 9
    assert [r[0] for r in ref if isinstance(r[0], str)].count("val") == 3
    for step in range(1, 9):
        before: list[Any] = []
        fit_linear(tmp_path / f"k{step}", before, kill_at=step, loader=loader)
        after: list[Any] = []
        fit_linear(tmp_path / f"r{step}", after, ckpt=tmp_path / f"k{step}" / "last.ckpt", loader=loader)
        assert after == ref[len(ref) - len(after) :], f"resume before step {step}"
        assert before == ref[: len(before)] and len(before) + len(after) >= len(ref)


def test_shuffle_is_per_epoch_and_split_across_ranks() -> None:
    from frep_lightning.data.resumable import EpochSeededSampler, SeededPairs

    data = SeededPairs(torch.zeros(10, 1), torch.arange(10))
    s0 = EpochSeededSampler(data, batch_size=2, seed=0, num_replicas=2, rank=0)
    s1 = EpochSeededSampler(data, batch_size=2, seed=0, num_replicas=2, rank=1)
    e0 = [i for i, _ in s0]
    r1 = [i for i, _ in s1]
    assert sorted(e0 + r1) == list(range(10))  # the two ranks share the epoch without overlap
    s0.set_epoch(1)
    assert [i for i, _ in s0] != e0  # a new permutation every epoch
    s0.set_epoch(0)
    seeds = [seed for _, seed in s0]
    assert seeds[0] == seeds[1] != seeds[2]  # one augmentation seed per batch
    s0.skip_batches = 2
    assert [i for i, _ in s0] == e0[4:]


def test_cpu_loader_state_saved_after_an_epochs_last_batch_resumes_at_the_next_epoch() -> None:
    """A save at an epoch's last batch (a plain ModelCheckpoint(every_n_train_steps=...) makes one) holds
    batches == batches per epoch, while the trainer's epoch counter still shows that epoch when the
    iterator is made: the resumed loader starts the next epoch, from its first batch."""
    dm = synthetic_datamodule()  # 12 images, batches of 4: 3 per epoch
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 1, "batches": 3, **loader.position_key()})
    loader.epoch = lambda: 1  # what Lightning's counter shows at this point
    resumed = list(loader)
    reference = dm.train_dataloader()
    reference.sampler.set_epoch(2)
    expected = list(reference)
    assert len(resumed) == len(expected) == 3
    for (x1, y1), (x2, y2) in zip(resumed, expected, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("on_device", [False, True])
def test_mid_epoch_resume_with_another_seed_or_training_set_is_refused(on_device: bool) -> None:
    """The shuffle of an epoch is seeded by (seed, epoch) over the whole training set: resumed mid-epoch with
    another seed or another number of images, the rest of the epoch would come from another permutation
    (images trained twice, others skipped), as with another batch size. At an epoch start both may change."""
    saved = {"epoch": 1, "batches": 1, **synthetic_datamodule(on_device).train_dataloader().position_key()}
    other_seed = synthetic_datamodule(on_device)
    other_seed.seed = 4
    bigger = synthetic_datamodule(on_device)
    g = torch.Generator().manual_seed(1)
    bigger._train = (torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(16) % 10)
    for dm, key in ((other_seed, "seed (shuffle order): 3 -> 4"), (bigger, "training images (data.n_train): 12 -> 16")):
        loader = dm.train_dataloader()
        with pytest.raises(ValueError, match=rf"saved mid-epoch \(epoch 1, after 1 batch\).*{re.escape(key)}"):
            loader.load_state_dict(saved)
        loader.load_state_dict({**saved, "batches": 0})


def test_resume_with_another_seed_objective_or_optimizer_is_refused(
    pack_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """A resume restores the optimizer and LR schedule from the checkpoint: another optim.* would be ignored
    while the run's config.yaml records it. Another seed or objective would give a summary.json naming a run
    that never was. All are refused before anything is read, like another model or pruning target."""
    cfg = tiny_cfg(pack_root, cache_dir, tmp_path / "run")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"RunRecord": train_module.run_record(cfg)}}, ckpt)
    train_module.check_resume(tiny_cfg(pack_root, cache_dir, tmp_path / "x", f"ckpt_path={ckpt}"))  # same run
    refused = {
        "optim.lr=0.01": "optim.lr: 0.1 -> 0.01",
        "optim.milestones=[1]": "optim.milestones: [2] -> [1]",
        "optim.momentum=0": "optim.momentum: 0.9 -> 0.0",
        "seed=1": "seed: 0 -> 1",
        "objective=trades": "objective: 'SRE' -> 'TRADES'",
    }
    for extra, differs in refused.items():
        with pytest.raises(ConfigError, match=re.escape(differs)):
            train_module.check_resume(tiny_cfg(pack_root, cache_dir, tmp_path / "x", f"ckpt_path={ckpt}", extra))
    # the record holds plain values only: it loads with weights_only=True
    assert torch.load(ckpt, weights_only=True)["callbacks"]["RunRecord"]["optim.milestones"] == [2]


def test_a_truncated_or_foreign_ckpt_path_is_a_config_error(pack_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """A copy cut short (or any other file) is named as the ckpt_path it is, not a torch traceback."""
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "callbacks": {}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    for content in (None, b"not a checkpoint"):
        if content is not None:
            ckpt.write_bytes(content)
        cfg = tiny_cfg(pack_root, cache_dir, tmp_path / "x", f"ckpt_path={ckpt}")
        with pytest.raises(ConfigError, match=rf"ckpt_path={re.escape(str(ckpt))} cannot be read as a checkpoint"):
            train_module.check_resume(cfg)
    ckpt.unlink()  # a typo in the path is said as such, not as a damaged file
    with pytest.raises(ConfigError, match=rf"ckpt_path={re.escape(str(ckpt))} does not exist"):
        train_module.check_resume(tiny_cfg(pack_root, cache_dir, tmp_path / "x", f"ckpt_path={ckpt}"))


def test_sigterm_during_fit_ends_the_process_with_a_failure_status(tmp_path: Path) -> None:
    """Lightning turns SIGTERM into SIGTERMException, a SystemExit without a code: frep-train ended with
    status 0 and no model.pt or summary.json, so a scheduler or a sweep took the run as done."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class Terminated:
        def fit(self, *args: Any, **kwargs: Any) -> None:
            raise SIGTERMException

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        cfg = OmegaConf.create({"ckpt_path": None})
        train_module.fit(Terminated(), None, None, cfg, tmp_path)  # type: ignore[arg-type]
    message = info.value.code
    assert isinstance(message, str) and "stopped by SIGTERM" in message  # a message: exit status 1
    assert f"resume with ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}" in message


def test_partial_writes_of_a_killed_save_are_cleaned_up(tmp_path: Path) -> None:
    """A kill mid-write leaves a checkpoint-sized temp file: a resume into the same directory deletes it,
    a resume into a new one names the files beside the resumed checkpoint (that run may still be writing)."""
    run = tmp_path / "run"
    fit_linear(run, [], kill_at=4)
    stale = run / ".last.ckpt.0123456789ab.tmp"
    stale.write_bytes(b"PK half a checkpoint")
    other = run / ".model.pt.0123456789ab.tmp"  # not ours to judge
    other.write_bytes(b"x")
    fit_linear(run, [], ckpt=run / "last.ckpt")  # a requeued job: same directory
    assert not stale.exists() and other.exists() and (run / "last.ckpt").is_file()

    stale.write_bytes(b"PK half a checkpoint")
    with pytest.warns(UserWarning, match=r"1 partial write\(s\) beside the resumed checkpoint"):
        fit_linear(tmp_path / "new", [], ckpt=run / "last.ckpt")
    assert stale.exists()


# ---- atomic writes, finiteness, safe loading ------------------------------------------------------
def _crash_after_some_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    def partial_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated crash mid-write)")

    monkeypatch.setattr(torch, "save", partial_save)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "global_step": 4}
    io.save_checkpoint(good, path)
    with monkeypatch.context() as m:
        _crash_after_some_bytes(m)
        with pytest.raises(OSError, match="simulated crash"):
            io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 5}, path)
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temp file left behind
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 4 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    # a first write that crashes leaves no file at all under the final name
    with monkeypatch.context() as m:
        _crash_after_some_bytes(m)
        with pytest.raises(OSError):
            io.save_checkpoint(good, tmp_path / "fresh" / "last.ckpt")
    assert os.listdir(tmp_path / "fresh") == []


def test_model_pt_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    save_state_dict({"w": torch.ones(2)}, path)
    with monkeypatch.context() as m:
        _crash_after_some_bytes(m)
        with pytest.raises(OSError):
            save_state_dict({"w": torch.zeros(2)}, path)
    assert os.listdir(tmp_path) == ["model.pt"]
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))


def test_partial_model_pt_writes_of_a_killed_export_are_cleaned_up(tmp_path: Path) -> None:
    """SIGKILL during the export leaves a model-sized ``.model.pt.<hex>.tmp`` beside the run's files; a resume
    into the same directory deletes it (as LastCheckpoint does for its own), and nothing else."""
    from types import SimpleNamespace

    from frep_lightning.export import MergeReparameterization

    (tmp_path / ".model.pt.0123456789ab.tmp").write_bytes(b"partial")
    keep = [tmp_path / ".summary.json.0123456789ab.tmp", tmp_path / "model.pt.bak"]
    for path in keep:
        path.write_bytes(b"x")
    export = MergeReparameterization(dirpath=str(tmp_path))
    export.on_fit_start(SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path)), None)  # type: ignore[arg-type]
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_atomic_write_syncs_the_file_then_the_directory_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint reported saved survives a power loss: the data is synced before the rename and the
    directory holding the new name after it (a rename alone may still be in the page cache)."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_state_dict({"w": torch.ones(2)}, tmp_path / "model.pt")
    assert events == ["fsync-file", "replace", "fsync-dir"]


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    """model.pt, summary.json and last.ckpt follow the umask like any file the user writes (the temp file
    of an atomic write used to stay 0600: unreadable to the rest of a team sharing the sweep directory)."""
    from frep_lightning.export import write_json

    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(umask)
            files = (tmp_path / "model.pt", tmp_path / "summary.json", tmp_path / "checkpoints" / "last.ckpt")
            save_state_dict({"w": torch.ones(2)}, files[0])
            write_json({"clean_acc": 0.5}, files[1])
            AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, files[2])
            assert [oct(f.stat().st_mode & 0o777) for f in files] == [oct(mode)] * 3, oct(umask)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "last.ckpt", "model.pt", "summary.json"]


def test_non_finite_state_is_never_written(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
    bad = {"state_dict": {"w": torch.ones(2)}, "current_model_state": {"m.w": torch.tensor([1.0, float("nan")])}}
    with pytest.raises(NonFiniteStateError, match=r"current_model_state\.m\.w"):
        io.save_checkpoint({**bad, "global_step": 2}, path)
    assert io.load_checkpoint(path)["global_step"] == 1


def _reparameterized_state(sparsity: float, seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from frep_lightning.models import build_model
    from frep_lightning.pruning import apply_masks_, compute_masks
    from frep_lightning.reparam import reparameterize_

    torch.manual_seed(seed)
    model = reparameterize_(build_model("resnet18", width=8), kind="hadamard")
    apply_masks_(model, compute_masks(model, sparsity))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_masks_go_to_disk_as_one_bool_tensor_and_come_back_exactly(tmp_path: Path) -> None:
    """A quarter of a checkpoint was float masks, twice (live + ensemble): on disk they are bool and
    written once; our loader gives back the saved dict exactly; a plain torch.load + load_state_dict
    (LightningModule.load_from_checkpoint) gets the same float buffers."""
    model, live = _reparameterized_state(0.9, seed=0)
    ensemble = {k: (v.clone() if k.endswith(".mask") else v * 0.5) for k, v in live.items()}  # own buffers
    masks = [k for k in live if k.endswith(".mask")]
    n_mask = sum(live[k].numel() for k in masks)
    assert masks and all(live[k].dtype == torch.float32 for k in masks)
    soft = "conv.parametrizations.weight.0.mask"  # a mask that is not 0/1 (someone's soft mask) stays float
    ensemble[soft] = torch.tensor([0.5, 1.0])
    checkpoint = {"state_dict": ensemble, "current_model_state": live, "global_step": 7}
    before = {k: v.clone() for k, v in live.items()}

    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "compact.ckpt")
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    saved = torch.load(tmp_path / "compact.ckpt", weights_only=True)
    for k in masks:
        a, b = saved["state_dict"][k], saved["current_model_state"][k]
        assert a.dtype == torch.bool and torch.equal(a, live[k].bool())
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one tensor for both models
    assert saved["state_dict"][soft].dtype == torch.float32 and soft not in saved[COMPACT_MASKS]["state_dict"]
    saved_bytes = (tmp_path / "plain.ckpt").stat().st_size - (tmp_path / "compact.ckpt").stat().st_size
    assert saved_bytes >= 0.97 * 7 * n_mask  # 2 x 4 bytes per entry became 1
    assert all(torch.equal(live[k], v) for k, v in before.items()) and checkpoint.keys() == {  # input untouched
        "state_dict",
        "current_model_state",
        "global_step",
    }

    loaded = AtomicCheckpointIO().load_checkpoint(tmp_path / "compact.ckpt")
    assert loaded.keys() == checkpoint.keys()
    for key in ("state_dict", "current_model_state"):
        assert loaded[key].keys() == checkpoint[key].keys()
        for k, v in checkpoint[key].items():
            assert loaded[key][k].dtype == v.dtype and torch.equal(loaded[key][k], v), (key, k)
    ptr = {
        key: [loaded[key][k].untyped_storage().data_ptr() for k in masks] for key in checkpoint if key != "global_step"
    }
    assert all(a != b for a, b in zip(ptr["state_dict"], ptr["current_model_state"], strict=True))  # own tensors

    _, other = _reparameterized_state(0.5, seed=1)  # a module whose masks differ, then loads the file
    model.load_state_dict(other)
    model.load_state_dict(saved["current_model_state"])
    state = model.state_dict()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], live[k]) for k in masks)

    damaged = {**saved, COMPACT_MASKS: {"state_dict": {masks[0]: "load"}}}
    torch.save(damaged, tmp_path / "damaged.ckpt")
    with pytest.raises(ValueError, match="damaged checkpoint"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "damaged.ckpt")


def test_background_write_holds_the_state_of_its_save_point(tmp_path: Path) -> None:
    """checkpoint.background: the file holds the state at save time although training changes the tensors
    in place right after; the writer is waited for at teardown; a refused (non-finite) write is raised
    there, not lost, and the file on disk stays the last good one."""
    io = train_module.checkpoint_io(OmegaConf.create({"checkpoint": {"background": True}}))
    assert isinstance(io, BackgroundCheckpointIO) and isinstance(io.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(
        train_module.checkpoint_io(OmegaConf.create({"checkpoint": {"background": False}})), AtomicCheckpointIO
    )
    path = tmp_path / "last.ckpt"
    w = torch.arange(1_000_000, dtype=torch.float32)
    io.save_checkpoint({"state_dict": {"w": w}, "global_step": 1}, path)
    w.mul_(-1)  # the next training step, while the write may still be going on
    io.teardown()
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.arange(1_000_000.0))
    bad = {"state_dict": {"w": torch.tensor([float("nan")])}, "global_step": 2}
    # raised at teardown, or already at the save when the worker thread refused it before the save returned
    with pytest.raises(NonFiniteStateError):
        try:
            io.save_checkpoint(bad, path)
        finally:
            io.teardown()
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 1


class _SlowIO(AtomicCheckpointIO):
    """Takes 0.15 s per write and records when each write ends."""

    def __init__(self, ended: list[float]) -> None:
        super().__init__()
        self.ended = ended

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        time.sleep(0.15)
        super().save_checkpoint(checkpoint, path)
        self.ended.append(time.perf_counter())


def test_background_writes_never_pile_up(tmp_path: Path) -> None:
    """Saves faster than the disk (checkpoint.every_n_train_steps=1 on a fast GPU): each save waits for the
    previous write, so at most one clone of the state is ever waiting, and every file is complete."""
    ended: list[float] = []
    io = BackgroundCheckpointIO(_SlowIO(ended))
    returned = []
    for step in range(4):
        io.save_checkpoint({"state_dict": {"w": torch.full((1000,), float(step))}, "global_step": step}, tmp_path / "c")
        returned.append(time.perf_counter())
    io.teardown()
    assert len(ended) == 4
    for k in range(1, 4):  # save k returned only after write k-1 had ended
        assert returned[k] >= ended[k - 1]
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "c")["global_step"] == 3


@pytest.mark.usefixtures("deterministic")
def test_background_and_foreground_checkpoints_are_the_same_file(
    pack_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """A whole run (per-step checkpoints, pruning, ensemble): last.ckpt written in the background equals
    the one written before training continues, tensor for tensor."""
    states = []
    for background in (True, False):
        run_dir = tmp_path / str(background)
        cfg = tiny_cfg(pack_root, cache_dir, run_dir, f"checkpoint.background={str(background).lower()}")
        train_module.run(cfg)
        states.append(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True))
    for key in ("state_dict", "current_model_state"):
        assert states[0][key].keys() == states[1][key].keys()
        for name, tensor in states[0][key].items():
            assert torch.equal(tensor, states[1][key][name]), f"{key}.{name}"
    assert states[0]["global_step"] == states[1]["global_step"] == 6


class Payload:
    """Unpickling this runs code: creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


def test_pickled_objects_are_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "model.pt"
    torch.save({"net.weight": torch.ones(1), "extra": Payload(marker)}, evil)
    with pytest.raises(NotOurFileError, match="not a state_dict or checkpoint written by frep-lightning"):
        safe_load(evil)
    with pytest.raises(NotOurFileError):
        load_state_dict_file(evil)
    with pytest.raises(NotOurFileError):
        AtomicCheckpointIO().load_checkpoint(evil)
    with pytest.raises(ValueError, match="weights_only=True only"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists()
    # well-formed files of the wrong kind get a clear message too
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(NotOurFileError, match="expected a non-empty dict of name -> tensor"):
        load_state_dict_file(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(NotOurFileError, match="or is damaged, and is refused"):
        load_state_dict_file(tmp_path / "junk.pt")
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6"}, tmp_path / "last.ckpt")
    with pytest.raises(NotOurFileError, match="Lightning training checkpoint"):
        load_state_dict_file(tmp_path / "last.ckpt")


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    calls = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        start = 0
        while (i := text.find("torch.load(", start)) >= 0:
            depth, j = 0, i + len("torch.load")
            while True:  # the call's full argument list, across lines
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
            calls.append((path.name, text[i:j]))
            start = j
    assert calls, "expected torch.load calls"
    unsafe = [c for c in calls if "weights_only=True" not in c[1] and "``" not in c[1]]
    assert unsafe == []


# ---- failures: non-finite loss, out of memory ------------------------------------------------------
@pytest.mark.usefixtures("deterministic")
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(
    pack_root: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frep_lightning.objectives import SRE

    calls = {"n": 0}
    original = SRE.__call__

    def nan_from_step_3(self: SRE, *args: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = original(self, *args)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(SRE, "__call__", nan_from_step_3)
    cfg = tiny_cfg(pack_root, cache_dir, tmp_path / "run", "monitor=null")
    with pytest.raises(FloatingPointError) as info:
        train_module.run(cfg)
    message = str(info.value)
    assert "non-finite training loss (nan) at step 3" in message and "optim.lr" in message
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is kept: {last}" in message
    ckpt = AtomicCheckpointIO().load_checkpoint(last)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["current_model_state"].values() if v.is_floating_point())


def test_out_of_memory_names_the_batch_size(
    pack_root: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(self: FReP, batch: Any, batch_idx: int) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FReP, "training_step", oom)
    cfg = tiny_cfg(pack_root, cache_dir, tmp_path / "run", "monitor=null", "checkpoint.every_n_train_steps=null")
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        train_module.run(cfg)
    message = str(info.value)
    assert "data.batch_size=4" in message and "lower data.batch_size (e.g. data.batch_size=2)" in message
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in message


# ---- a resume continues the same run ------------------------------------------------------------
class StepCount(pl.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.n += 1


@pytest.mark.usefixtures("deterministic")
def test_resume_with_other_settings_is_refused_before_training(
    pack_root: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved right after pruning, mid-epoch 1 (step 3): a resume that would change what the run is, or
    the batches its position counts, stops before any step and names what differs."""
    with pytest.raises(Killed):
        run_with(tiny_cfg(pack_root, cache_dir, tmp_path / "run"), monkeypatch, Recorder(new_log(), kill_at=3))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    refused = {
        ("pruning.sparsity=0.5",): "pruning: 'RobustPruning(unstructured, 0.9)' -> 'RobustPruning(unstructured, 0.5)'",
        ("pruning=structured",): (
            "pruning: 'RobustPruning(unstructured, 0.9)' -> 'RobustPruning(structured, 0.9) removing channels'"
        ),
        ("ensemble=none",): "ensemble: 'TemporalEnsemble' -> None",
        ("fast.enabled=true",): "fast.enabled: False -> True",  # another step counter: the ensemble would stall
        ("method=ori",): "method.name: 'frep' -> 'ori'; method.reparam_kind: 'hadamard' -> 'none'",
        ("model.width=3",): "model.width: 2 -> 3",
    }
    for extra, differs in refused.items():
        steps = StepCount()
        cfg = tiny_cfg(pack_root, cache_dir, tmp_path / "x", f"ckpt_path={ckpt}", *extra)
        with pytest.raises(ConfigError, match=re.escape(differs)) as info:
            run_with(cfg, monkeypatch, steps)
        assert f"ckpt_path={ckpt} was saved by a run with other settings" in str(info.value)
        assert steps.n == 0 and not (tmp_path / "x").exists(), extra  # before the run directory is made

    # the loader's position counts batches of 4: with batches of 2, part of epoch 1 would be trained twice
    steps = StepCount()
    with pytest.raises(ValueError, match=r"saved mid-epoch \(epoch 1, after 1 batch\).*data\.batch_size: 4 -> 2"):
        run_with(
            tiny_cfg(pack_root, cache_dir, tmp_path / "y", f"ckpt_path={ckpt}", "data.batch_size=2"), monkeypatch, steps
        )
    assert steps.n == 0

    # a checkpoint without the record (older files): the load error is named, not a raw state_dict dump
    state = torch.load(ckpt, weights_only=True)
    state["callbacks"] = {k: v for k, v in state["callbacks"].items() if not k.startswith("RunRecord")}
    bare = tmp_path / "bare.ckpt"
    torch.save(state, bare)
    with pytest.raises(ConfigError, match=r"its weights do not fit the model this config builds"):
        run_with(tiny_cfg(pack_root, cache_dir, tmp_path / "z", f"ckpt_path={bare}", "model.width=3"), monkeypatch)


def test_training_clock_reused_across_fits_restarts(tmp_path: Path) -> None:
    """One TrainingClock instance in two fits: the second reports its own time, not the sum."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import helpers
    from frep_lightning.checkpointing import TrainingClock

    class Slow(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            time.sleep(0.5)
            return self.layer(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    clock = TrainingClock()
    loader = DataLoader(TensorDataset(torch.rand(2, 2)), batch_size=1)
    helpers.quiet_trainer(tmp_path, [clock], max_epochs=1).fit(Slow(), loader)
    first = clock.seconds
    helpers.quiet_trainer(tmp_path, [clock], max_steps=1).fit(Slow(), loader)
    assert first >= 1.0 and clock.seconds < first  # one 0.5 s step, not 1.0 s + 0.5 s


class BNNet(pl.LightningModule):
    """A BatchNorm classifier for :func:`synthetic_datamodule` (3 batches per epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [1], 0.1)}


@pytest.mark.parametrize("validate", [False, True], ids=["updated_since_bn", "pruned_since_bn"])
def test_resume_refreshes_stale_ensemble_batchnorm_like_the_uninterrupted_run(tmp_path: Path, validate: bool) -> None:
    """One ensemble update at t=3 (the end of epoch 0; f_e = 3, then 30 after the LR drop), pruning at the
    start of epoch 1, which trains steps 4-6. In last.ckpt (end of epoch 0) the ensemble's BN statistics
    are stale: without validation they predate the update; with it they were recomputed, but pruning then
    changes the weights. The resumed run must know it from the checkpoint and recompute them at the end,
    as the uninterrupted run does."""
    from frep_lightning.pruning import RobustPruning

    def fit(root: Path, kill_at: int | None = None, ckpt: Path | None = None) -> dict[str, torch.Tensor]:
        pl.seed_everything(0)
        module, ensemble = BNNet(), TemporalEnsemble(every_n_steps=3, bn="recompute", bn_batches=2)
        trainer = quiet_trainer(
            root,
            [
                HookLog([], kill_at),
                ensemble,
                RobustPruning(0.5, epoch=1),
                LastCheckpoint(root),
            ],
            max_epochs=2,
            limit_val_batches=1 if validate else 0,
            num_sanity_val_steps=0,
            plugins=[AtomicCheckpointIO()],
            enable_checkpointing=True,
        )
        with contextlib.suppress(Killed):
            trainer.fit(module, datamodule=synthetic_datamodule(), ckpt_path=ckpt, weights_only=True)
        if kill_at is None:
            assert trainer.global_step == 6 and ensemble.n_updates == 1 and ensemble.interval == 30
        return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}

    ref = fit(tmp_path / "ref")
    fit(tmp_path / "part", kill_at=3)
    resumed = fit(tmp_path / "resumed", ckpt=tmp_path / "part" / "last.ckpt")
    assert ref and ref.keys() == resumed.keys()
    for k, v in ref.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_rng_state_restores_every_stream() -> None:
    """torch, numpy and Python's random come back to the saved point (user transforms may draw from any)."""
    import random

    import numpy as np

    from frep_lightning.checkpointing import collect_rng_states

    def draw() -> tuple[list[float], list[float], list[float]]:
        return torch.rand(3).tolist(), np.random.randn(3).tolist(), [random.random() for _ in range(3)]

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # numpy caches the second gaussian of a pair: part of its state
    state = RNGState()
    saved = torch.load(_round_trip(state.state_dict()), weights_only=True)
    expected = draw()
    draw()
    state.load_state_dict(saved)
    assert draw() == expected and state.restored
    assert set(collect_rng_states()) == {"torch", "torch.cuda", "numpy", "python"}


def _round_trip(obj: Any) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_masks_that_differ_between_the_models_stay_distinct(tmp_path: Path) -> None:
    """Only equal masks of the live and the ensemble model share one tensor on disk; different ones (a
    user's own averaging) each come back as saved."""
    key = "conv.parametrizations.weight.0.mask"
    live, ensemble = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {key: ensemble}, "current_model_state": {key: live}}, tmp_path / "a.ckpt")
    loaded = io.load_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(loaded["state_dict"][key], ensemble) and torch.equal(loaded["current_model_state"][key], live)


def test_resuming_step_limited_training_is_refused_by_frep_train_and_warned_in_lightning(
    pack_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Lightning 2.6 replays an epoch-end checkpoint's epoch end under ``max_steps`` and counts that epoch
    twice (measured: a max_epochs=2/max_steps=5 run resumed after epoch 0 stopped at step 3). frep-train
    refuses the combination before reading anything; LastCheckpoint in a user's Trainer says so."""

    def fit(ckpt: Path | None = None, **limits: Any) -> None:
        trainer = quiet_trainer(tmp_path, [LastCheckpoint(tmp_path / "ck")], enable_checkpointing=True, **limits)
        trainer.fit(Linear(), datamodule=synthetic_datamodule(), weights_only=True, ckpt_path=ckpt)

    fit(max_epochs=1)
    ckpt = tmp_path / "ck" / "last.ckpt"
    cfg = tiny_cfg(pack_root, cache_dir, tmp_path / "r", f"ckpt_path={ckpt}", "+trainer.max_steps=5")
    with pytest.raises(ConfigError, match=r"trainer\.max_steps=5 with ckpt_path: .* trainer\.max_epochs"):
        train_module.run(cfg)
    with pytest.warns(UserWarning, match=r"resuming with max_steps=5\. .* max_epochs for an exact resume"):
        fit(ckpt, max_steps=5)
