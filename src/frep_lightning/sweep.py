"""Running many experiments: one GPU per sweep job, W&B without prompts, sweep-level grouping.

``PinDevice`` is a Hydra callback (``conf/hydra/launcher/gpus.yaml`` installs it) that gives
every job process its own GPU before any CUDA call: it takes an exclusive ``flock`` on a free
device slot and sets ``CUDA_VISIBLE_DEVICES``. A slot is held by the *process* (joblib's loky
workers run several jobs one after the other, and CUDA reads ``CUDA_VISIBLE_DEVICES`` only once
per process) and released by the OS when the process ends, even on a crash. With ``n_jobs`` equal
to the number of slots, concurrently running jobs never share a GPU; slots live in one
machine-wide directory, so two sweeps started side by side queue for devices instead of sharing
them. Deriving the device from ``hydra.job.num`` would not do that: job 4 may start while job 0
still runs on the same ``num % 4`` device.

The W&B helpers choose the mode from the environment (``WANDB_MODE`` if set, else ``online``
with a W&B API key (``WANDB_API_KEY`` or ``wandb login``), else ``offline``), so a run never waits
on a login prompt, and close a run explicitly so that sequential sweep jobs in one process never
append to the previous run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

log = logging.getLogger("frep_lightning")

# (device string, lock fd) held by this process for its whole life (see the module docstring)
_HELD: tuple[str, int] | None = None


# -- devices ----------------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """GPU ids this process may use, found without initialising CUDA (which would freeze the
    device set of the process): ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, _ in enumerate(ln for ln in out.splitlines() if ln.strip().startswith("GPU "))]


def resolve_devices(devices: Any) -> list[str]:
    """``auto`` (every visible GPU), or an explicit list / comma string of device ids."""
    if devices is None or devices == "auto":
        return visible_gpus()
    if isinstance(devices, (int, str)):
        devices = str(devices).split(",")
    return [str(d).strip() for d in devices if str(d).strip()]


def device_slots(devices: Sequence[str], devices_per_job: int = 1, jobs_per_device: int = 1) -> list[str]:
    """Slot names: each is a comma-joined group of ``devices_per_job`` devices, repeated
    ``jobs_per_device`` times (``>1`` only when jobs are meant to share a GPU)."""
    if devices_per_job < 1:
        raise ValueError(f"hydra.callbacks.pin_device.devices_per_job={devices_per_job!r} must be >= 1")
    if jobs_per_device < 1:
        raise ValueError(f"hydra.callbacks.pin_device.jobs_per_device={jobs_per_device!r} must be >= 1")
    groups = [",".join(devices[i : i + devices_per_job]) for i in range(0, len(devices), devices_per_job)]
    groups = [g for g in groups if len(g.split(",")) == devices_per_job]  # a short last group is unused
    return [g for g in groups for _ in range(jobs_per_device)]


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / "frep_lightning-device-locks"


def acquire_slot(
    slots: Sequence[str], lock_dir: str | os.PathLike[str] | None = None, timeout: float | None = None
) -> tuple[str, int]:
    """Take an exclusive lock on the first free slot (waiting while all are taken); returns
    ``(devices, fd)``. Closing ``fd`` (or the process ending) frees the slot."""
    if not slots:
        raise ValueError("no device slot to acquire (no GPU visible and none given)")
    directory = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    start, warned = time.monotonic(), False
    while True:
        for i, slot in enumerate(slots):
            path = directory / f"slot-{slot.replace(',', '_')}-{i}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return slot, fd
        if timeout is not None and time.monotonic() - start >= timeout:
            raise TimeoutError(f"no free device slot among {list(slots)} in {directory} after {timeout} s")
        if not warned:
            log.warning("PinDevice: all device slots %s are taken; waiting for one to free up", list(slots))
            warned = True
        time.sleep(0.05 if timeout is not None and timeout < 5 else 2.0)


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


