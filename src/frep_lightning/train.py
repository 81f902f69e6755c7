"""``frep-train``: compose the config, validate it, train, export ``model.pt``, write ``summary.json``.

Everything is instantiated from the Hydra config (``conf/``); the run directory receives
``model.pt`` (merged, pruned ensemble, plain state_dict of the unmodified backbone),
``summary.json``, ``checkpoints/last.ckpt`` and the logger's files.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import platform
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from frep_lightning import __version__
from frep_lightning.attacks import PGD, parse_eps
from frep_lightning.checkpointing import (
    AtomicCheckpointIO,
    BackgroundCheckpointIO,
    LastCheckpoint,
    RNGState,
    RunRecord,
    TrainingClock,
    mismatch_message,
    read_run_record,
    record_mismatches,
)
from frep_lightning.config import (
    ConfigError,
    config_dir,
    enabled,
    exit_on_config_error,
    schedule_warnings,
    validate_train_config,
)
from frep_lightning.evaluate import WhiteBoxAttack, config_attacks, evaluate
from frep_lightning.export import MergeReparameterization, load_state_dict_file, write_json
from frep_lightning.fast import FastFReP, iter_fast_options
from frep_lightning.module import FReP
from frep_lightning.monitor import RobustnessMonitor
from frep_lightning.pruning import RobustPruning, sparsity_report
from frep_lightning.reparam import merge_
from frep_lightning.slimming import example_images, slim
from frep_lightning.sweep import finish_wandb, start_wandb, wandb_run_id

log = logging.getLogger("frep_lightning")


# DDP: the extra ranks are this script re-executed by Lightning; they write into rank 0's run dir
RUN_DIR_ENV = "FREP_RUN_DIR"
CHILD_ARGV_ENV = "FREP_DDP_CHILD_ARGV"


def _is_ddp_child() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 and RUN_DIR_ENV in os.environ


def _run_dir(cfg: DictConfig) -> Path:
    if _is_ddp_child():
        return Path(os.environ[RUN_DIR_ENV])
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or Path.cwd() / "outputs" / time.strftime("%Y-%m-%d_%H-%M-%S"))


def build_module(cfg: DictConfig) -> FReP:
    m = cfg.method
    fast = OmegaConf.select(cfg, "fast")
    module_cls, fast_kwargs = FReP, {}
    if fast is not None and fast.get("enabled", False):  # the captured step (frep_lightning.fast)
        module_cls, fast_kwargs = FastFReP, dict(iter_fast_options(fast))
    module = module_cls(
        model=instantiate(cfg.model),
        objective=instantiate(m.objective),
        attack=instantiate(m.attack),
        reparam_kind=m.reparam_kind,
        reparam_init=m.reparam_init,
        val_attack_steps=cfg.val_attack_steps,
        val_attack_precision=cfg.get("val_attack_precision", "fp32"),
        seed=cfg.seed,
        **fast_kwargs,
        **OmegaConf.to_container(cfg.optim, resolve=True),  # type: ignore[arg-type]
    )
    if m.get("fuse_at_init", False):  # Sparse-Init: W1*W2 drawn as FReP's, trained as plain weights
        merge_(module.model)
    return module


def build_callbacks(cfg: DictConfig, run_dir: Path) -> tuple[list[Callback], MergeReparameterization]:
    callbacks: list[Callback] = []
    if enabled(cfg.get("pruning")):
        callbacks.append(instantiate(cfg.pruning))
    if enabled(cfg.get("ensemble")):
        callbacks.append(instantiate(cfg.ensemble))
    if cfg.get("monitor") is not None:
        monitor: dict[str, Any] = OmegaConf.to_container(cfg.monitor, resolve=True)  # type: ignore[assignment]
        if monitor.get("precision") is None:
            monitor["precision"] = cfg.get("val_attack_precision", "fp32")
        callbacks.append(RobustnessMonitor(**monitor))
    export = MergeReparameterization(dirpath=str(run_dir), filename="model.pt", attr="model")
    callbacks.append(export)
    callbacks.append(RNGState())
    callbacks.append(TrainingClock())
    callbacks.append(RunRecord(run_record(cfg)))
    every = OmegaConf.select(cfg, "checkpoint.every_n_train_steps")
    callbacks.append(LastCheckpoint(run_dir / "checkpoints", every_n_train_steps=every))
    return callbacks, export


# what a resume must keep: the model it loads into, and what the run is (its summary.json says so)
RUN_RECORD_KEYS = (
    "data.name",
    "model.name",
    "model.width",
    "method.name",
    "method.reparam_kind",
    "fast.enabled",
    "seed",
)
# a resume restores the optimizer and LR scheduler from the checkpoint (LR, momentum, milestones, gamma):
# other values in the config would be ignored, while config.yaml records them
OPTIM_RECORD_KEYS = ("lr", "momentum", "weight_decay", "nesterov", "milestones", "gamma")


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """The settings :class:`RunRecord` keeps in checkpoints (plain values; pruning/ensemble as configured)."""
    record: dict[str, Any] = {k: OmegaConf.select(cfg, k, default=None) for k in RUN_RECORD_KEYS}
    record["fast.enabled"] = bool(record["fast.enabled"])
    objective = OmegaConf.select(cfg, "method.objective._target_", default=None)
    record["objective"] = str(objective).rsplit(".", 1)[-1] if objective is not None else None
    optim = cfg.get("optim") or {}
    for key in OPTIM_RECORD_KEYS:
        value = optim.get(key)
        if key == "milestones" and value is not None:
            record[f"optim.{key}"] = [int(m) for m in value]
        elif key == "nesterov" and value is not None:
            record[f"optim.{key}"] = bool(value)
        else:  # float: 0 and 0.0 are the same value
            record[f"optim.{key}"] = float(value) if value is not None else None
    pruning = cfg.get("pruning") if enabled(cfg.get("pruning")) else None
    if pruning is not None:  # float: 0 and 0.0 are the same target
        kind = pruning._target_.rsplit(".", 1)[-1]
        record["pruning"] = f"{kind}({pruning.get('mode')}, {float(pruning.sparsity)})"
        if pruning.get("mode") == "structured" and pruning.get("remove_channels", True):
            record["pruning"] += " removing channels"  # its BN γ/β are zero: not the same run without
    else:
        record["pruning"] = None
    record["ensemble"] = cfg.ensemble._target_.rsplit(".", 1)[-1] if enabled(cfg.get("ensemble")) else None
    return record


def check_resume(cfg: DictConfig) -> None:
    """Refuse, before any data is read, a ``ckpt_path`` saved by a run with other settings."""
    path = cfg.get("ckpt_path")
    if not path:
        return
    if not Path(path).is_file():
        raise ConfigError(
            f"ckpt_path={path} does not exist (a resume needs a checkpoint file, e.g. <run>/checkpoints/last.ckpt)"
        )
    try:
        saved = read_run_record(path)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:  # truncated, not a zip...
        raise ConfigError(
            f"ckpt_path={path} cannot be read as a checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}): "
            "a truncated or foreign file; checkpoints are written atomically, so a file frep-train wrote is whole"
        ) from err
    mismatches = record_mismatches(saved, run_record(cfg)) if saved is not None else []
    if mismatches:
        raise ConfigError(mismatch_message(f"ckpt_path={path}", mismatches))


def _clock_seconds(trainer: pl.Trainer, fallback: float) -> float:
    clocks = [cb for cb in trainer.callbacks if isinstance(cb, TrainingClock)]  # type: ignore[attr-defined]
    return clocks[0].seconds if clocks else fallback


def checkpoint_io(cfg: DictConfig) -> CheckpointIO:
    """Atomic, weights-only checkpoint files; written in a background thread with ``checkpoint.background``."""
    io = AtomicCheckpointIO()
    return BackgroundCheckpointIO(io) if OmegaConf.select(cfg, "checkpoint.background", default=False) else io


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    if not enabled(cfg.get("logger")):
        return False
    save_dir = cfg.logger.get("save_dir") or str(run_dir)
    return instantiate(cfg.logger, save_dir=save_dir)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration and return its summary (also written to ``summary.json``)."""
    validate_train_config(cfg, check_data=True)  # every key, eval.attacks included, before data loads
    for warning in [] if _is_ddp_child() else schedule_warnings(cfg):  # once, not once per rank
        log.warning(warning)
    check_resume(cfg)
    run_dir = _run_dir(cfg)
    if rank_zero_only.rank == 0:  # DDP ranks > 0 (re-executed script) reuse rank 0's directory
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ[RUN_DIR_ENV] = str(run_dir)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.check_available()  # names data.root and the paths tried, before any decoding
    module = build_module(cfg)
    callbacks, export = build_callbacks(cfg, run_dir)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=build_logger(cfg, run_dir),
        default_root_dir=str(run_dir),
        plugins=[checkpoint_io(cfg)],
    )
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    start_wandb(trainer, cfg)  # resolved config to W&B (no-op without logger=wandb)

    start = time.perf_counter()
    fit(trainer, module, datamodule, cfg, run_dir)
    train_seconds = time.perf_counter() - start
    if trainer.global_step == 0:
        raise RuntimeError(
            f"training made no optimizer step (trainer.num_training_batches={trainer.num_training_batches}, "
            f"data.batch_size={cfg.data.batch_size}, data.n_train={cfg.data.get('n_train')}, "
            f"{trainer.world_size} rank(s)): the exported model is untrained; give more images or smaller batches"
        )
    if export.path is None:
        raise RuntimeError("training ended before the merged model was exported (interrupted?)")

    summary = summarize(cfg, trainer, datamodule, export, train_seconds)
    summary["wandb_run_id"] = wandb_run_id(trainer)  # frep-eval adds its numbers to this run
    if trainer.is_global_zero:
        write_json(summary, run_dir / "summary.json")
        log.info("summary: %s", {k: summary[k] for k in ("sparsity", "clean_acc", "pgd_acc", "train_seconds")})
    finish_wandb(trainer, summary, run_dir)  # summary + summary.json to W&B, run closed
    return summary


def fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any, cfg: DictConfig, run_dir: Path) -> None:
    """``trainer.fit`` (resuming from ``ckpt_path``, loaded weights-only), with failures that say what to do."""
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except SIGTERMException as err:  # a SystemExit: Lightning would end the process with status 0
        kept = f"resume with ckpt_path={last}" if last.is_file() else "no checkpoint was written yet"
        raise SystemExit(
            f"frep-train: stopped by SIGTERM before the end of training: no model.pt or summary.json was written; "
            f"{kept}"
        ) from err
    except torch.cuda.OutOfMemoryError as err:
        bs, ebs = OmegaConf.select(cfg, "data.batch_size"), OmegaConf.select(cfg, "data.eval_batch_size")
        raise torch.cuda.OutOfMemoryError(
            f"out of GPU memory with data.batch_size={bs} (validation: data.eval_batch_size={ebs}); lower "
            f"data.batch_size (e.g. data.batch_size={max(1, bs // 2)}) and resume with ckpt_path={last} "
            f"if it exists and was saved at an epoch end (a mid-epoch one resumes only with its own batch size). "
            f"Original error: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    except FloatingPointError as err:
        kept = (
            f"the last good checkpoint is kept: {last} (a resume from it keeps its optimizer and LR: another "
            "optim.lr is refused)"
            if last.is_file()
            else "no checkpoint was written yet"
        )
        raise FloatingPointError(f"training stopped: {err}\n{kept}") from err
    except RuntimeError as err:
        if cfg.get("ckpt_path") and "Error(s) in loading state_dict" in str(err):  # a checkpoint without a RunRecord
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path}: its weights do not fit the model this config builds (model, width, "
                f"method / reparameterization): {str(err).splitlines()[0]}"
            ) from err
        raise


