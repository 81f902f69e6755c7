"""``frep-eval``: robustness and sparsity report of a trained model (Hydra app over ``conf/eval.yaml``).

``ckpt`` may be a run directory (its ``model.pt``, else ``checkpoints/last.ckpt``), a ``model.pt``
(plain state_dict of the backbone) or a Lightning checkpoint of :class:`~frep_lightning.module.FReP`
(reparameterized factors + masks: rebuilt and merged exactly as at fit end). The run's saved
``config.yaml`` (next to the file, or one directory up) supplies the model and data, so only
the evaluation settings need to be given::

    frep-eval ckpt=outputs/frep-resnet18-cifar10-s0.99/2026-01-01_12-00-00
    frep-eval ckpt=.../model.pt attacks=[clean,pgd50,aa] n_test=1000 restarts=5
    python -m frep_lightning.eval ckpt=.../checkpoints/last.ckpt attacks=[clean,fgsm,pgd50]

Output: a table on the terminal, ``eval.json`` beside the evaluated file (``output=`` elsewhere)
and the same numbers to the logger (``logger=auto``: the run's own logger config, e.g. W&B).

Seeds: ``n_test=N`` evaluates the class-balanced subset that the run's ``data.seed`` picks (the
images of its summary.json evaluation; ``seed`` only when no run config is found), recorded as
``subset_seed`` in eval.json; ``seed`` drives the attacks' randomness.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from frep_lightning import __version__
from frep_lightning.attacks import parse_eps
from frep_lightning.checkpointing import callback_states
from frep_lightning.compression import compression_report, human_bytes
from frep_lightning.config import ConfigError, closed_key_errors, enabled, exit_on_config_error
from frep_lightning.evaluate import (
    AA_COMPONENTS,
    AA_VERSIONS,
    ATTACKS,
    PRECISIONS,
    EvalResult,
    build_attacks,
    check_attack_names,
    run_attacks,
)
from frep_lightning.export import NotOurFileError, merged_state_dict, safe_load, write_json
from frep_lightning.pruning import without_classifier
from frep_lightning.reparam import add_masks_, select_layers
from frep_lightning.slimming import example_images, save_program, slim
from frep_lightning.sweep import wandb_experiment
from frep_lightning.train import build_module, config_dir

log = logging.getLogger("frep_lightning")

CONFIG_NAMES = ("config.yaml", ".hydra/config.yaml")


# -- locating the model and its run config ---------------------------------------------------
def resolve_ckpt(ckpt: str | os.PathLike[str]) -> Path:
    """The file to evaluate: ``ckpt`` itself, or inside a run directory ``model.pt`` (the merged
    ensemble) else ``checkpoints/last.ckpt``."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        for candidate in (path / "model.pt", path / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"ckpt={str(ckpt)!r} is a directory without model.pt or checkpoints/last.ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={str(ckpt)!r} does not exist")
    return path


def find_run_config(model_file: Path) -> Path | None:
    """``config.yaml`` saved by frep-train next to the file or one level up (checkpoints/)."""
    for directory in (model_file.parent, model_file.parent.parent):
        for name in CONFIG_NAMES:
            if (directory / name).is_file():
                return directory / name
    return None


def _merge_overrides(base: DictConfig | None, overrides: Mapping[str, Any] | None) -> DictConfig:
    node = OmegaConf.create({}) if base is None else OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    for key, value in (overrides or {}).items():
        if value is not None:
            node[key] = value
    return node


# -- loading ---------------------------------------------------------------------------------
def _not_ours(path: Path, why: str) -> ConfigError:
    """A ``ckpt=`` (or ``model.*`` override) that does not fit: said as a config error, without a traceback."""
    return ConfigError(
        f"ckpt={str(path)!r} is not a model of ours ({why}); expected a model.pt written by frep-train "
        "(a plain state_dict) or a Lightning checkpoint of the FReP module (checkpoints/last.ckpt)"
    )


