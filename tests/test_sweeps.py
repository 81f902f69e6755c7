"""Sweeps: every paper-table experiment is a multirun grid of the right size whose jobs compose;
the joblib launcher pins each job process to its own GPU; W&B never prompts and groups by sweep."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from frep_lightning import sweep
from frep_lightning.config import enabled, validate_train_config
from frep_lightning.train import config_dir

CONF = Path(config_dir())

# experiment -> (number of jobs, swept keys)
TABLES = {
    "table1": (18, {"data", "model", "method"}),
    "table2": (10, {"model", "method"}),
    "table3": (8, {"data", "model", "method"}),
    "table4": (18, {"data", "++pruning.sparsity", "method"}),
    "table4_structured": (18, {"data", "++pruning.sparsity", "method"}),
    "table5": (8, {"method", "fast.enabled"}),
    "table6": (20, {"++pruning.sparsity", "method"}),
    "table7": (20, {"data", "ensemble", "objective"}),
    "table8": (9, {"++pruning.sparsity", "reparam.init"}),
}


def cfg_for(*overrides: str, hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


def sweep_jobs(params: dict[str, str], extra: list[str] = ()) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper makes from ``hydra.sweeper.params``."""
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(extra))
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def test_every_table_has_an_experiment() -> None:
    tables = {p.stem for p in (CONF / "experiment").glob("table*.yaml")}
    assert tables == set(TABLES)
    assert {f"table{i}" for i in range(1, 9)} <= tables


@pytest.mark.parametrize("table", sorted(TABLES))
def test_table_sweep_grid_size_and_jobs_compose(table: str) -> None:
    cfg = cfg_for(f"experiment={table}", hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    size, keys = TABLES[table]
    assert set(params) == keys
    jobs = sweep_jobs(params)
    assert len(jobs) == size
    assert len({frozenset(j) for j in jobs}) == size
    assert str(cfg.hydra.sweep.dir).startswith(f"multirun/{table}-")
    # every value of every swept key composes and validates (diagonal: job i takes value i of each key)
    values = {k: v.split(",") for k, v in params.items()}
    for i in range(max(len(v) for v in values.values())):
        job = [f"{k}={v[i % len(v)]}" for k, v in values.items()]
        job_cfg = cfg_for(f"experiment={table}", *job)
        validate_train_config(job_cfg)
        assert job_cfg.trainer.max_epochs == 100 and job_cfg.optim.milestones == [70, 85]  # the paper's recipe
        given = {k.lstrip("+"): v for k, v in (o.split("=", 1) for o in job)}
        if "method" in given:
            assert job_cfg.method.name == given["method"]
        if "pruning.sparsity" in given and enabled(job_cfg.pruning):
            assert job_cfg.pruning.sparsity == float(given["pruning.sparsity"])


RESNET18_C10 = {"model": "resnet18", "data": "cifar10"}
# experiment -> (swept values, fixed settings): what the paper's table reports (Sec. IV; the rows of methods not
# implemented here, Tiny-ImageNet and Table V's natural training aside)
PAPER: dict[str, tuple[dict[str, set[str]], dict[str, object]]] = {
    "table1": (
        {
            "data": {"cifar10", "svhn"},
            "model": {"vgg16_bn", "resnet18", "wrn28_10"},
            "method": {"dense_at", "lwm", "frep"},
        },
        {"pruning.sparsity": 0.9, "eval.attacks": ["clean", "fgsm", "pgd50", "mim50", "square", "aa"]},
    ),
    "table2": (
        {"model": {"vgg16_bn", "resnet18", "resnet34", "resnet50", "wrn28_10"}, "method": {"lwm", "frep"}},
        {"data": "cifar10", "pruning.sparsity": 0.99, "eval.attacks": ["clean", "pgd50", "aa"]},
    ),
    "table3": (
        {"data": {"cifar10", "cifar100"}, "model": {"vgg16_bn", "resnet18"}, "method": {"lwm", "frep_ch"}},
        {"pruning.sparsity": 0.7, "pruning.mode": "structured"},
    ),
    "table4": (
        {
            "data": {"cifar10", "cifar100"},
            "++pruning.sparsity": {"0.7", "0.9", "0.99"},
            "method": {"ori", "frep_ch", "frep"},
        },
        {"model": "resnet18", "pruning.mode": "unstructured"},
    ),
    "table4_structured": (
        {
            "data": {"cifar10", "cifar100"},
            "++pruning.sparsity": {"0.5", "0.6", "0.7"},
            "method": {"ori", "frep_ch", "frep"},
        },
        {"model": "resnet18", "pruning.mode": "structured"},
    ),
    "table5": (
        {"method": {"frep", "frep_ch", "lwm", "dense_at"}, "fast.enabled": {"false", "true"}},
        {**RESNET18_C10, "data.batch_size": 128},
    ),
    "table6": (
        {
            "++pruning.sparsity": {"0.5", "0.7", "0.9", "0.95", "0.99"},
            "method": {"ori", "sparse_init", "frep_ch", "frep"},
        },
        {**RESNET18_C10, "pruning.mode": "unstructured"},
    ),
    "table7": (
        {
            "data": {"cifar10", "cifar100"},
            "ensemble": {"temporal", "none"},
            "objective": {"sre", "fgsm", "pgd", "trades", "mart"},
        },
        {"model": "resnet18", "pruning.sparsity": 0.9, "method.name": "frep"},
    ),
    "table8": (
        {"++pruning.sparsity": {"0.0", "0.9", "0.99"}, "reparam.init": {"equal", "ones", "random"}},
        {**RESNET18_C10, "method.name": "frep"},
    ),
}


@pytest.mark.parametrize("table", sorted(PAPER))
def test_table_sweeps_use_the_papers_settings(table: str) -> None:
    """The values each table sweeps and the settings it fixes are the paper's (a 0.95 in place of 0.99, or
    CIFAR-100 in place of SVHN, keeps the grid's size and composes: only the values can tell)."""
    swept, fixed = PAPER[table]
    cfg = cfg_for(f"experiment={table}", hydra=True)
    params = {k: set(str(v).split(",")) for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()}
    assert params == swept
    names = {"model": "model.name", "data": "data.name"}
    got = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, names.get(k, k))) else v
           for k in fixed}  # fmt: skip
    assert got == fixed
    assert cfg.eval.eps == "8/255" and cfg.data.batch_size == 128 and cfg.pruning.epoch == 30