def summarize(
    cfg: DictConfig, trainer: pl.Trainer, datamodule: Any, export: MergeReparameterization, train_seconds: float
) -> dict[str, Any]:
    """Evaluate the exported file itself, loaded into a fresh, unmodified backbone."""
    assert export.path is not None
    model = instantiate(cfg.model)
    model.load_state_dict(load_state_dict_file(export.path), strict=True)
    device = trainer.strategy.root_device
    eps = parse_eps(cfg.eval.eps, "eval.eps")
    steps = int(cfg.eval.pgd_steps)
    attack = PGD(eps=eps, steps=steps, step_size=cfg.eval.step_size)
    restarts = int(cfg.eval.get("restarts", 1))
    loader = datamodule.test_dataloader(batch_size=int(cfg.eval.batch_size))
    pruning = cfg.get("pruning") if enabled(cfg.get("pruning")) else None
    slimmed = _slim_account(model, loader) if pruning is not None and pruning.mode == "structured" else None
    start = time.perf_counter()
    extra = config_attacks(cfg.eval, cfg.seed)  # eval.attacks, e.g. [pgd50,aa]
    # the summary's PGD gets eval.restarts too (an example is robust only if it survives every restart)
    attacks = {f"pgd{steps}": WhiteBoxAttack(attack, f"pgd{steps}", restarts=restarts), **extra}
    result = evaluate(model, loader, attacks, device=device, seed=cfg.seed)
    eval_seconds = time.perf_counter() - start
    state = model.state_dict()
    report = sparsity_report({k: state[k] for k in _prunable_keys(trainer, export)})
    return {
        "method": cfg.method.name,
        "objective": type(getattr(trainer.lightning_module, "objective", None)).__name__,
        "model": cfg.model.name,
        "width": cfg.model.get("width"),
        "dataset": cfg.data.name,
        # pack (the offline JPEG pack) or torchvision (the original pixels): numbers differ slightly between them
        "data_format": datamodule.check_available() if hasattr(datamodule, "check_available") else None,
        "sparsity_target": float(pruning.sparsity) if pruning is not None else 0.0,
        "pruning_mode": pruning.mode if pruning is not None else None,
        "sparsity": report["sparsity"],
        "live_channels": sum(v["live_channels"] for v in report["layers"].values()),
        "channels": sum(v["channels"] for v in report["layers"].values()),
        "slim": slimmed,  # structured: parameters and multiply-adds per image once the emptied channels are cut
        "clean_acc": result["clean"],
        "pgd_acc": result[f"pgd{steps}"],
        **{f"{name}_acc": result[name] for name in extra},
        "worst_case_acc": result["worst_case"],  # per example, over every attack above
        "pgd_steps": steps,
        "pgd_step_size": attack.step_size,
        "pgd_restarts": restarts,
        "eps": eps,
        "n_test": result["n"],
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "train_seconds": round(train_seconds, 2),  # this process's fit
        "train_seconds_total": round(_clock_seconds(trainer, train_seconds), 2),  # incl. segments before a resume
        "peak_memory_gb": _peak_memory_gb(device),
        "eval_seconds": round(eval_seconds, 2),
        "device": _device_name(device),
        "seed": cfg.seed,
        "model_path": str(export.path),
        "overfitting_epochs": _collapsed_epochs(trainer),
        # what trained: the fast path's own account (capture, precision, fallbacks), or the plain path
        "train_step": train_step_description(trainer.lightning_module),
        "frep_lightning": __version__,
        "torch": torch.__version__,
    }


