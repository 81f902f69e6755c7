"""DDP on CPU (2 gloo processes): after pruning, masks and ensemble are bit-identical on every
rank, while each rank trained on its own share of the data; and the Hydra re-execution of
``frep-train`` for extra ranks is pinned to the parent's job and run directory.

``strategy=ddp`` (Lightning re-executes the script per extra rank) is what ``trainer=ddp`` uses;
``ddp_spawn`` cannot work with reparameterized models: it pickles the module, and
``torch.nn.utils.parametrize`` refuses to pickle parametrized modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from frep_lightning import RobustPruning, TemporalEnsemble
from frep_lightning.reparam import iter_masked

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


class DumpPerRank(pl.Callback):
    """Each rank writes what it holds at the end of the last epoch (before the ensemble replaces
    the live model) and the labels of the training batches it saw."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches: list[list[int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.batches.append(batch[1].tolist())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != trainer.max_epochs - 1:
            return
        ensemble = next(cb for cb in trainer.callbacks if isinstance(cb, TemporalEnsemble))  # type: ignore[attr-defined]
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, RobustPruning))  # type: ignore[attr-defined]
        state = {
            "masks": {n: p.mask.clone() for n, _, p in iter_masked(pl_module)},
            "ensemble": {k: v.clone() for k, v in ensemble._average_model.state_dict().items()},
            "live": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "meta": torch.tensor([int(pruning.pruned), ensemble.n_updates, trainer.world_size, trainer.global_rank]),
        }
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


# A frep-train entry script that also dumps per-rank state: Lightning's DDP launcher re-executes
# it (sys.argv[0]) for rank 1, exactly as it re-executes frep-train.
SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import frep_lightning.train as train
from test_ddp import DumpPerRank

build = train.build_callbacks

def with_dump(cfg, run_dir):
    callbacks, export = build(cfg, run_dir)
    return [*callbacks, DumpPerRank(Path(os.environ["FREP_TEST_DDP_OUT"]))], export

train.build_callbacks = with_dump
pin = train.pin_ddp_child_argv

def pin_and_record():
    pin()
    out = Path(os.environ["FREP_TEST_DDP_OUT"]) / ("argv" + os.environ.get("LOCAL_RANK", "0") + ".txt")
    out.write_text(chr(10).join(sys.argv[1:]))

train.pin_ddp_child_argv = pin_and_record
if __name__ == "__main__":
    train.main()
