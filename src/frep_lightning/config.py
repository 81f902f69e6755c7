"""One schema for the composed training config, checked before any data loads.

:data:`RULES` is an explicit table: one row per key, with the requirement its value must meet
(cross-key rules such as ``pruning.epoch < trainer.max_epochs`` included). On top of it, every
node that names a constructor (``_target_``) may only hold keys that constructor takes, so a
typo such as ``+pruning.sparsty=0.9`` fails here instead of as a ``TypeError`` later. The data
location is checked last, without reading an image. All violations are reported at once, one
per line, each naming the key, its value and the allowed values, so a bad sweep fails in a
second instead of after an epoch. Constructors validate their own arguments as well (the
callbacks are used outside this app).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import Container, DictConfig, OmegaConf

from frep_lightning.attacks import BN_MODES as ATTACK_BN
from frep_lightning.attacks import PRECISIONS as ATTACK_PRECISIONS
from frep_lightning.attacks import parse_eps
from frep_lightning.reparam import INITS as REPARAM_INITS
from frep_lightning.reparam import KINDS as REPARAM_KINDS

DATASETS = {"cifar10": 10, "cifar100": 100, "svhn": 10}
DATA_FORMATS = ("auto", "pack", "torchvision")
# Hydra's own keys inside a node that has a _target_
_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}
# nodes instantiated by frep-train; their keys must be parameters of the target
TARGET_NODES = ("data", "model", "pruning", "ensemble", "logger", "trainer", "method.objective", "method.attack")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


class DataNotFoundError(ConfigError, FileNotFoundError):
    """``data.root`` holds no usable dataset and ``data.download`` is off."""


def exit_on_config_error(
    app: str, run: Callable[[], Any], errors: tuple[type[BaseException], ...] = (ConfigError,)
) -> Any:
    """``run()``; a :class:`ConfigError` (bad key, missing data; or any of ``errors``) of a single run ends
    the process with its message alone, not Hydra's traceback around it: the message names the key and
    says what to change. In a multirun it propagates as before (Hydra reports the failing job)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return run()
    except errors as err:
        if HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN":
            raise
        raise SystemExit(f"{app}: {err}") from None


