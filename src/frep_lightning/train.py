"""``frep-train``: compose the config, validate it, train, export ``model.pt``, write ``summary.json``.

Everything is instantiated from the Hydra config (``conf/``); the run directory receives
``model.pt`` (merged, pruned ensemble, plain state_dict of the unmodified backbone),
``summary.json``, ``checkpoints/last.ckpt`` and the logger's files.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from frep_lightning import __version__
from frep_lightning.attacks import PGD, parse_eps
from frep_lightning.config import enabled, num_classes, validate_train_config
from frep_lightning.evaluate import evaluate
from frep_lightning.export import MergeReparameterization, write_json
from frep_lightning.module import FReP
from frep_lightning.monitor import RobustnessMonitor
from frep_lightning.pruning import RobustPruning, sparsity_report

log = logging.getLogger("frep_lightning")

OmegaConf.register_new_resolver("frep_num_classes", num_classes, replace=True)


def config_dir() -> str:
    """``conf/`` of a source checkout / editable install, or the copy packaged in a wheel."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf")


def _run_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("run_dir") or Path.cwd() / "outputs" / time.strftime("%Y-%m-%d_%H-%M-%S"))


def build_module(cfg: DictConfig) -> FReP:
    m = cfg.method
    return FReP(
        model=instantiate(cfg.model),
        objective=instantiate(m.objective),
        attack=instantiate(m.attack),
        reparam_kind=m.reparam_kind,
        reparam_init=m.reparam_init,
        val_attack_steps=cfg.val_attack_steps,
        seed=cfg.seed,
        **OmegaConf.to_container(cfg.optim, resolve=True),  # type: ignore[arg-type]
    )


def build_callbacks(cfg: DictConfig, run_dir: Path) -> tuple[list[Callback], MergeReparameterization]:
    callbacks: list[Callback] = []
    if enabled(cfg.get("pruning")):
        callbacks.append(instantiate(cfg.pruning))
    if enabled(cfg.get("ensemble")):
        callbacks.append(instantiate(cfg.ensemble))
    if cfg.get("monitor") is not None:
        callbacks.append(RobustnessMonitor(**OmegaConf.to_container(cfg.monitor, resolve=True)))  # type: ignore[arg-type]
    export = MergeReparameterization(dirpath=str(run_dir), filename="model.pt", attr="model")
    callbacks.append(export)
    callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0))
    return callbacks, export


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    if not enabled(cfg.get("logger")):
        return False
    save_dir = cfg.logger.get("save_dir") or str(run_dir)
    return instantiate(cfg.logger, save_dir=save_dir)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration and return its summary (also written to ``summary.json``)."""
    validate_train_config(cfg)
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.check_available()  # names data.root and the paths tried, before any decoding
    module = build_module(cfg)
    callbacks, export = build_callbacks(cfg, run_dir)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=build_logger(cfg, run_dir), default_root_dir=str(run_dir)
    )
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_seconds = time.perf_counter() - start
    if export.path is None:
        raise RuntimeError("training ended before the merged model was exported (interrupted?)")

    summary = summarize(cfg, trainer, datamodule, export, train_seconds)
    if trainer.is_global_zero:
        write_json(summary, run_dir / "summary.json")
        log.info("summary: %s", {k: summary[k] for k in ("sparsity", "clean_acc", "pgd_acc", "train_seconds")})
    return summary


def summarize(
    cfg: DictConfig, trainer: pl.Trainer, datamodule: Any, export: MergeReparameterization, train_seconds: float
) -> dict[str, Any]:
    """Evaluate the exported file itself, loaded into a fresh, unmodified backbone."""
    assert export.path is not None
    model = instantiate(cfg.model)
    model.load_state_dict(torch.load(export.path, map_location="cpu", weights_only=True), strict=True)
    device = trainer.strategy.root_device
    eps = parse_eps(cfg.eval.eps, "eval.eps")
    steps = int(cfg.eval.pgd_steps)
    attack = PGD(eps=eps, steps=steps, step_size=cfg.eval.step_size)
    start = time.perf_counter()
    result = evaluate(model, datamodule.test_dataloader(), {f"pgd{steps}": attack}, device=device)
    eval_seconds = time.perf_counter() - start
    state = model.state_dict()
    report = sparsity_report({k: state[k] for k in _prunable_keys(trainer, export)})
    pruning = cfg.get("pruning") if enabled(cfg.get("pruning")) else None
    return {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "width": cfg.model.get("width"),
        "dataset": cfg.data.name,
        "sparsity_target": float(pruning.sparsity) if pruning is not None else 0.0,
        "pruning_mode": pruning.mode if pruning is not None else None,
        "sparsity": report["sparsity"],
        "live_channels": sum(v["live_channels"] for v in report["layers"].values()),
        "channels": sum(v["channels"] for v in report["layers"].values()),
        "clean_acc": result["clean"],
        "pgd_acc": result[f"pgd{steps}"],
        "pgd_steps": steps,
        "pgd_step_size": attack.step_size,
        "eps": eps,
        "n_test": result["n"],
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "device": _device_name(device),
        "seed": cfg.seed,
        "model_path": str(export.path),
        "overfitting_epochs": _collapsed_epochs(trainer),
        "frep_lightning": __version__,
        "torch": torch.__version__,
    }


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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