def test_table5_times_the_plain_and_the_fast_path() -> None:
    """Table V's sweep: each method once on the plain path (fp32, the paper's setting) and once on the fast
    path in bf16 + channels-last; the fast half's module is FastFReP with those options."""
    from frep_lightning.fast import FastFReP
    from frep_lightning.train import build_module

    plain, fast = (cfg_for("experiment=table5", "model.width=4", f"fast.enabled={e}") for e in ("false", "true"))
    assert type(build_module(plain)).__name__ == "FReP"
    module = build_module(fast)
    assert isinstance(module, FastFReP) and module.fast_options["precision"] == "bf16" and module.channels_last
    for method in ("frep", "frep_ch", "lwm", "dense_at"):  # the fastest measured options build for every method
        module = build_module(cfg_for("experiment=table5", "model.width=4", "fast.enabled=true", f"method={method}"))
        assert isinstance(module, FastFReP), method
        assert module.fast_options["cache_weights"] is True and module.fast_options["streams"] == 2, method


def test_table_specific_settings() -> None:
    t3 = cfg_for("experiment=table3", "method=lwm")
    assert (
        t3.pruning.mode == "structured"
        and t3.pruning.sparsity == 0.7
        and t3.pruning._target_.endswith("GradualPruning")
    )
    t7 = cfg_for("experiment=table7", "objective=mart", "ensemble=none")
    assert t7.method.objective._target_.endswith("MART") and not enabled(t7.ensemble)
    assert t7.method.reparam_kind == "hadamard" and t7.pruning.sparsity == 0.9
    t8 = cfg_for("experiment=table8", "reparam.init=ones", "++pruning.sparsity=0.0")
    assert t8.method.reparam_init == "ones" and t8.pruning.sparsity == 0.0
    t1 = cfg_for("experiment=table1", "method=dense_at")
    assert not enabled(t1.pruning) and t1.eval.attacks == ["clean", "fgsm", "pgd50", "mim50", "square", "aa"]