def config_dir() -> str:
    """``conf/`` of a source checkout / editable install, or the copy packaged in a wheel."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf")


def method_names() -> list[str]:
    """The known methods: one config file each in ``conf/method``."""
    return sorted(p.stem for p in (Path(config_dir()) / "method").glob("*.yaml"))


def enabled(node: Any) -> bool:
    """A callback/logger group is on when it names something to instantiate (``pruning=none``
    sets it to null; an experiment's leftover keys without ``_target_`` do not turn it on)."""
    return node is not None and "_target_" in node


def num_classes(name: str) -> int:
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not valid; allowed values: {', '.join(DATASETS)}")
    return DATASETS[name]


def normalization(name: str, which: str) -> list[float]:
    """``data.name``'s per-channel training-set ``mean`` or ``std`` (the ``frep_normalization`` resolver that
    model.mean / model.std default to)."""
    from frep_lightning.data import NORMALIZATION

    num_classes(name)  # the same error for an unknown dataset
    if which not in ("mean", "std"):
        raise ConfigError(f"frep_normalization: {which!r} is neither mean nor std")
    return list(NORMALIZATION[name][0 if which == "mean" else 1])


# conf/model/*.yaml: num_classes, mean and std follow data.name
OmegaConf.register_new_resolver("frep_num_classes", num_classes, replace=True)
OmegaConf.register_new_resolver("frep_normalization", normalization, replace=True)


# ---- value predicates ---------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(lo: int) -> Callable[[Any, DictConfig], bool]:
    return lambda v, _: _is_int(v) and v >= lo


def _between(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Callable[[Any, DictConfig], bool]:
    def check(v: Any, _: DictConfig) -> bool:
        if not _is_number(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return check


def _one_of(values: Callable[[], Sequence[str]] | Sequence[str]) -> tuple[Callable[[Any, DictConfig], bool], Any]:
    get = values if callable(values) else (lambda: values)
    return (lambda v, _: v in get()), (lambda _: f"is not valid; allowed values: {', '.join(get())}")


# The callbacks' own choices (read lazily: those modules import Lightning)
def _pruning_modes() -> Sequence[str]:
    from frep_lightning.pruning import MODES

    return MODES


def _ensemble_bn() -> Sequence[str]:
    from frep_lightning.ensemble import BN_MODES

    return BN_MODES


def _ensemble_average() -> Sequence[str]:
    from frep_lightning.ensemble import AVERAGE_MODES

    return AVERAGE_MODES


def _eps(v: Any, _: DictConfig) -> bool:
    try:
        parse_eps(v)
    except (ValueError, TypeError):
        return False
    return True


def _rgb_stats(positive: bool) -> Callable[[Any, DictConfig], bool]:
    """Three per-channel statistics of [0, 1] images (a 0-255 value is the usual slip)."""

    def check(v: Any, _: DictConfig) -> bool:
        if isinstance(v, str) or not isinstance(v, Sequence) or len(v) != 3:
            return False
        return all(_is_number(x) and (x > 0 if positive else x >= 0) and x <= 1 for x in v)

    return check


def _is_bool(v: Any, _: DictConfig) -> bool:
    return isinstance(v, bool)


# The fast path's choices (read lazily: frep_lightning.fast imports Lightning)
def _fast_captures() -> Sequence[str]:
    from frep_lightning.fast import CAPTURES

    return CAPTURES


def _fast_sgds() -> Sequence[str]:
    from frep_lightning.fast import SGD_IMPLS

    return SGD_IMPLS


def _fast_streams(v: Any, _: DictConfig) -> bool:
    return _is_int(v) and v in (1, 2)


def _nesterov(v: Any, cfg: DictConfig) -> bool:
    """torch's SGD refuses Nesterov without momentum, but only when the optimizer is built (after data setup)."""
    momentum = OmegaConf.select(cfg, "optim.momentum")
    return isinstance(v, bool) and (not v or (_is_number(momentum) and momentum > 0))


def _path(v: Any, _: DictConfig) -> bool:
    return isinstance(v, str) and bool(v)


def _str_list(v: Any, _: DictConfig) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)


def _milestones(v: Any, _: DictConfig) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_int(m) and m > 0 for m in v) and list(v) == sorted(set(v))


def _model_name(v: Any, _: DictConfig) -> bool:
    from frep_lightning.models import TORCHVISION_PREFIX, _torchvision_classifiers, model_names

    if not isinstance(v, str):
        return False
    if v.startswith(TORCHVISION_PREFIX):
        return v[len(TORCHVISION_PREFIX) :] in _torchvision_classifiers()
    return v in model_names()


def _model_names_text(_: DictConfig) -> str:
    from frep_lightning.models import model_names

    return (
        f"is not valid; allowed values: {', '.join(model_names())}, or torchvision.<name> for a torchvision "
        "classifier (torchvision.models.list_models(module=torchvision.models))"
    )


def _prune_epoch(v: Any, cfg: DictConfig) -> bool:
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    return _is_int(v) and v >= 0 and (not _is_int(max_epochs) or v < max_epochs)


def _existing_file(v: Any, _: DictConfig) -> bool:
    return isinstance(v, str) and Path(v).expanduser().is_file()


@dataclass(frozen=True)
class Rule:
    """``key``'s value must pass ``check(value, cfg)``; otherwise the error reads
    ``<key>=<value> <requirement>``. ``group``: only checked while that group is enabled."""

    key: str
    check: Callable[[Any, DictConfig], bool]
    requirement: str | Callable[[DictConfig], str]
    nullable: bool = False
    required: bool = False
    group: str | None = None

    def text(self, cfg: DictConfig) -> str:
        return self.requirement(cfg) if callable(self.requirement) else self.requirement


def _rule(key: str, spec: Any, requirement: str | None = None, **kw: Any) -> Rule:
    if isinstance(spec, tuple):  # from _one_of
        return Rule(key, spec[0], spec[1], **kw)
    assert requirement is not None
    return Rule(key, spec, requirement, **kw)


_POS_INT = "must be an integer > 0"
_NONNEG_INT = "must be an integer >= 0"
_EPS = "must be a number in (0, 1] or a fraction like 8/255"

RULES: list[Rule] = [
    _rule("seed", _int_at_least(0), _NONNEG_INT, required=True),
    _rule("ckpt_path", _existing_file, "must be an existing checkpoint file (e.g. <run>/checkpoints/last.ckpt) or null",
          nullable=True),
    _rule("checkpoint.background", _is_bool, "must be true or false"),
    _rule("checkpoint.every_n_train_steps", _int_at_least(1), _POS_INT + " or null (null: at every epoch end)",
          nullable=True),
    _rule("val_attack_steps", _int_at_least(0), _NONNEG_INT),
    _rule("val_attack_precision", _one_of(ATTACK_PRECISIONS)),
    # data
    _rule("data.name", _one_of(list(DATASETS)), required=True),
    _rule("data.format", _one_of(DATA_FORMATS)),
    _rule("data.download", _is_bool, "must be true or false"),
    _rule("data.augment", _is_bool, "must be true or false"),
    _rule("data.batch_size", _int_at_least(1), _POS_INT, required=True),
    _rule("data.eval_batch_size", _int_at_least(1), _POS_INT),
    _rule("data.n_train", _int_at_least(1), _POS_INT + " or null (null: all)", nullable=True),
    _rule("data.n_val", _int_at_least(1), _POS_INT + " or null (null: all)", nullable=True),
    _rule("data.n_test", _int_at_least(1), _POS_INT + " or null (null: all)", nullable=True),
    _rule("data.num_workers", _int_at_least(0), _NONNEG_INT),
    _rule("data.seed", _int_at_least(0), _NONNEG_INT),
    _rule("data.root", _path, "must be a non-empty path or null (null: $FREP_DATA_DIR or ../shared/data)",
          nullable=True),
    _rule("data.cache_dir", _path,
          "must be a non-empty path or null (null: $FREP_CACHE_DIR or ~/.cache/frep_lightning)", nullable=True),
    _rule("data.on_device", _is_bool, "must be true, false or null (null: on with a CUDA trainer)", nullable=True),
    # model
    _rule("model.name", _model_name, _model_names_text, required=True),
    _rule("model.width", _int_at_least(1), _POS_INT + " or null (null: the published width)", nullable=True),
    _rule("model.mean", _rgb_stats(False), "must be 3 numbers in [0, 1], one per RGB channel of [0, 1] images "
          "(default: data.name's training-set mean)"),
    _rule("model.std", _rgb_stats(True), "must be 3 numbers in (0, 1], one per RGB channel of [0, 1] images "
          "(default: data.name's training-set std)"),
    # method
    _rule("method.name", _one_of(method_names), required=True),
    _rule("method.reparam_kind", _one_of(REPARAM_KINDS)),
    _rule("reparam.init", _one_of(REPARAM_INITS)),
    _rule("method.reparam_init", _one_of(REPARAM_INITS)),
    _rule("method.attack.eps", _eps, _EPS),
    _rule("method.attack.step_size", _eps, _EPS, nullable=True),
    _rule("method.attack.steps", _int_at_least(1), _POS_INT),
    _rule("method.attack.bn", _one_of(ATTACK_BN)),
    _rule("method.objective.lam", _between(0, float("inf"), False, True), "must be a number >= 0"),
    _rule("method.objective.beta", _between(0, float("inf"), False, True), "must be a number >= 0"),
    # optimizer
    _rule("optim.lr", _between(0, float("inf"), True, True), "must be a number > 0"),
    _rule("optim.momentum", _between(0, 1, False, True), "must be in [0, 1)"),
    _rule("optim.weight_decay", _between(0, float("inf"), False, True), "must be a number >= 0"),
    _rule("optim.nesterov", _nesterov, "must be true or false (true needs optim.momentum > 0)"),
    _rule("optim.milestones", _milestones, "must be a strictly increasing list of positive epochs"),
    _rule("optim.gamma", _between(0, 1, True, False), "must be in (0, 1]"),
    # trainer
    _rule("trainer.max_epochs", _int_at_least(1), _POS_INT, required=True),
    # fast path: values checked whether fast.enabled is on or not, so that a typo made while it is off does
    # not fail only once it is switched on; combinations: _fast_errors
    _rule("fast.enabled", _is_bool, "must be true or false"),
    _rule("fast.capture", _one_of(_fast_captures)),
    _rule("fast.precision", _one_of(ATTACK_PRECISIONS)),
    _rule("fast.channels_last", _is_bool, "must be true or false"),
    _rule("fast.sgd", _one_of(_fast_sgds)),
    _rule("fast.cache_weights", _is_bool, "must be true or false"),
    _rule("fast.compile_model", _is_bool, "must be true or false"),
    _rule("fast.streams", _fast_streams, "must be 1 or 2"),
    _rule("fast.warmup_steps", _int_at_least(1), _POS_INT),
    _rule("fast.cudnn_benchmark", _is_bool, "must be true or false"),
    # pruning
    _rule("pruning.sparsity", _between(0, 1, False, True), "must be in [0, 1)", required=True, group="pruning"),
    _rule("pruning.epoch", _prune_epoch,
          lambda cfg: f"must be an integer in [0, trainer.max_epochs={OmegaConf.select(cfg, 'trainer.max_epochs')})",
          required=True, group="pruning"),
    _rule("pruning.mode", _one_of(_pruning_modes), group="pruning"),
    _rule("pruning.include", _str_list, "must be a list of fnmatch patterns", group="pruning"),
    _rule("pruning.exclude", _str_list, "must be a list of fnmatch patterns", group="pruning"),
    _rule("pruning.remove_channels", _is_bool, "must be true or false", group="pruning"),
    # ensemble
    _rule("ensemble.every_n_steps", _int_at_least(1), _POS_INT, required=True, group="ensemble"),
    _rule("ensemble.tau0", _between(0, 1, True, True), "must be in (0, 1)", group="ensemble"),
    _rule("ensemble.c", _between(0, float("inf"), True, True), "must be a number > 0", group="ensemble"),
    _rule("ensemble.interval_factor", _int_at_least(1), "must be an integer >= 1", group="ensemble"),
    _rule("ensemble.lr_drop_ratio", _between(0, 1, True, True), "must be in (0, 1)", group="ensemble"),
    _rule("ensemble.bn", _one_of(_ensemble_bn), group="ensemble"),
    _rule("ensemble.bn_batches", _int_at_least(1), _POS_INT, group="ensemble"),
    _rule("ensemble.average", _one_of(_ensemble_average), group="ensemble"),
    _rule("ensemble.validate_live", _is_bool, "must be true or false", group="ensemble"),
    # final evaluation and the overfitting monitor
    _rule("eval.eps", _eps, _EPS),
    _rule("eval.step_size", _eps, _EPS),
    _rule("eval.pgd_steps", _int_at_least(1), _POS_INT),
    _rule("eval.n_test", _int_at_least(1), _POS_INT + " or null (null: the whole test split)", nullable=True),
    _rule("eval.batch_size", _int_at_least(1), _POS_INT),
    _rule("eval.restarts", _int_at_least(1), _POS_INT),
    _rule("eval.queries", _int_at_least(1), _POS_INT),
    _rule("monitor.n_images", _int_at_least(1), _POS_INT, group="monitor"),
    _rule("monitor.steps", _int_at_least(1), _POS_INT, group="monitor"),
    _rule("monitor.collapse_ratio", _between(0, 1, True, True), "must be in (0, 1)", group="monitor"),
    _rule("monitor.min_best", _between(0, 1, False, False), "must be in [0, 1]", group="monitor"),
    _rule("monitor.precision", _one_of(ATTACK_PRECISIONS), nullable=True, group="monitor"),
]  # fmt: skip

_ABSENT = object()


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key`` (containers as plain lists/dicts), or ``_ABSENT``."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=True)
    except Exception as err:  # interpolation that does not resolve
        raise ConfigError(f"{key} cannot be resolved: {err}") from err
    if isinstance(value, Container):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _group_on(cfg: DictConfig, group: str) -> bool:
    node = OmegaConf.select(cfg, group)
    if group == "monitor":
        return node is not None
    return enabled(node)


def _raw(cfg: DictConfig, key: str) -> str | None:
    """``key``'s unresolved interpolation text (``${...}``), or None when it is not an interpolation."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent or not OmegaConf.is_interpolation(parent, leaf):
        return None
    return str(OmegaConf.to_container(parent, resolve=False)[leaf])  # type: ignore[index]


def _copied_from(cfg: DictConfig, key: str) -> str | None:
    """The key that ``key``'s value is a plain copy of (``key: ${other}``), else None."""
    match = re.fullmatch(r"\$\{([\w.]+)\}", _raw(cfg, key) or "")
    return match.group(1) if match else None


def _reads(cfg: DictConfig, key: str) -> set[str]:
    """The keys that ``key``'s interpolation reads (each ``${a.b}`` in it, nested ones included)."""
    return set(re.findall(r"\$\{([\w.]+)\}", _raw(cfg, key) or ""))


def check_rules(cfg: DictConfig, rules: Sequence[Rule] = RULES) -> list[str]:
    """One message per violated rule; a key that only copies a rejected key (``${...}``), wherever
    its rule stands in the table, is not reported again."""
    errors: list[tuple[str, str]] = []
    unresolved: list[tuple[str, str]] = []
    for rule in rules:
        if rule.group is not None and not _group_on(cfg, rule.group):
            continue
        try:
            value = _value(cfg, rule.key)
        except ConfigError as err:
            unresolved.append((rule.key, str(err)))
            continue
        if value is _ABSENT:
            if rule.required:
                text = rule.text(cfg)
                text = text.removeprefix("is not valid; ") if text.startswith("is not valid; ") else f"it {text}"
                errors.append((rule.key, f"{rule.key} is missing; {text}"))
            continue
        if value is None and rule.nullable:
            continue
        if not rule.check(value, cfg):
            errors.append((rule.key, f"{rule.key}={value!r} {rule.text(cfg)}"))
    # after the loop: the copy's rule may come before its source's (data.n_test: ${eval.n_test})
    rejected = {key for key, _ in errors}
    messages = [message for key, message in errors if _copied_from(cfg, key) not in rejected]
    # a default computed from a rejected key (model.mean: ${frep_normalization:${data.name},mean}) is that
    # key's problem, reported once
    return messages + [message for key, message in unresolved if not _reads(cfg, key) & rejected]


def _target_parameters(target: str) -> tuple[list[str], bool]:
    """Parameter names of the callable ``target`` and whether it takes ``**kwargs``."""
    from hydra.utils import get_object

    obj = get_object(target)
    sig = inspect.signature(obj)
    names = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def check_target_keys(cfg: DictConfig, nodes: Sequence[str] = TARGET_NODES) -> list[str]:
    """Every ``_target_`` must import, and every key of its node must be one of its parameters."""
    errors = []
    for path in nodes:
        node = OmegaConf.select(cfg, path)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        target = node._target_
        try:
            params, var_kw = _target_parameters(target)
        except Exception as err:
            errors.append(f"{path}._target_={target!r} cannot be imported ({type(err).__name__}: {err})")
            continue
        if var_kw:
            continue
        unknown = sorted(set(node.keys()) - _HYDRA_KEYS - set(params))
        errors.extend(
            f"{path}.{key} is not a parameter of {target}; allowed keys: {', '.join(p for p in params if p != 'self')}"
            for key in unknown
        )
    return errors


@functools.cache
def _primary_config(config_name: str) -> DictConfig:
    """``conf/<config_name>.yaml`` as written (read once: CheckSweep validates every job of a sweep)."""
    config = OmegaConf.load(Path(config_dir()) / f"{config_name}.yaml")
    OmegaConf.set_readonly(config, True)
    return config


def closed_key_errors(cfg: DictConfig, config_name: str, nodes: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Keys that ``config_name``.yaml does not define, top level and inside its plain ``nodes`` (those
    without ``_target_``, read by our code: a ``+`` typo there would be ignored or end in a bare TypeError
    after setup). Group nodes (``data``, ``method``...) are checked by their own rules and targets."""
    base = _primary_config(config_name)
    groups = [next(iter(d)) for d in base.get("defaults", []) if isinstance(d, DictConfig) and len(d) == 1]
    allowed = (set(base.keys()) | {str(g) for g in groups} | set(extra)) - {"defaults", "hydra"}
    errors = [
        f"{key} is not a config key of {config_name}; allowed top-level keys: {', '.join(sorted(allowed))}"
        for key in sorted(set(cfg.keys()) - allowed - _HYDRA_KEYS - {"hydra"})
    ]
    for path in nodes:
        node, defined = OmegaConf.select(cfg, path), OmegaConf.select(base, path)
        if isinstance(node, DictConfig) and isinstance(defined, DictConfig):
            errors.extend(
                f"{path}.{key} is not a key of {path}; allowed keys: {', '.join(sorted(defined.keys()))}"
                for key in sorted(set(node.keys()) - set(defined.keys()))
            )
    return errors


def check_data_available(cfg: DictConfig) -> None:
    """Our datamodule's files must exist under data.root (or data.download=true): checked from
    file names only, so a wrong path fails before anything is decoded."""
    from hydra.utils import instantiate

    from frep_lightning.data.datamodule import ImageClassificationData

    node = cfg.get("data")
    if not enabled(node) or node._target_ not in (
        "frep_lightning.data.ImageClassificationData",
        "frep_lightning.data.datamodule.ImageClassificationData",
    ):
        return
    datamodule = instantiate(node)
    assert isinstance(datamodule, ImageClassificationData)
    try:
        datamodule.check_available()
    except FileNotFoundError as err:
        raise DataNotFoundError(str(err)) from err


def check_eval_attacks(cfg: DictConfig) -> list[str]:
    """``eval.attacks`` (and the settings they read) must build: the final evaluation runs after
    training, so a typo there must fail now, not after hours of training."""
    from frep_lightning.evaluate import config_attacks

    node = OmegaConf.select(cfg, "eval")
    if node is None:
        return []
    try:
        config_attacks(node, cfg.get("seed", 0))
    except ValueError as err:
        return [str(err)]
    return []


def _width_errors(cfg: DictConfig) -> list[str]:
    """``model.width`` sizes the built-in CIFAR models only (a torchvision model has its own widths)."""
    from frep_lightning.models import TORCHVISION_PREFIX

    name, width = OmegaConf.select(cfg, "model.name"), OmegaConf.select(cfg, "model.width")
    if isinstance(name, str) and name.startswith(TORCHVISION_PREFIX) and width is not None:
        return [f"model.width={width!r} applies to the built-in CIFAR models only; use model.width=null with {name}"]
    return []


def _fast_errors(cfg: DictConfig) -> list[str]:
    """With ``fast.enabled=true``: the option combinations FastFReP refuses, and the trainer settings it cannot
    run with, which would otherwise fail after data setup (a bare ValueError from the module, or Lightning's
    manual-optimization checks at fit start); a sweep's check would let them through."""
    fast = OmegaConf.select(cfg, "fast")
    if not isinstance(fast, DictConfig) or fast.get("enabled") is not True:
        return []
    from frep_lightning.fast import _check_compile_model, _check_streams

    capture = fast.get("capture") or "cuda_graph"
    errors: list[str] = []
    for check in (
        lambda: _check_compile_model(fast.get("compile_model") is True, capture, fast.get("cache_weights") is True),
        lambda: _check_streams(fast.get("streams") or 1, capture),
    ):
        try:
            check()
        except ValueError as err:
            errors.append(str(err))
    if fast.get("streams") == 2 and OmegaConf.select(cfg, "method.attack.bn", default="train") != "train":
        errors.append(
            "fast.streams=2 needs method.attack.bn=train: with bn=eval the attack's forward reads the BatchNorm "
            "running statistics that the concurrent clean forward updates"
        )
    precision = OmegaConf.select(cfg, "trainer.precision", default=None)
    if precision is not None and str(precision) not in ("32-true", "32"):
        errors.append(
            f"trainer.precision={precision!r} with fast.enabled=true: the fast path needs trainer.precision=32-true; "
            "use fast.precision=bf16 for mixed precision inside its step"
        )
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=None)
    if accumulate not in (None, 1):
        errors.append(
            f"trainer.accumulate_grad_batches={accumulate!r} with fast.enabled=true: the fast path (manual "
            "optimization) steps at every batch; use fast.enabled=false to accumulate gradients"
        )
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None)
    if clip not in (None, 0):
        errors.append(
            f"trainer.gradient_clip_val={clip!r} with fast.enabled=true: the fast path's SGD update does not clip "
            "gradients; use fast.enabled=false to clip them"
        )
    return errors