def load_file(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: never unpickles code from a file we are asked to judge."""
    try:
        obj = safe_load(path)
    except NotOurFileError as err:  # pickled objects, truncated or foreign files
        raise _not_ours(path, f"torch.load(weights_only=True) refused it: {err}") from err
    if not isinstance(obj, dict):
        raise _not_ours(path, f"it holds a {type(obj).__name__}, not a dict")
    return obj


def is_lightning_checkpoint(obj: Mapping[str, Any]) -> bool:
    return isinstance(obj.get("state_dict"), dict) and "pytorch-lightning_version" in obj


def merged_from_checkpoint(ckpt: Mapping[str, Any], run_cfg: DictConfig) -> dict[str, Tensor]:
    """Rebuild the reparameterized FReP module of the run, load the checkpoint (the ensemble, with
    factors and masks) and merge it into a plain backbone state_dict, as the export at fit end does."""
    module = build_module(run_cfg)
    if enabled(run_cfg.get("pruning")):  # RobustPruning gives plain layers their masks in setup()
        add_masks_(module, run_cfg.pruning.get("include", ["*"]), run_cfg.pruning.get("exclude", []))
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"the checkpoint does not match the run's config (model/method): {err}") from err
    return merged_state_dict(module.model)


def checkpoint_notes(ckpt: Mapping[str, Any], run_cfg: DictConfig) -> list[str]:
    """What makes a training checkpoint's model differ from the run's exported one."""
    states = callback_states(dict(ckpt))
    notes = []
    pruning = states.get("RobustPruning", states.get("GradualPruning"))
    if enabled(run_cfg.get("pruning")) and pruning is not None and not pruning.get("pruned", True):
        notes.append(
            f"this checkpoint (step {ckpt.get('global_step')}) was saved before the run pruned (pruning.epoch="
            f"{run_cfg.pruning.get('epoch')}, target {run_cfg.pruning.get('sparsity')}): the model evaluated is dense"
        )
    if states.get("TemporalEnsemble", {}).get("bn_fresh") is False:
        notes.append(
            "the ensemble's BatchNorm statistics in this checkpoint (saved mid-epoch) predate its latest weights; the "
            "export at fit end re-estimates them, so these numbers are not those of the final model"
        )
    return notes


def load_model(
    path: Path, run_cfg: DictConfig | None, model_cfg: DictConfig, notes: list[str] | None = None
) -> nn.Module:
    """A fresh backbone (``model_cfg``) holding the weights of ``path`` (model.pt or Lightning .ckpt);
    ``notes`` gets what makes a training checkpoint's model differ from the exported one."""
    obj = load_file(path)
    if is_lightning_checkpoint(obj):
        if run_cfg is None or "method" not in run_cfg:
            raise ConfigError(
                f"ckpt={str(path)!r} is a Lightning checkpoint: rebuilding its reparameterized module needs the "
                "run's config.yaml (next to it or one directory up); evaluate the run's model.pt instead"
            )
        state = merged_from_checkpoint(obj, run_cfg)
        if notes is not None:
            notes.extend(checkpoint_notes(obj, run_cfg))
    else:
        if not obj or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
            raise _not_ours(path, "not a state_dict of tensors")
        if any("parametrizations." in k for k in obj):
            raise _not_ours(path, "reparameterized keys; a model.pt holds merged weights")
        state = obj
    model = instantiate(model_cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same keys, other shapes: another width or number of classes
        shapes = "; ".join(line.strip() for line in str(err).splitlines()[1:3])
        name, width = model_cfg.get("name"), model_cfg.get("width")
        hint = fitting_settings(name, state, model_cfg.get("num_classes"))
        hint = f"; it fits {hint}: pass that override (or keep the run's config.yaml beside the file)" if hint else ""
        raise _not_ours(path, f"its tensor shapes do not fit model {name!r} (width {width}): {shapes}{hint}") from err
    if missing or unexpected:
        raise _not_ours(
            path,
            f"its keys do not fit model {model_cfg.get('name')!r} (width {model_cfg.get('width')}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}",
        )
    return model.eval()


def fitting_settings(name: Any, state: Mapping[str, Tensor], num_classes: Any = 10) -> str | None:
    """``model.width=W`` (and ``num_classes=K``) under which built-in model ``name`` has exactly the shapes of
    ``state``: what a bare model.pt of another width needs. Candidates come from the first conv widths
    (ResNet/VGG: base channels; WRN: widen factor = first block's width / 16); None when none fits. The class
    count is named whenever it differs from ``num_classes`` (the config's): the width alone would not fit."""
    from frep_lightning.models import BUILTIN, build_model

    convs = [v.shape[0] for k, v in state.items() if v.dim() == 4 and k.endswith(".weight")]
    linears = [v.shape[0] for k, v in state.items() if v.dim() == 2 and k.endswith(".weight")]
    if name not in BUILTIN or not convs or not linears:
        return None
    classes = linears[-1]
    for width in dict.fromkeys(c for c in (convs[0], *(c // 16 for c in convs[:3])) if c > 0):
        try:
            shapes = {k: v.shape for k, v in build_model(name, num_classes=classes, width=width).state_dict().items()}
        except (ValueError, RuntimeError):
            continue
        if shapes.keys() == state.keys() and all(shapes[k] == state[k].shape for k in shapes):
            return f"model.width={width}" + (f" with {classes} classes (data.name)" if classes != num_classes else "")
    return None


def prunable_layers(model: nn.Module, run_cfg: DictConfig | None) -> list[str] | None:
    """Backbone layer names that the run's pruning selected (None: every Conv2d/Linear)."""
    if run_cfg is None or not enabled(run_cfg.get("pruning")):
        return None
    holder = nn.Module()
    holder.model = model  # pruning patterns are over the LightningModule's names (model.net.*)
    names = [
        n for n, _ in select_layers(holder, run_cfg.pruning.get("include", ["*"]), run_cfg.pruning.get("exclude", []))
    ]
    if run_cfg.pruning.get("mode") == "structured":  # as RobustPruning selects them
        names = without_classifier(holder, names, say=None)
    return [n[len("model.") :] for n in names]


# -- config ----------------------------------------------------------------------------------
def _int_or_none(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = cfg.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}{' or null' if key == 'n_test' else ''}")


def validate_eval_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid key (before any file is read)."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise ConfigError("ckpt=<run dir | model.pt | Lightning .ckpt> is required")
    unknown = closed_key_errors(cfg, "eval", ("aa", "data", "model"))
    if unknown:
        raise ConfigError("; ".join(unknown))
    try:
        check_attack_names(cfg.get("attacks"))  # not list() first: attacks=pgd50 is a string, not 5 names
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for key in ("eps", "step_size"):
        try:
            parse_eps(cfg.get(key), key)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    _int_or_none(cfg, "n_test")
    for key in ("restarts", "queries", "batch_size"):
        if cfg.get(key) is None:
            raise ConfigError(f"{key} must be an integer >= 1")
        _int_or_none(cfg, key)
    _int_or_none(cfg, "seed", minimum=0)
    if not isinstance(cfg.get("slim", False), bool):
        raise ConfigError(f"slim={cfg.get('slim')!r} must be true or false")
    momentum = cfg.get("momentum")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or momentum < 0:
        raise ConfigError(f"momentum={momentum!r} must be a number >= 0")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r} is not valid; allowed values: {', '.join(PRECISIONS)}")
    if cfg.aa.version not in AA_VERSIONS:
        raise ConfigError(f"aa.version={cfg.aa.version!r} is not valid; allowed values: {', '.join(AA_VERSIONS)}")
    components = cfg.aa.get("components")
    if (cfg.aa.version == "custom") != (components is not None):
        raise ConfigError(f"aa.components is required exactly with aa.version=custom (e.g. [{AA_COMPONENTS[0]}])")
    if components is not None and (not components or any(c not in AA_COMPONENTS for c in components)):
        raise ConfigError(f"aa.components={list(components)!r}: allowed {', '.join(AA_COMPONENTS)}")
    if "logger" in cfg and cfg.logger is not None and not enabled(cfg.logger):
        raise ConfigError("logger: choose a logger config (logger=csv, wandb, auto) or logger=none")
    check_device(str(cfg.device))


def check_device(name: str) -> None:
    """``device=`` must be usable here: ``cuda`` / ``cuda:N`` without CUDA (or N past the visible
    GPUs) is refused now, not after the model and the test set were loaded (a raw driver error)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:1)") from err
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available on this machine; use device=cpu or device=auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"device={name!r} but this machine has {count} CUDA device(s): "
            f"{', '.join(f'cuda:{i}' for i in range(count))}"
        )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# -- report ----------------------------------------------------------------------------------
def build_report(
    result: EvalResult,
    compression: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``eval.json`` content: accuracies in [0, 1] by attack name, ``worst_case``, sparsity, sizes."""
    acc = result.accuracies()
    return {
        **acc,
        "attacks": result.attacks,
        "correct": {k: int(v.sum()) for k, v in result.correct.items()} | {"worst_case": int(result.worst_case.sum())},
        "n": result.n,
        "sparsity": compression["sparsity"],
        "nonzero": compression["nonzero"],
        "layers": compression["layers"],
        "sizes": compression["sizes"],
        "seconds": result.seconds,
        "warnings": list(result.warnings),
        **settings,
    }


def print_report(report: Mapping[str, Any], layers: bool = True) -> None:
    """Rich tables: accuracies (with the worst case), then sparsity/size per layer, then warnings."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the tables into 80 columns
        console = Console(width=160)
    n = report["n"]
    title = (
        f"{report.get('model', '')} on {report.get('dataset', '')}: L-inf eps {report['eps_str']}, "
        f"n={n}, seed {report['seed']}"
        + ("" if report.get("subset_seed", report["seed"]) == report["seed"] else f" (subset {report['subset_seed']})")
        + f", precision {report['precision']}"
    )
    table = Table(title=title)
    for col in ("attack", "accuracy", "correct", "seconds"):
        table.add_column(col, justify="left" if col == "attack" else "right")
    for name in ["clean", *report["attacks"], "worst_case"]:
        seconds = report["seconds"].get(name)
        table.add_row(
            name,
            f"{report[name] * 100:.2f} %",
            f"{report['correct'][name]}/{n}",
            "" if seconds is None else f"{seconds:.1f}",
            style="bold" if name == "worst_case" else None,
        )
    console.print(table)
    sizes = report["sizes"]
    if layers:
        lt = Table(title="sparsity per layer")
        for col in ("layer", "shape", "sparsity", "nonzero", "live ch.", "dense", "CSR", "bitmask"):
            lt.add_column(col, justify="left" if col in ("layer", "shape") else "right")
        for name, row in report["layers"].items():
            lt.add_row(
                name + ("" if row["prunable"] else " (kept dense)"),
                "x".join(map(str, row["shape"])),
                f"{row['sparsity'] * 100:.2f} %",
                str(row["nonzero"]),
                f"{row['live_channels']}/{row['channels']}",
                human_bytes(row["dense_bytes"]),
                human_bytes(row["csr_bytes"]),
                human_bytes(row["bitmask_bytes"]),
            )
        console.print(lt)
    console.print(
        f"global sparsity {report['sparsity'] * 100:.2f} % ({report['nonzero']} of {sizes['prunable_params']} "
        f"prunable weights non-zero, live channels {sizes['live_channels']}/{sizes['channels']}); model "
        f"{human_bytes(sizes['model_dense_bytes'])} dense, {human_bytes(sizes['model_sparse_bytes'])} sparse "
        f"(x{sizes['compression_ratio']:.1f})"
    )
    slimmed = report.get("slim")
    if slimmed:
        before, after = slimmed["parameters"]
        macs_before, macs_after = slimmed["macs"]
        console.print(
            f"slim network (evaluated above): {after} parameters of {before} ({after / before * 100:.1f} %), "
            f"{macs_after / 1e6:.1f}M of {macs_before / 1e6:.1f}M multiply-adds per image, "
            f"{len(slimmed['layers'])} layers narrowed; {slimmed['program']}"
        )
    for w in report["warnings"]:
        console.print(f"[bold red]WARNING[/]: {w}")


# -- logging ---------------------------------------------------------------------------------
WANDB_FACTORIES = ("frep_lightning.sweep.wandb_logger", "frep_lightning.sweep.auto_logger")


def make_loggers(
    cfg: DictConfig, run_cfg: DictConfig | None, save_dir: Path, wandb_run_id: str | None = None
) -> list[Any]:
    """The logger group chosen for frep-eval (``logger=csv|wandb|auto``; ``logger=none``: none), or,
    when none was chosen, the run's own logger config, writing under ``save_dir``. With the training
    run's W&B id (its ``summary.json``) a W&B logger resumes that run, so its summary gets the numbers."""
    node = cfg.logger if "logger" in cfg else (None if run_cfg is None else run_cfg.get("logger"))
    if not enabled(node):
        return []
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    node.save_dir = str(save_dir)
    if wandb_run_id and node.get("_target_") in WANDB_FACTORIES:
        node.id, node.resume = wandb_run_id, "allow"
        # the resumed run keeps its own project, entity, name and group: eval.yaml's run_name (frep-eval) or the
        # default project of logger=wandb would rename the training run, or put its id into another project
        own = run_cfg.get("logger") if run_cfg is not None else None
        own = own if isinstance(own, DictConfig) else OmegaConf.create({})
        node.name, node.group = own.get("name"), own.get("group")  # None: the run's own, unchanged
        for key in ("project", "entity"):
            if own.get(key) is not None:
                node[key] = own[key]
    made = instantiate(node)
    if made is False or made is None:
        return []
    return list(made) if isinstance(made, (list, tuple)) else [made]


def _run_summary_value(config_path: Path | None, key: str) -> str | None:
    """``key`` of the run's ``summary.json`` (beside its config.yaml) when it is a non-empty string, else None."""
    path = None if config_path is None else config_path.parent / "summary.json"
    if path is None or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _training_wandb_id(config_path: Path | None) -> str | None:
    """``wandb_run_id`` of the run's ``summary.json``, if any."""
    return _run_summary_value(config_path, "wandb_run_id")


def log_report(loggers: list[Any], report: Mapping[str, Any]) -> dict[str, float]:
    """``eval/<name>`` accuracies, worst case, sparsity and sizes to each logger; for W&B also the
    run summary (what dashboards show)."""
    from lightning.pytorch.loggers import WandbLogger

    metrics = {f"eval/{k}": float(report[k]) for k in ["clean", *report["attacks"], "worst_case", "sparsity", "n"]}
    metrics["eval/model_sparse_bytes"] = float(report["sizes"]["model_sparse_bytes"])
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            wandb_experiment(lg)  # started here: offline if a guessed online mode fails
        lg.log_metrics(metrics, step=0)
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update(metrics)
        lg.finalize("success")
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()
    return metrics


# -- the app ---------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt``; returns the report (also written to ``eval.json``). The test subset
    follows the run's ``data.seed`` (see the module docstring), the attacks ``cfg.seed``."""
    validate_eval_config(cfg)
    model_file = resolve_ckpt(cfg.ckpt)
    config_path = find_run_config(model_file)
    run_cfg = OmegaConf.load(config_path) if config_path is not None else None
    if run_cfg is not None and not isinstance(run_cfg, DictConfig):
        raise ConfigError(f"{config_path} is not a mapping")

    model_cfg = _merge_overrides(None if run_cfg is None else run_cfg.get("model"), cfg.get("model"))
    if "_target_" not in model_cfg:
        model_cfg["_target_"] = "frep_lightning.models.build_model"
    data_cfg = _merge_overrides(None if run_cfg is None else run_cfg.get("data"), cfg.get("data"))
    if "_target_" not in data_cfg:
        data_cfg["_target_"] = "frep_lightning.data.ImageClassificationData"
    if not model_cfg.get("name") or not data_cfg.get("name"):
        raise ConfigError(
            f"no run config.yaml found beside {model_file}: give model.name=..., model.width=... and data.name=..."
        )
    if model_cfg.get("num_classes") is None and model_cfg._target_ == "frep_lightning.models.build_model":
        from frep_lightning.config import num_classes

        model_cfg.num_classes = num_classes(data_cfg.name)
    with open_dict(data_cfg):
        data_cfg.n_test = cfg.n_test
        # the test subset is the run's (data.seed picked it for the summary.json evaluation), so frep-eval
        # and the run's own numbers judge the same images; cfg.seed only without a run config (and attacks)
        if data_cfg.get("seed") is None:
            data_cfg.seed = cfg.seed
        data_cfg.eval_batch_size = cfg.batch_size
        data_cfg.augment = False

    device = _device(str(cfg.device))
    notes: list[str] = []
    model = load_model(model_file, run_cfg, model_cfg, notes)
    compression = compression_report(model.state_dict(), prunable_layers(model, run_cfg))

    datamodule = instantiate(data_cfg)
    data_format = datamodule.check_available()
    trained_on = _run_summary_value(config_path, "data_format")
    if trained_on is not None and trained_on != data_format:  # the pack's JPEG pixels are not torchvision's
        notes.append(
            f"the run trained on {data_cfg.name} in {trained_on} format, this evaluation reads its {data_format} "
            f"files under data.root={str(datamodule.root)!r}: the images differ slightly (the offline pack is a JPEG "
            f"re-encoding), so these numbers are not the run's summary.json numbers; data.format={trained_on} "
            "reads the same kind"
        )
    datamodule.setup("test")
    out = Path(cfg.output) if cfg.get("output") else model_file.parent / "eval.json"
    slimmed = None
    if cfg.get("slim"):  # the numbers below are then the smaller network's, which is what ships
        example = example_images(datamodule.test_dataloader())
        model, slimmed = slim(model, example)
        # beside eval.json; with output=<name>.json, <name>_model_slim.pt2 (two evals in one folder keep both)
        slimmed["program"] = str(out.with_name(f"{out.stem}_model_slim.pt2" if cfg.get("output") else "model_slim.pt2"))
        save_program(model, slimmed["program"], example)
        log.info("eval: slim model (%d -> %d parameters) written to %s", *slimmed["parameters"], slimmed["program"])
    names = check_attack_names(cfg.attacks)
    aa_components = None if cfg.aa.get("components") is None else list(cfg.aa.components)
    attacks = build_attacks(
        names,
        eps=cfg.eps,
        step_size=cfg.step_size,
        restarts=cfg.restarts,
        momentum=float(cfg.momentum),
        queries=cfg.queries,
        seed=cfg.seed,
        precision=cfg.precision,
        aa_version=cfg.aa.version,
        aa_components=aa_components,
    )
    start = time.perf_counter()
    result = run_attacks(model, datamodule.test_dataloader(), attacks, device=device, seed=cfg.seed)
    if cfg.n_test is not None and result.n < cfg.n_test:
        result.warnings.insert(0, f"n_test={cfg.n_test} asked, but the test split has {result.n} images: all evaluated")
    result.warnings[:0] = notes
    eps = parse_eps(cfg.eps, "eps")
    settings = {
        "eps": eps,
        "eps_str": str(cfg.eps),
        "seed": cfg.seed,
        "subset_seed": data_cfg.seed,  # the n_test subset's seed: the run's data.seed, else seed
        "precision": cfg.precision,
        "attack_settings": {name: a.describe() for name, a in attacks.items()},
        "model_path": str(model_file),
        "config_path": None if config_path is None else str(config_path),
        "model": model_cfg.get("name"),
        "width": model_cfg.get("width"),
        "dataset": data_cfg.get("name"),
        "data_format": data_format,  # pack (the offline JPEG pack) or torchvision (the original pixels)
        "n_test": cfg.n_test,
        "device": _device_name(device),
        "eval_seconds": round(time.perf_counter() - start, 2),
        "tf32": bool(device.type == "cuda" and torch.backends.cudnn.allow_tf32),
        "frep_lightning": __version__,
        "torch": torch.__version__,
        "slim": slimmed,
    }
    report = build_report(result, compression, settings)
    write_json(report, out)
    print_report(report, layers=bool(cfg.get("print_layers", True)))
    log.info("eval: wrote %s", out)
    loggers = make_loggers(cfg, run_cfg, out.parent / "eval_logs", _training_wandb_id(config_path))
    log_report(loggers, report)
    for w in result.warnings:
        log.warning(w)
    return report


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    exit_on_config_error("frep-eval", lambda: run(cfg), (ConfigError, FileNotFoundError))  # ckpt= names no file


__all__ = ["ATTACKS", "find_run_config", "load_model", "main", "resolve_ckpt", "run", "validate_eval_config"]

if __name__ == "__main__":
    main()