def test_command_line_narrows_a_table_sweep() -> None:
    """CLI overrides replace the table's values of the same key (as in the README's reduced runs)."""
    cfg = cfg_for("experiment=table4", hydra=True)
    jobs = sweep_jobs(OmegaConf.to_container(cfg.hydra.sweeper.params), ["method=dense_at", "++pruning.sparsity=0"])
    assert len(jobs) == 2  # 2 datasets
    for job in jobs:
        job_cfg = cfg_for("experiment=table4", *job)
        assert job_cfg.method.name == "dense_at" and not enabled(job_cfg.pruning)


def test_check_sweep_validates_every_job_of_a_table_before_launch(capsys: pytest.CaptureFixture[str]) -> None:
    """CheckSweep (conf/train.yaml's hydra.callbacks) sees the jobs the basic sweeper will launch: the table's
    params with the command line on top; a valid sweep passes, one bad value stops it, naming the job."""
    from frep_lightning.sweep import CheckSweep, multirun_jobs

    def multirun_config(*command_line: str) -> DictConfig:  # what Hydra hands on_multirun_start
        cfg = cfg_for("experiment=table2", hydra=True)
        cfg.hydra.overrides.task = ["experiment=table2", *command_line]
        return cfg

    cfg = multirun_config("method=frep,ori")
    assert cfg.hydra.callbacks.check_sweep._target_ == "frep_lightning.sweep.CheckSweep"
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    jobs = multirun_jobs(cfg)
    assert jobs == sweep_jobs(params, ["experiment=table2", "method=frep,ori"]) and len(jobs) > 2
    bad = multirun_config("method=frep,ori", "optim.lr=0.1,-1")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        CheckSweep().on_multirun_start(config=cfg, config_name="train")
        with pytest.raises(SystemExit, match=rf"{len(jobs)} of the {2 * len(jobs)} sweep jobs have an invalid config"):
            CheckSweep().on_multirun_start(config=bad, config_name="train")
    other = cfg_for("experiment=table2", hydra=True)
    other.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert multirun_jobs(other) is None  # another sweeper searches on its own: not second-guessed


def _check_sweep(tmp_path: Path, experiment: str, *command_line: str, launcher: str | None = None) -> None:
    """CheckSweep.on_multirun_start on the config Hydra hands it for ``-m experiment=... <command_line>``."""
    from frep_lightning.sweep import CheckSweep

    cfg = cfg_for(f"experiment={experiment}", hydra=True)
    cfg.hydra.overrides.task = [f"experiment={experiment}", *command_line]
    if launcher is not None:
        cfg.hydra.launcher = {"_target_": launcher}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        CheckSweep().on_multirun_start(config=cfg, config_name="train")


def test_check_sweep_refuses_jobs_that_compose_the_same_config(tmp_path: Path, pack_root: Path) -> None:
    """table4 sweeps ``++pruning.sparsity``; narrowing it with ``pruning.sparsity=0.9`` keeps both overrides in
    every job (the later wins): 9 jobs, 3 configs, each trained 3 times and averaged as "seeds" by frep-report.
    Refused before launch, naming the spelling that narrows the grid; ``++pruning.sparsity=0.9`` narrows it."""
    root = f"data.root={pack_root}"
    with pytest.raises(SystemExit, match=r"6 of the 9 sweep jobs") as err:
        _check_sweep(tmp_path, "table4", "data=cifar10", root, "pruning.sparsity=0.9")
    assert "job 3 (" in str(err.value) and "the same config as job 0" in str(err.value)
    assert "narrow a grid with its own spelling, ++pruning.sparsity=..." in str(err.value)
    _check_sweep(tmp_path, "table4", "data=cifar10", root, "++pruning.sparsity=0.9")  # 3 distinct jobs: valid