def _resume_errors(cfg: DictConfig) -> list[str]:
    """Lightning (2.6) resumes step-limited training inexactly: an epoch-end checkpoint replays that epoch's
    end and counts the epoch twice (measured: max_epochs=2, max_steps=5, resumed after epoch 0: stopped at
    step 3)."""
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if not cfg.get("ckpt_path") or max_steps in (None, -1):
        return []
    return [
        f"trainer.max_steps={max_steps} with ckpt_path: Lightning resumes step-limited training inexactly (the "
        "epoch of an epoch-end checkpoint is counted twice: the run can stop early or train a batch too many); "
        "limit the run with trainer.max_epochs to resume it"
    ]


def schedule_warnings(cfg: DictConfig) -> list[str]:
    """Valid but probably unintended schedules: a shortened recipe that keeps LR drops it never reaches
    (the ensemble interval then never grows either)."""
    milestones, epochs = OmegaConf.select(cfg, "optim.milestones"), OmegaConf.select(cfg, "trainer.max_epochs")
    if not _is_int(epochs) or not isinstance(milestones, Sequence) or isinstance(milestones, str):
        return []
    late = [m for m in milestones if _is_int(m) and m >= epochs]
    if not late:
        return []
    paper = list(milestones) == [70, 85]  # the paper's recipe cut short: its proportions carry over
    fix = (
        f"scale them with the epochs, e.g. optim.milestones=[{round(0.7 * epochs)},{round(0.85 * epochs)}]"
        if paper
        else f"move them below {epochs}"
    )
    return [
        f"optim.milestones={list(milestones)}: the LR drop(s) at epoch {late} come at or after "
        f"trainer.max_epochs={epochs}, so they never happen (the temporal ensemble's interval never grows "
        f"either); {fix}"
    ]


def validate_train_config(cfg: DictConfig, check_data: bool = False) -> None:
    """Raise :class:`ConfigError` listing every invalid key before anything is loaded; with
    ``check_data`` (what ``frep-train`` does) also :class:`DataNotFoundError`, a
    ``FileNotFoundError`` too, when data.root holds no dataset and data.download is off."""
    errors = check_rules(cfg) + check_target_keys(cfg)
    errors += closed_key_errors(
        cfg, "train", ("checkpoint", "optim", "fast", "monitor", "eval", "reparam"), extra=("run_dir",)
    )
    if not any(e.startswith("eval.") for e in errors):  # a bad eval.eps is one problem, not two
        errors += check_eval_attacks(cfg)
    if not any(e.startswith("model.") for e in errors):  # a bad model.name is one problem, not two
        errors += _width_errors(cfg)
    if not any(e.startswith("fast.") for e in errors):  # a bad fast.streams is one problem, not two
        errors += _fast_errors(cfg)
    errors += _resume_errors(cfg)
    if errors:
        lines = "\n  ".join(errors)
        raise ConfigError(f"invalid config ({len(errors)} problem{'s' if len(errors) > 1 else ''}):\n  {lines}")
    if check_data:
        check_data_available(cfg)