"""


@needs_gloo
def test_ddp_masks_and_ensemble_identical_across_ranks(pack_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """frep-train -m trainer=ddp on 2 CPU processes, pruning at epoch 1 of 2, as a sweep of one
    job: Lightning's own re-execution would start the whole sweep again in rank 1."""
    from frep_lightning.data.pack import load_pack

    load_pack(pack_root / "cifar10" / "train.npz", cache_dir)  # decode once, not in both ranks at once
    load_pack(pack_root / "cifar10" / "test.npz", cache_dir)
    script = tmp_path / "frep_train_ddp.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    overrides = [
        "experiment=smoke",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "model.width=2",
        f"data.root={pack_root}",
        f"data.cache_dir={cache_dir}",
        "data.n_train=16",
        "data.batch_size=4",
        "data.n_val=8",
        "eval.n_test=8",
        "eval.pgd_steps=1",
        "val_attack_steps=0",
        "monitor.n_images=8",
        "monitor.steps=1",
        "logger=csv",
        "trainer.max_epochs=2",
        "pruning.epoch=1",
        "pruning.sparsity=0.8",
        "ensemble.every_n_steps=1",
        "ensemble.bn_batches=1",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    env = {**os.environ, "FREP_TEST_DDP_OUT": str(dumps), "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "FREP_RUN_DIR", "FREP_DDP_CHILD_ARGV"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(script), "-m", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sync_dist=True" not in proc.stderr  # epoch metrics are equal on every rank and logged as such

    r0, r1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["meta"].tolist() == [1, 4, 2, 0] and r1["meta"].tolist() == [1, 4, 2, 1]  # pruned; 4 updates
    masks = list(r0["masks"])
    assert masks and all(torch.equal(r0["masks"][n], r1["masks"][n]) for n in masks)  # bit-identical
    zeros = sum(int((m == 0).sum()) for m in r0["masks"].values())
    assert zeros / sum(m.numel() for m in r0["masks"].values()) == pytest.approx(0.8, abs=1e-3)
    assert set(r0["ensemble"]) == set(r1["ensemble"])
    assert all(torch.equal(r0["ensemble"][k], r1["ensemble"][k]) for k in r0["ensemble"])
    # live weights too (DDP all-reduces gradients); BN running stats are per rank until the next
    # forward broadcasts rank 0's (sync_batchnorm=false), the ensemble's are recomputed identically
    assert all(torch.equal(r0["live"][k], r1["live"][k]) for k in r0["live"] if "running_" not in k)
    # a real split: 2 steps per epoch on each rank, and the ranks' images of an epoch are disjoint
    b0, b1 = (json.loads((dumps / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(b0) == len(b1) == 4
    for epoch in range(2):
        seen0 = [y for batch in b0[2 * epoch : 2 * epoch + 2] for y in batch]
        seen1 = [y for batch in b1[2 * epoch : 2 * epoch + 2] for y in batch]
        assert sorted(seen0 + seen1) == sorted(list(range(10)) + list(range(6)))  # 16 images, labels %10

    # one run directory (the sweep job's), written by rank 0 only; rank 1 ran no sweep of its own
    jobs = [p for p in (tmp_path / "multirun").iterdir() if p.is_dir()]
    assert len(jobs) == 1 and (jobs[0] / "summary.json").is_file() and (jobs[0] / "model.pt").is_file()
    assert (jobs[0] / ".hydra").is_dir() and (jobs[0] / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dumps", "frep_train_ddp.py", "multirun"]
    argv0, argv1 = ((dumps / f"argv{r}.txt").read_text().splitlines() for r in (0, 1))
    assert argv0[0] == "-m"  # rank 0: the sweep as typed
    assert "-m" not in argv1 and f'hydra.run.dir="{jobs[0]}"' in argv1  # rank 1: that job only, in its dir
    assert argv1[-1] == "hydra.job.name=train_ddp_process_1" and "pruning.sparsity=0.8" in argv1
    # the job's .hydra/ is rank 0's: rank 1 (started later, in the same directory) wrote none over it
    assert "train_ddp_process" not in (jobs[0] / ".hydra" / "hydra.yaml").read_text()
    summary = json.loads((jobs[0] / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3) and summary["epochs"] == 2


# ---- frep-train under Hydra: DDP children run their parent's job in its run dir ------------------------
def test_ddp_child_is_pinned_to_parent_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from frep_lightning import train

    run_dir = tmp_path / "multirun" / "3-frep"
    parent_argv = ["--config-dir", "/my/conf", "pruning.sparsity=0.99", f'hydra.run.dir="{run_dir}"']
    parent_argv += ["hydra.output_subdir=null"]
    monkeypatch.setenv(train.RUN_DIR_ENV, str(run_dir))
    monkeypatch.setenv(train.CHILD_ARGV_ENV, json.dumps(parent_argv))
    monkeypatch.setattr(sys, "argv", ["frep-train", "-m", "pruning.sparsity=0.9,0.99", "hydra.run.dir=outputs/x"])

    monkeypatch.setenv("LOCAL_RANK", "0")  # rank 0 is the parent itself: left alone
    train.pin_ddp_child_argv()
    assert sys.argv[1] == "-m"

    monkeypatch.setenv("LOCAL_RANK", "1")
    train.pin_ddp_child_argv()
    assert sys.argv == ["frep-train", *parent_argv, "hydra.job.name=train_ddp_process_1"]  # no -m, no sweep
    assert train._run_dir(None) == run_dir  # type: ignore[arg-type]


def test_hydra_flags_are_passed_on() -> None:
    from frep_lightning.train import _hydra_flags

    argv = ["-m", "--config-dir", "/c", "-cn=train", "x=1", "--config-path=conf", "y=2"]
    assert _hydra_flags(argv) == ["--config-dir", "/c", "-cn=train", "--config-path=conf"]