def test_check_sweep_says_when_a_dense_method_repeats_across_a_sparsity_grid(
    tmp_path: Path, pack_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """README: ``method=dense_at,frep ++pruning.sparsity=0.9,0.99`` trains dense_at twice, identically; valid (the
    README's way to mix them), but said before launch."""
    with caplog.at_level("WARNING", logger="frep_lightning"):
        _check_sweep(tmp_path, "table2", "model=resnet18", f"data.root={pack_root}", "method=dense_at,frep",
                     "++pruning.sparsity=0.9,0.99")  # fmt: skip
    assert "job 1 trains the same dense network as job 0" in caplog.text
    assert "job 3 trains the same" not in caplog.text  # frep at 99% is not frep at 90%


def test_check_sweep_finds_missing_data_and_composition_errors_per_job(tmp_path: Path, pack_root: Path) -> None:
    """A grid value whose dataset is not under data.root, or whose group lacks an overridden key, stops the sweep
    before its first job (not after the other jobs trained), naming the job; a SLURM sweep's data.root may be a
    path of the compute nodes only, so it is not looked up there."""
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "cifar10").symlink_to(pack_root / "cifar10")  # cifar10 only, whatever the pack holds
    root = f"data.root={tmp_path / 'pack'}"
    with pytest.raises(SystemExit, match=r"1 of the 2 sweep jobs") as err:
        _check_sweep(tmp_path, "table2", "model=resnet18", "method=frep", root, "data=cifar10,svhn")
    assert "job 1 (" in str(err.value) and "no svhn data found" in str(err.value)
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    _check_sweep(tmp_path, "table2", "model=resnet18", "method=frep", f"data.root={tmp_path}", launcher=slurm)
    with pytest.raises(SystemExit, match=r"1 of the 2 sweep jobs") as err:
        _check_sweep(tmp_path, "table2", "model=resnet18", "method=frep", root, "ensemble=temporal,none",
                     "ensemble.tau0=0.99")  # fmt: skip
    assert "job 1 (" in str(err.value) and "Could not override 'ensemble.tau0'" in str(err.value)


def test_check_sweep_refuses_to_run_a_job_over_another_jobs_run(tmp_path: Path, pack_root: Path) -> None:
    """``seed=0,1`` killed after seed 0, then ``seed=1`` re-run into the same hydra.sweep.dir: job 0 (seed 1) would
    write into ``0-frep-...`` over seed 0's finished run (run names do not carry the seed) and continue its
    metrics.csv. Refused before launch; re-running the same job list there is allowed."""
    from frep_lightning.sweep import CheckSweep

    sweep_dir = tmp_path / "sw"
    common = ["experiment=smoke", f"data.root={pack_root}"]
    done = sweep_dir / "0-frep-resnet18-cifar10-s0.9"
    (done / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create([*common, "seed=0"]), done / ".hydra" / "overrides.yaml")
    (done / "summary.json").write_text("{}")

    def check(*command_line: str) -> None:
        cfg = cfg_for(*common, hydra=True)
        cfg.hydra.overrides.task = [*common, *command_line]
        cfg.hydra.sweep.dir = str(sweep_dir)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            CheckSweep().on_multirun_start(config=cfg, config_name="train")

    with pytest.raises(SystemExit, match=r"1 of the 1 sweep jobs") as err:
        check("seed=1")
    assert f"its directory {done} holds the summary.json of another job (seed=0 there, seed=1 here)" in str(err.value)
    check("seed=0,1")  # the same job list again: each job finds its own run