class PinDevice(HydraCallback):
    """Hydra callback: pin each multirun job process to its own device slot.

    Args:
        devices: ``auto`` (all visible GPUs) or a list of ids; an empty set (CPU machine) is a no-op.
        devices_per_job: GPUs each job sees (not for ``trainer=ddp``, whose re-executed ranks a
            joblib worker cannot start; use the basic or SLURM launcher for DDP jobs).
        jobs_per_device: jobs sharing one slot; 1 (default) means jobs never share a GPU.
        lock_dir: directory of the slot locks (``null``: one machine-wide temp directory).
        timeout: seconds to wait for a free slot (``null``: wait as long as it takes).
    """

    def __init__(
        self,
        devices: Any = "auto",
        devices_per_job: int = 1,
        jobs_per_device: int = 1,
        lock_dir: str | None = None,
        timeout: float | None = None,
    ) -> None:
        if isinstance(devices, (DictConfig, ListConfig)):
            devices = OmegaConf.to_container(devices)
        self.devices = devices
        self.devices_per_job = int(devices_per_job)
        self.jobs_per_device = int(jobs_per_device)
        device_slots([], self.devices_per_job, self.jobs_per_device)  # validates both
        self.lock_dir = lock_dir
        self.timeout = timeout

    def slots(self) -> list[str]:
        return device_slots(resolve_devices(self.devices), self.devices_per_job, self.jobs_per_device)

    def pin(self) -> str | None:
        """Take (or keep) this process's slot and expose only its devices; ``None`` on CPU."""
        global _HELD
        if _HELD is None:
            slots = self.slots()
            if not slots:
                return None
            _HELD = acquire_slot(slots, self.lock_dir, self.timeout)
        devices = _HELD[0]
        current = os.environ.get("CUDA_VISIBLE_DEVICES")
        if current != devices and _cuda_initialized():
            raise RuntimeError(
                f"PinDevice: CUDA was initialised in this process (CUDA_VISIBLE_DEVICES={current!r}) before the "
                f"job could be pinned to device(s) {devices}; nothing may touch CUDA before the job starts"
            )
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
        return devices

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.mode") is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        devices = self.pin()
        if devices is not None:
            log.info("PinDevice: job %s (pid %d) runs on GPU(s) %s", config.hydra.job.num, os.getpid(), devices)


# -- the sweep's configs, before any job ----------------------------------------------------
def sweep_overrides(config: DictConfig) -> list[Any]:
    """A multirun's overrides, parsed: ``hydra.sweeper.params`` then the command line, as Hydra's basic
    sweeper combines them (``config``: the composed config, or a run's saved ``multirun.yaml``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params", throw_on_resolution_failure=False) or {}
    task = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", throw_on_resolution_failure=False) or []]
    return OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + task)


def basic_sweeper_jobs(overrides: Sequence[Any]) -> list[list[str]]:
    """The override list of every job the basic sweeper makes from ``overrides``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return [list(job) for batch in BasicSweeper.split_arguments(list(overrides), None) for job in batch]