def train_step_description(module: pl.LightningModule) -> str:
    """What trained, for ``summary.json``: the fast path's own account (capture, precision, fallbacks), or the
    plain path. A fit that ran no training step (resumed from a finished run's checkpoint: Lightning skips the
    loop and with it ``on_train_start``) has no account of the fast path, which must not read as the plain one."""
    if isinstance(module, FastFReP):
        return module.fast_summary or "fast path (no training step in this fit: resumed from a finished run)"
    return "plain (automatic optimization)"


def _slim_account(model: torch.nn.Module, loader: Any) -> dict[str, Any]:
    """What cutting the emptied channels out of ``model`` would leave (``frep_lightning.slimming``), on a
    copy; a model the cut cannot handle is reported, not fatal: the run's numbers are already paid for."""
    try:
        _, report = slim(model, example_images(loader))  # compares in eval mode and restores the modes itself
    except Exception as err:  # any failure of this optional account
        log.warning("slim: the emptied channels could not be cut out of the model (%s); model.pt is unaffected", err)
        return {"error": str(err)}
    return {key: report[key] for key in ("parameters", "macs")}


def _prunable_keys(trainer: pl.Trainer, export: MergeReparameterization) -> list[str]:
    """Weight keys of model.pt that pruning selected (every exported Conv/Linear without pruning)."""
    assert export.report is not None
    prefix = f"{export.attr}." if export.attr else ""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, RobustPruning):
            return [f"{n[len(prefix) :]}.weight" for n in cb.selected_layers if n.startswith(prefix)]
    return [f"{name}.weight" for name in export.report["layers"]]


def _collapsed_epochs(trainer: pl.Trainer) -> list[int] | None:
    """Epochs where the robustness monitor saw PGD accuracy collapse (None: not monitored)."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, RobustnessMonitor):
            return list(cb.collapsed_epochs)
    return None


def _peak_memory_gb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors during this process (None on CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


_HYDRA_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def _hydra_flags(argv: list[str]) -> list[str]:
    """The config-location flags of a command line (with their values), to pass on to DDP children."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _HYDRA_FLAGS and i + 1 < len(argv):
            out += argv[i : i + 2]
            i += 1
        elif argv[i].startswith(tuple(f"{f}=" for f in _HYDRA_FLAGS)):
            out.append(argv[i])
        i += 1
    return out


def pin_ddp_child_argv() -> None:
    """Make a DDP child (this script re-executed by Lightning, LOCAL_RANK > 0) run its parent's job.

    Lightning re-runs the parent's command line plus ``hydra.run.dir=<hydra.run.dir>``: under
    ``-m`` every child would start the whole sweep, and ``hydra.run.dir`` is not a sweep job's
    output directory. The child instead gets the parent job's own overrides and its run dir
    (which rank 0 already created), and writes no ``.hydra/`` of its own.
    """
    if not _is_ddp_child() or CHILD_ARGV_ENV not in os.environ:
        return
    rank = os.environ["LOCAL_RANK"]
    sys.argv = [sys.argv[0], *json.loads(os.environ[CHILD_ARGV_ENV]), f"hydra.job.name=train_ddp_process_{rank}"]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    if not _is_ddp_child():
        run_dir = HydraConfig.get().runtime.output_dir
        child = [*_hydra_flags(sys.argv[1:]), *HydraConfig.get().overrides.task]
        child += [f'hydra.run.dir="{run_dir}"', "hydra.output_subdir=null"]
        os.environ[CHILD_ARGV_ENV] = json.dumps(child)
    exit_on_config_error("frep-train", lambda: run(cfg))


def main() -> None:
    """``frep-train``: the Hydra app (DDP children are pinned to their parent's job first)."""
    pin_ddp_child_argv()
    _hydra_main()


if __name__ == "__main__":
    main()