def test_bad_value_in_a_sweep_fails_before_the_first_job(tmp_path: Path, pack_root: Path) -> None:
    cmd = [sys.executable, "-m", "frep_lightning.train", "-m", "experiment=smoke", f"data.root={pack_root}",
           "logger=none", "pruning.sparsity=0.9,1.5", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "1 of the 2 sweep jobs have an invalid config; nothing was launched" in proc.stderr
    assert "job 1 (" in proc.stderr and "pruning.sparsity=1.5 must be in [0, 1)" in proc.stderr
    assert not (tmp_path / "sweep").exists()  # no job started


def test_a_bad_key_of_a_single_run_is_its_message_alone(tmp_path: Path) -> None:
    """No Hydra traceback around a config error: the message names the key and what to change."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for cmd, start in (
        (["frep_lightning.train", "optim.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"], "frep-train: invalid config"),
        (["frep_lightning.eval", f"ckpt={tmp_path / 'nothing'}"], "frep-eval: ckpt="),
    ):
        proc = subprocess.run([sys.executable, "-m", *cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300, check=False)  # fmt: skip
        assert proc.returncode == 1 and proc.stderr.startswith(start), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr


def test_sweep_dry_run_lists_the_jobs_and_launches_nothing(tmp_path: Path, pack_root: Path) -> None:
    cmd = [sys.executable, "-m", "frep_lightning.train", "-m", "experiment=table2", "model=resnet18",
           "trainer.max_epochs=50", "hydra.callbacks.check_sweep.dry_run=true",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dry run: 2 valid jobs, none launched:" in proc.stdout
    assert "  0: " in proc.stdout and "  1: " in proc.stdout and "method=frep" in proc.stdout
    assert "job 0: optim.milestones=[70, 85]" in proc.stdout + proc.stderr  # a 50-epoch cut of the recipe: said per job
    assert not (tmp_path / "sweep").exists()


# -- launchers ---------------------------------------------------------------------------------
def launcher_cfg(*overrides: str) -> DictConfig:
    return cfg_for("hydra/launcher=gpus", *overrides, hydra=True).hydra


def test_joblib_launcher_one_job_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    hc = launcher_cfg()
    assert hc.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert hc.launcher.n_jobs == 3
    assert launcher_cfg("hydra.callbacks.pin_device.devices=[4,6]").launcher.n_jobs == 2
    assert launcher_cfg("hydra.callbacks.pin_device.jobs_per_device=2").launcher.n_jobs == 6  # asked to share
    assert launcher_cfg("hydra.callbacks.pin_device.devices_per_job=2").launcher.n_jobs == 1  # 3 GPUs: one pair
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launcher_cfg().launcher.n_jobs == 1  # no GPU: one job at a time
    launcher = instantiate(hc.launcher)
    assert launcher.joblib["n_jobs"] == 1
    pin = instantiate(hc.callbacks.pin_device)
    assert isinstance(pin, sweep.PinDevice) and pin.jobs_per_device == 1


def test_submitit_launcher_config_instantiates() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    hc = cfg_for("hydra/launcher=slurm", hydra=True).hydra
    launcher = instantiate(hc.launcher)
    assert type(launcher).__name__ == "SlurmLauncher" and hc.launcher.gpus_per_node == 1
    assert "pin_device" not in (hc.get("callbacks") or {})


@pytest.fixture
def fresh_pin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget this process's slot and restore CUDA_VISIBLE_DEVICES afterwards."""
    monkeypatch.setattr(sweep, "_HELD", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    held = sweep._HELD
    if held is not None:
        os.close(held[1])


def test_device_slots_are_exclusive(tmp_path: Path) -> None:
    slots = sweep.device_slots(["0", "1"])
    first, fd1 = sweep.acquire_slot(slots, tmp_path)
    second, fd2 = sweep.acquire_slot(slots, tmp_path)
    assert {first, second} == {"0", "1"}
    with pytest.raises(TimeoutError, match="no free device slot"):
        sweep.acquire_slot(slots, tmp_path, timeout=0.2)
    os.close(fd1)  # a job process ending frees its GPU
    again, fd3 = sweep.acquire_slot(slots, tmp_path)
    assert again == first
    for fd in (fd2, fd3):
        os.close(fd)
    assert sweep.device_slots(["0", "1", "2"], devices_per_job=2) == ["0,1"]
    assert sweep.device_slots(["0"], jobs_per_device=2) == ["0", "0"]
    with pytest.raises(ValueError, match="jobs_per_device"):
        sweep.device_slots(["0"], jobs_per_device=0)


def test_pin_device_sets_cuda_visible_devices_once_per_process(tmp_path: Path, fresh_pin: None) -> None:
    pin = sweep.PinDevice(devices=["3", "5"], lock_dir=str(tmp_path), timeout=1)
    run_cfg = OmegaConf.create({"hydra": {"mode": "RunMode.RUN", "job": {"num": 0}}})
    pin.on_job_start(run_cfg)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # single runs are left alone
    multi = OmegaConf.create({"hydra": {"mode": "RunMode.MULTIRUN", "job": {"num": 0}}})
    pin.on_job_start(multi)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    pin.on_job_start(multi)  # the next job of this worker process keeps the same GPU
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    other, fd = sweep.acquire_slot(pin.slots(), tmp_path)  # another process gets the other GPU
    assert other == "5"
    os.close(fd)


def test_pin_device_refuses_after_cuda_init(tmp_path: Path, fresh_pin: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep, "_cuda_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA was initialised"):
        sweep.PinDevice(devices=["1"], lock_dir=str(tmp_path)).pin()


def test_pin_device_is_a_no_op_without_gpus(tmp_path: Path, fresh_pin: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.PinDevice(lock_dir=str(tmp_path)).pin() is None and sweep._HELD is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # the other way of hiding every GPU
    assert sweep.visible_gpus() == [] and sweep.PinDevice(lock_dir=str(tmp_path)).pin() is None


APP = """
import json, os, sys, time
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

import frep_lightning.sweep  # noqa: F401  (the launcher file's resolvers and PinDevice callback)

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    start = time.time()
    time.sleep(0.4)
    record = {"device": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(), "start": start, "end": time.time()}
    Path(cfg.out, f"{HydraConfig.get().job.num}.json").write_text(json.dumps(record))

if __name__ == "__main__":
    main()
"""


def test_joblib_sweep_never_shares_a_gpu(tmp_path: Path) -> None:
    """A real joblib multirun with our launcher file: 4 jobs, 2 (fake) GPUs, 2 workers."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    (tmp_path / "conf" / "hydra" / "launcher").mkdir(parents=True)
    shutil.copy(CONF / "hydra" / "launcher" / "gpus.yaml", tmp_path / "conf" / "hydra" / "launcher")
    (tmp_path / "conf" / "config.yaml").write_text(
        textwrap.dedent(
            f"""
            defaults:
              - override hydra/launcher: gpus
              - _self_
            x: 0
            out: {tmp_path / "out"}
            hydra:
              sweep:
                dir: {tmp_path / "sweep"}
                subdir: ${{hydra.job.num}}
            """
        )
    )
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "out").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    cmd = [
        sys.executable,
        str(tmp_path / "app.py"),
        "-m",
        "x=1,2,3,4",
        "hydra.callbacks.pin_device.devices=[gpuA,gpuB]",
        f"hydra.callbacks.pin_device.lock_dir={tmp_path / 'locks'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*.json"))]
    assert len(records) == 4
    assert {r["device"] for r in records} <= {"gpuA", "gpuB"}
    for a, b in itertools.combinations(records, 2):
        if a["start"] < b["end"] and b["start"] < a["end"]:  # ran at the same time
            assert a["device"] != b["device"], (a, b)
    per_pid: dict[int, set[str]] = {}
    for r in records:
        per_pid.setdefault(r["pid"], set()).add(r["device"])
    assert all(len(devices) == 1 for devices in per_pid.values())  # a worker keeps its GPU


# -- W&B -------------------------------------------------------------------------------------
def test_wandb_mode_never_prompts_nor_hangs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import socket
    import time

    for key in ("WANDB_MODE", "WANDB_API_KEY", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                "all_proxy"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    for key in ("NO_PROXY", "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(key, raising=False)
    assert sweep.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with socket.socket() as server:  # a W&B server that answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert sweep.wandb_mode() == "online"
    # a key but no server (no network): offline at once, said loudly, instead of W&B's 2-minute wait and crash
    start = time.perf_counter()
    with caplog.at_level("WARNING", logger="frep_lightning"):
        assert sweep.wandb_mode(timeout=2.0) == "offline"
    assert time.perf_counter() - start < 3.0
    assert "does not answer" in caplog.text and "logging OFFLINE" in caplog.text and "wandb sync" in caplog.text
    # a port that never answers: the probe gives the socket its timeout (and says offline)
    calls: list[float | None] = []

    def hanging(address: tuple[str, int], timeout: float | None = None) -> socket.socket:
        calls.append(timeout)
        raise TimeoutError("timed out")

    with monkeypatch.context() as m:
        m.setattr(socket, "create_connection", hanging)
        assert sweep.wandb_mode(timeout=2.0) == "offline" and calls == [2.0]
    # the client goes through the proxy of the server's scheme, unless NO_PROXY lists the server
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example:3128")
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    assert sweep._wandb_endpoint() == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "localhost,.wandb.ai")
    assert sweep._wandb_endpoint() == ("api.wandb.ai", 443)
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.internal:8080")
    assert sweep._wandb_endpoint() == ("wandb.internal", 8080)  # an http server: HTTPS_PROXY is not its proxy
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:8000")
    assert sweep._wandb_endpoint() == ("proxy.example", 8000)
    monkeypatch.setenv("HTTP_PROXY", "proxy.example")  # no port: the default port of the proxy URL's scheme
    assert sweep._wandb_endpoint() == ("proxy.example", 80)
    monkeypatch.setenv("HTTP_PROXY", "https://proxy.example")
    assert sweep._wandb_endpoint() == ("proxy.example", 443)
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("ALL_PROXY", "http://catchall.example:9000")  # requests' fallback for any scheme
    assert sweep._wandb_endpoint() == ("catchall.example", 9000)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert sweep.wandb_mode() == "disabled"


def test_a_wandb_login_key_counts_as_a_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``wandb login`` writes the key to netrc, not to the environment: a logged-in user's runs log online."""
    from lightning.pytorch.loggers import CSVLogger

    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not sweep.wandb_key_present()
    assert isinstance(sweep.auto_logger(str(tmp_path)), CSVLogger)
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert sweep.wandb_key_present()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another server is not one
    assert not sweep.wandb_key_present()
    netrc.write_text("machine wandb.example.org:8080\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example.org:8080")  # wandb login's entry for a port
    assert sweep.wandb_key_present()
    netrc.write_text("default login anonymous password guest\n")  # an FTP-style default is not a W&B key
    assert not sweep.wandb_key_present()


def test_default_logger_is_wandb_only_with_an_api_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    cfg = cfg_for()
    assert cfg.logger._target_ == "frep_lightning.sweep.auto_logger"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert isinstance(instantiate(cfg.logger, save_dir=str(tmp_path)), CSVLogger)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers = instantiate(cfg.logger, save_dir=str(tmp_path))
    assert [type(lg) for lg in loggers] == [CSVLogger, WandbLogger]  # metrics.csv kept for frep-report
    assert loggers[1]._wandb_init["mode"] == "offline" and loggers[1]._wandb_init["group"] is None
    assert loggers[1]._wandb_init["name"] == cfg.run_name  # a single run: no job number


def test_sweep_group_is_the_sweep_dir_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.core.hydra_config import HydraConfig

    assert sweep.sweep_group() is None  # no Hydra run
    fake = SimpleNamespace(mode="RunMode.MULTIRUN", sweep=SimpleNamespace(dir="multirun/table2-2026-01-02_03-04-05"))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: fake))
    assert sweep.sweep_group() == "table2-2026-01-02_03-04-05"
    fake.sweep.dir = "/runs/2026-01-02/12-00-00"
    assert sweep.sweep_group() == "2026-01-02-12-00-00"
    fake.mode = "RunMode.RUN"
    assert sweep.sweep_group() is None


def test_wandb_names_in_a_sweep_carry_the_job_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seed or objective sweep repeats run_name; W&B shows <job num>-<run_name>, the job's directory name."""
    from hydra.core.hydra_config import HydraConfig

    assert sweep.sweep_run_name("frep-resnet18-cifar10-s0.9") == "frep-resnet18-cifar10-s0.9"  # no Hydra run
    fake = SimpleNamespace(mode="RunMode.MULTIRUN", job=SimpleNamespace(num=3))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: fake))
    assert sweep.sweep_run_name("frep-resnet18-cifar10-s0.9") == "3-frep-resnet18-cifar10-s0.9"
    fake.mode = "RunMode.RUN"
    assert sweep.sweep_run_name("frep-resnet18-cifar10-s0.9") == "frep-resnet18-cifar10-s0.9"