def multirun_jobs(config: DictConfig) -> list[list[str]] | None:
    """The override list of every job Hydra's basic sweeper will launch; ``None`` for another sweeper
    (its own search)."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if not target.endswith("BasicSweeper"):
        return None
    return basic_sweeper_jobs(sweep_overrides(config))


class CheckSweep(HydraCallback):
    """Hydra callback (``conf/train.yaml``): before a multirun launches its first job, compose and validate
    every job's config, so a bad value in the 12th job fails the sweep now, naming the job, instead of
    after 11 trainings (or stopping the basic launcher's sweep in the middle). ``dry_run``
    (``hydra.callbacks.check_sweep.dry_run=true``) lists the jobs and their warnings and launches
    nothing: Hydra refuses ``--cfg`` with ``-m``."""

    def __init__(self, dry_run: bool = False) -> None:
        if not isinstance(dry_run, bool):
            raise ValueError(f"hydra.callbacks.check_sweep.dry_run={dry_run!r} must be true or false")
        self.dry_run = dry_run

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose
        from hydra.errors import ConfigCompositionException

        from frep_lightning.config import ConfigError, enabled, schedule_warnings, validate_train_config

        jobs = multirun_jobs(config)
        name = kwargs.get("config_name") or "train"
        if not jobs or name != "train":
            return
        # jobs of a local launcher read the data here; a SLURM job's data.root may be a path of its node only
        local = "submitit" not in str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        problems, warnings = [], []
        composed: dict[str, int] = {}  # config (as YAML) -> first job that composes it
        for num, job in enumerate(jobs):
            try:
                cfg = compose(config_name=name, overrides=job)
                validate_train_config(cfg, check_data=local)
            except ConfigError as err:
                problems.append(f"job {num} ({' '.join(job)}): {str(err).split(chr(10), 1)[-1].strip()}")
                continue
            except ConfigCompositionException as err:  # e.g. an override of a key that one grid value lacks
                problems.append(f"job {num} ({' '.join(job)}): {' '.join(str(err).split())}")
                continue
            same = composed.setdefault(OmegaConf.to_yaml(cfg), num)
            if same != num:  # e.g. pruning.sparsity=0.9 after a grid's ++pruning.sparsity: the grid collapses
                problems.append(
                    f"job {num} ({' '.join(job)}): the same config as job {same}: a later override replaced a "
                    f"swept value{duplicate_key_hint(job)}"
                )
                continue
            if not enabled(cfg.get("pruning")):  # a dense method in a ++pruning.sparsity grid: the target is unused
                dense = OmegaConf.to_yaml(OmegaConf.merge(cfg, {"pruning": None}))
                same = composed.setdefault(f"dense:{dense}", num)
                if same != num:
                    warnings.append(
                        f"job {num} trains the same dense network as job {same} (it prunes nothing, so "
                        "pruning.sparsity does not apply); frep-report counts one of them"
                    )
            warnings += [f"job {num}: {w}" for w in schedule_warnings(cfg)]
            clash = occupied_job_dir(config, job, num, name)
            if clash:
                problems.append(f"job {num} ({' '.join(job)}): {clash}")
        if problems:  # SystemExit: Hydra turns a callback's exceptions into warnings and launches anyway
            raise SystemExit(
                f"ConfigError: {len(problems)} of the {len(jobs)} sweep jobs have an invalid config; nothing was "
                "launched:\n  " + "\n  ".join(problems)
            )
        log.info("CheckSweep: the %d jobs' configs are valid", len(jobs))
        for warning in warnings:
            log.warning(warning)
        if self.dry_run:
            print(f"dry run: {len(jobs)} valid jobs, none launched:")
            for num, job in enumerate(jobs):
                print(f"  {num}: {' '.join(job)}")
            raise SystemExit(0)


def occupied_job_dir(config: DictConfig, job: Sequence[str], num: int, config_name: str) -> str | None:
    """Why job ``num`` must not start: its directory in an existing sweep directory holds a run of other
    overrides (a sweep re-run there with another job list: job numbers, and so directories, move onto other
    jobs' runs, whose files the new job would overwrite and whose metrics.csv it would continue); ``None`` if free.
    """
    from hydra import compose

    from frep_lightning.report import job_key

    sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", throw_on_resolution_failure=False)
    if sweep_dir is None or not Path(str(sweep_dir)).is_dir():
        return None
    subdir_pattern = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")  # type: ignore[union-attr]
    cfg = compose(config_name=config_name, overrides=list(job), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = num
        cfg.hydra.job.id = num
        cfg.hydra.sweep.subdir = subdir_pattern
    try:  # the default ${hydra.job.num}-${run_name}; a pattern that cannot be resolved here is not checked
        job_dir = Path(str(sweep_dir)) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
    except Exception:
        return None
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    results = [n for n in ("summary.json", "model.pt", "checkpoints/last.ckpt") if (job_dir / n).is_file()]
    if not results or not overrides_file.is_file():
        return None
    try:
        old = [str(o) for o in OmegaConf.load(overrides_file)]  # type: ignore[union-attr]
    except Exception:  # unreadable: whose run it is cannot be told
        old = []
    if job_key(old) == job_key(job):
        return None  # this job's own earlier run (re-running the same sweep redoes it)
    theirs, mine = sorted(job_key(old) - job_key(job)), sorted(job_key(job) - job_key(old))
    return (
        f"its directory {job_dir} holds the {', '.join(results)} of another job ({' '.join(theirs) or '-'} there, "
        f"{' '.join(mine) or '-'} here), which it would overwrite: give this sweep a new hydra.sweep.dir "
        "(frep-report reads several), or re-run the same job list there"
    )


def duplicate_key_hint(job: Sequence[str]) -> str:
    """`` (<key> is given as ...)`` for a key that a job's overrides set under two spellings (``++key=`` of a
    grid and ``key=`` of the command line: Hydra's sweeper keeps both, the later wins), else ``""``."""
    spellings: dict[str, list[str]] = {}
    for override in job:
        key = override.split("=", 1)[0]
        spellings.setdefault(key.lstrip("+~"), []).append(key)
    for key, given in spellings.items():
        if len(given) > 1:
            return f" ({key} is given as {' and '.join(given)}; narrow a grid with its own spelling, {given[0]}=...)"
    return ""


def sweep_jobs(devices: Any = "auto", devices_per_job: int = 1, jobs_per_device: int = 1) -> int:
    """Resolver for the launcher's ``n_jobs``: one job per slot (at least 1, for CPU machines)."""
    if isinstance(devices, (DictConfig, ListConfig)):
        devices = OmegaConf.to_container(devices)
    return max(1, len(device_slots(resolve_devices(devices), int(devices_per_job), int(jobs_per_device))))


# -- W&B ---------------------------------------------------------------------------------
def wandb_mode(timeout: float = 5.0) -> str:
    """``WANDB_MODE`` when set; else ``online`` with an API key if the W&B server answers within
    ``timeout`` seconds, ``offline`` otherwise (no prompt; W&B itself would wait ~2 min, then fail)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if not wandb_key_present():
        return "offline"
    host, port = _wandb_endpoint()
    if _reachable(host, port, timeout):
        return "online"
    log.warning(
        "W&B: a W&B API key is set but %s:%d does not answer within %.0f s: logging OFFLINE to the run "
        "directory (upload later with `wandb sync <run dir>/wandb/offline-run-*`; WANDB_MODE=online forces it)",
        host,
        port,
        timeout,
    )
    return "offline"


def _wandb_url() -> Any:
    """The W&B server the client talks to (``WANDB_BASE_URL``, default the installed client's hosted one), split."""
    from urllib.parse import urlsplit

    return urlsplit(os.environ.get("WANDB_BASE_URL") or _wandb_default_url())


def _wandb_default_url() -> str:
    """The installed W&B client's default server (``https://api.forge.coreweave.com`` from wandb 0.31, before
    it ``https://api.wandb.ai``)."""
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL
    except ImportError:
        return "https://api.wandb.ai"
    return str(DEFAULT_BASE_URL)


def _wandb_upstream_netloc(url: str) -> str | None:
    """The W&B API host behind a CoreWeave Forge URL (whose netrc entry the client also reads), else None."""
    from urllib.parse import urlsplit

    try:
        from wandb.sdk.lib.urls import forge_upstream_url
    except ImportError:
        return None
    upstream = forge_upstream_url(url)
    return urlsplit(upstream).netloc if upstream != url else None


def wandb_key_present() -> bool:
    """A W&B API key where the client looks for one: ``WANDB_API_KEY``, or the netrc entry that
    ``wandb login`` writes for the server's host (``$NETRC``, else ``~/.netrc`` / ``~/_netrc``)."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    url = _wandb_url()
    machines = [url.netloc, url.hostname or ""]  # wandb login writes host:port for a server on a port
    upstream = _wandb_upstream_netloc(url.geturl())
    if upstream:  # wandb >= 0.31 reads a Forge server's key under its W&B API host too (api.wandb.ai)
        machines.append(upstream)
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else [
        os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")
    ]  # fmt: skip
    for path in candidates:
        try:
            hosts = netrc.netrc(path).hosts  # not authenticators(): it falls back to the `default` entry
        except (OSError, netrc.NetrcParseError):
            continue
        if any(machine in hosts and hosts[machine][2] for machine in machines):
            return True
    return False


def _wandb_endpoint() -> tuple[str, int]:
    """Where the W&B client (``requests``) connects first: the proxy of the server URL's scheme
    (``HTTPS_PROXY``/``HTTP_PROXY``, else ``ALL_PROXY`` as ``requests`` falls back to it), unless
    ``NO_PROXY`` lists the server; else the server."""
    import urllib.request
    from urllib.parse import urlsplit

    url = _wandb_url()
    host = url.hostname or ""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass_environment(host, proxies):
        purl = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return purl.hostname or "", purl.port or (443 if purl.scheme == "https" else 80)  # urllib3's defaults
    return host, url.port or (443 if url.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def sweep_group() -> str | None:
    """W&B group of a run: the sweep directory's name in multirun (``table2-<time>`` for
    ``experiment=table2``), ``None`` for a single run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return None
    path = Path(str(hc.sweep.dir))
    parts = [p for p in path.parts[-2:] if p not in ("multirun", "/", ".")]
    return "-".join(parts) or path.name


def sweep_run_name(name: str) -> str:
    """W&B display name of a run: ``name`` for a single run, ``<job num>-<name>`` in multirun, the job's own
    directory name. ``run_name`` alone repeats inside a sweep over seeds, objectives or other keys it does not
    spell out, and W&B then lists several runs of one group under one name."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return name
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return name  # hydra.job.num is a missing value ("???") outside multirun: reading it raises
    try:
        num = hc.job.num
    except Exception:  # a multirun job without a number (a sweep callback composing jobs ahead of the launch)
        return name
    return name if num is None else f"{num}-{name}"


def csv_logger(save_dir: str, name: str = "csv") -> Any:
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=save_dir, name=name)


def wandb_logger(
    save_dir: str,
    project: str = "frep-lightning",
    name: str | None = None,
    group: str | None = None,
    mode: str | None = None,
    tags: Sequence[str] = (),
    csv: bool = True,
    **kwargs: Any,
) -> Any:
    """A ``WandbLogger`` (mode from :func:`wandb_mode` unless given), plus the CSV logger when
    ``csv`` so that ``frep-report`` always finds ``metrics.csv`` in the run directory."""
    from lightning.pytorch.loggers import WandbLogger

    chosen = mode or wandb_mode()
    wandb = WandbLogger(
        save_dir=save_dir,
        project=project,
        name=name,
        group=group,
        mode=chosen,
        tags=list(tags),
        **kwargs,
    )
    # online only because the server's host:port took a TCP connection: if the run cannot start online after all
    # (a proxy or firewall that accepts connections and answers errors), it falls back to offline (wandb_experiment)
    wandb._frep_offline_fallback = chosen == "online" and not mode and not os.environ.get("WANDB_MODE")
    return [csv_logger(save_dir), wandb] if csv else wandb


def wandb_experiment(logger: Any) -> Any:
    """``logger.experiment`` (the W&B run, started on first use); a run whose ``online`` mode was only guessed
    (:func:`wandb_mode`) and that W&B cannot start online is started offline instead, with a warning, rather than
    ending the job (W&B's own init fails after its retries, ~100 s, when a proxy takes the connection but no
    W&B server answers)."""
    try:
        return logger.experiment
    except Exception as err:
        if not getattr(logger, "_frep_offline_fallback", False):
            raise
        logger._frep_offline_fallback = False
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning(
            "W&B: the run could not start online (%s): logging OFFLINE to the run directory (upload later with "
            "`wandb sync <run dir>/wandb/offline-run-*`; WANDB_MODE=online forces online)",
            first,
        )
        logger._wandb_init["mode"] = "offline"
        logger._experiment = None
        return logger.experiment


def auto_logger(save_dir: str, **wandb_kwargs: Any) -> Any:
    """``logger=auto`` (default): W&B (+ CSV) when a W&B API key is set (``WANDB_API_KEY`` or ``wandb
    login``'s netrc entry), else CSV only."""
    if wandb_key_present():
        return wandb_logger(save_dir, **wandb_kwargs)
    return csv_logger(save_dir)


def _wandb_loggers(trainer: Any) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, WandbLogger)]


def wandb_run_id(trainer: Any) -> str | None:
    """The W&B run id of a trainer's WandbLogger (None without one, on ranks > 0, or for a disabled run: its id
    names no run that frep-eval could add to)."""
    loggers = _wandb_loggers(trainer)
    if not loggers or not trainer.is_global_zero:
        return None
    run = wandb_experiment(loggers[0])
    return None if getattr(run, "disabled", False) else str(run.id)


def start_wandb(trainer: Any, cfg: DictConfig) -> None:
    """Close a run left open by an earlier job of this process, then log the resolved config."""
    loggers = _wandb_loggers(trainer)
    if not loggers or not trainer.is_global_zero:
        return
    import wandb

    if wandb.run is not None:
        wandb.run.finish(exit_code=1)  # an earlier job died before finishing its run
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        wandb_experiment(lg).config.update({"config": resolved}, allow_val_change=True)


def finish_wandb(trainer: Any, summary: dict[str, Any], run_dir: str | os.PathLike[str], close: bool = True) -> None:
    """Put ``summary`` into the W&B run summary, upload ``summary.json`` and (``close``) end the run."""
    loggers = _wandb_loggers(trainer)
    if not loggers or not trainer.is_global_zero:
        return
    path = Path(run_dir) / "summary.json"
    for lg in loggers:
        run = lg.experiment
        run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        if path.is_file():
            run.save(str(path), base_path=str(path.parent), policy="now")
        if close:
            run.finish()


def sparsity_tag(pruning: Any) -> str:
    """The run name's sparsity part: ``s<target>`` when a pruning callback is configured, else ``dense``
    (a dense method in a sweep over ``++pruning.sparsity`` keeps the value in a node that prunes nothing)."""
    if isinstance(pruning, DictConfig) and pruning.get("_target_") and pruning.get("sparsity") is not None:
        return f"s{pruning.sparsity}"
    return "dense"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("frep_sparsity_tag", sparsity_tag, replace=True)
    OmegaConf.register_new_resolver("frep_sweep_jobs", sweep_jobs, replace=True)
    OmegaConf.register_new_resolver("frep_wandb_mode", wandb_mode, replace=True)
    OmegaConf.register_new_resolver("frep_sweep_group", sweep_group, replace=True)
    OmegaConf.register_new_resolver("frep_sweep_run_name", sweep_run_name, replace=True)


register_resolvers()