def test_wandb_offline_run_gets_resolved_config_and_summary(tmp_path: Path) -> None:
    loggers = sweep.wandb_logger(str(tmp_path), project="test", name="run", group="table2-x", mode="offline")
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=True)
    cfg = OmegaConf.create({"method": {"name": "frep"}, "run_name": "${method.name}-r18"})
    sweep.start_wandb(trainer, cfg)
    run = loggers[1].experiment
    assert run.config["config"] == {"method": {"name": "frep"}, "run_name": "frep-r18"}
    assert run.group == "table2-x"
    (tmp_path / "summary.json").write_text(json.dumps({"clean_acc": 0.5}))
    sweep.finish_wandb(trainer, {"clean_acc": 0.5, "method": "frep", "layers": [1]}, tmp_path, close=False)
    assert run.summary["clean_acc"] == 0.5 and run.summary["method"] == "frep"
    run.finish()
    saved = list(tmp_path.glob("wandb/offline-run-*/files/summary.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == {"clean_acc": 0.5}


def test_frep_eval_adds_to_the_training_runs_wandb_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """summary.json keeps the training run's W&B id; frep-eval's W&B logger (the run's own config by default)
    resumes that run instead of starting a look-alike, so the run's summary gets the eval numbers."""
    from frep_lightning.eval import _training_wandb_id, log_report, make_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers = sweep.wandb_logger(str(tmp_path), project="test", name="run", mode="offline")
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=True)
    run_id = sweep.wandb_run_id(trainer)
    assert run_id == loggers[1].experiment.id
    assert sweep.wandb_run_id(SimpleNamespace(loggers=[], is_global_zero=True)) is None
    loggers[1].experiment.finish()
    (tmp_path / "summary.json").write_text(json.dumps({"clean_acc": 0.5, "wandb_run_id": run_id}))
    (tmp_path / "config.yaml").write_text("logger: {}\n")
    assert _training_wandb_id(tmp_path / "config.yaml") == run_id
    target = "frep_lightning.sweep.wandb_logger"
    run_cfg = OmegaConf.create({"logger": {"_target_": target, "project": "test", "name": "run", "mode": "offline"}})
    made = make_loggers(OmegaConf.create({}), run_cfg, tmp_path / "eval_logs", run_id)
    wandb_logger = [lg for lg in made if type(lg).__name__ == "WandbLogger"]
    assert wandb_logger and wandb_logger[0].experiment.id == run_id
    report = {"clean": 0.5, "attacks": ["pgd50"], "pgd50": 0.2, "worst_case": 0.2, "sparsity": 0.9, "n": 10,
              "sizes": {"model_sparse_bytes": 100}}  # fmt: skip
    log_report(made, report)  # logs, updates the summary and finishes the run
    # the offline record carries the training run's id: `wandb sync` puts it into that run
    assert [p.name.rsplit("-", 1)[-1] for p in (tmp_path / "eval_logs" / "wandb").glob("offline-run-*")] == [run_id]
    assert make_loggers(OmegaConf.create({}), OmegaConf.create({"logger": None}), tmp_path, run_id) == []


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ((), "frep-resnet18-cifar10-s0.9"),
        (("method=frep_ch",), "frep_ch-resnet18-cifar10-s0.7"),
        (("method=lwm", "++pruning.sparsity=0.99"), "lwm-resnet18-cifar10-s0.99"),
        (("method=dense_at",), "dense_at-resnet18-cifar10-dense"),
        # a dense method in a sweep over ++pruning.sparsity: the value lands in a node that prunes nothing
        (("method=dense_at", "++pruning.sparsity=0.9"), "dense_at-resnet18-cifar10-dense"),
        (("pruning=none",), "frep-resnet18-cifar10-dense"),
    ],
)
def test_run_name_says_dense_for_runs_that_prune_nothing(overrides: tuple[str, ...], name: str) -> None:
    assert cfg_for(*overrides).run_name == name


def test_the_cli_with_its_default_logger_and_a_wandb_sweep_names_each_run(tmp_path: Path, pack_root: Path) -> None:
    """The entry point as `make train` runs it (logger=auto, Hydra's single-run mode: hydra.job.num is a missing
    value there), then a 2-seed sweep with logger=wandb offline: each job's W&B run is named like its directory."""
    from helpers import tiny_run_overrides

    tiny = [o for o in tiny_run_overrides(pack_root, tmp_path / "cache") if o != "experiment=smoke"]
    tiny = ["experiment=smoke", *tiny, "trainer.max_epochs=1", "pruning.epoch=0", "eval.n_test=16"]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env |= {"WANDB_DIR": str(tmp_path / "wandb"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            "NETRC": str(tmp_path / "no-netrc"), "HOME": str(tmp_path)}  # fmt: skip
    (tmp_path / "wandb").mkdir()
    single = [sys.executable, "-m", "frep_lightning.train", *tiny, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(single, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file() and list((tmp_path / "run").rglob("metrics.csv"))
    env["WANDB_MODE"] = "offline"
    multi = [sys.executable, "-m", "frep_lightning.train", "-m", *tiny, "logger=wandb", "seed=0,1",
             f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    proc = subprocess.run(multi, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in (0, 1):
        (job_dir,) = (tmp_path / "sweep").glob(f"{job}-*")
        assert OmegaConf.load(job_dir / "config.yaml").logger.name == job_dir.name
