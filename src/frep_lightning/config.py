"""Checks of a composed training config that must fail before any data is loaded.

Each constructor validates its own arguments too; this module adds the checks that span keys
(the prune epoch against ``trainer.max_epochs``) and the name look-ups, so a typo in a sweep
fails in a second with a message naming the key, not after an epoch.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from frep_lightning.attacks import parse_eps

DATASETS = {"cifar10": 10, "cifar100": 100, "svhn": 10}


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def enabled(node: Any) -> bool:
    """A callback/logger group is on when it names something to instantiate (``pruning=none``
    sets it to null; an experiment's leftover keys without ``_target_`` do not turn it on)."""
    return node is not None and "_target_" in node


def num_classes(name: str) -> int:
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not valid; allowed values: {', '.join(DATASETS)}")
    return DATASETS[name]


def validate_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid key."""
    from frep_lightning.models import model_names

    num_classes(_get(cfg, "data.name"))
    name = _get(cfg, "model.name")
    if name not in model_names() and not str(name).startswith("torchvision."):
        raise ConfigError(
            f"model.name={name!r} is not valid; allowed values: {', '.join(model_names())}, or torchvision.<name>"
        )
    max_epochs = _get(cfg, "trainer.max_epochs")
    if not isinstance(max_epochs, int) or max_epochs <= 0:
        raise ConfigError(f"trainer.max_epochs={max_epochs!r} must be an integer > 0")
    if enabled(_get(cfg, "pruning")):
        sparsity = _get(cfg, "pruning.sparsity")
        if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"pruning.sparsity={sparsity!r} must be in [0, 1)")
        epoch = _get(cfg, "pruning.epoch")
        if not isinstance(epoch, int) or not 0 <= epoch < max_epochs:
            raise ConfigError(f"pruning.epoch={epoch!r} must be an integer in [0, trainer.max_epochs={max_epochs})")
        mode = _get(cfg, "pruning.mode", "unstructured")
        if mode not in ("unstructured", "structured"):
            raise ConfigError(f"pruning.mode={mode!r} is not valid; allowed values: unstructured, structured")
    if enabled(_get(cfg, "ensemble")):
        every = _get(cfg, "ensemble.every_n_steps")
        if not isinstance(every, int) or every <= 0:
            raise ConfigError(f"ensemble.every_n_steps={every!r} must be an integer > 0")
        tau0 = _get(cfg, "ensemble.tau0")
        if not isinstance(tau0, (int, float)) or not 0.0 < tau0 < 1.0:
            raise ConfigError(f"ensemble.tau0={tau0!r} must be in (0, 1)")
        c = _get(cfg, "ensemble.c")
        if not isinstance(c, (int, float)) or c <= 0:
            raise ConfigError(f"ensemble.c={c!r} must be > 0")
    for key in ("method.attack.eps", "eval.eps"):
        value = _get(cfg, key)
        if value is not None:
            try:
                parse_eps(value, key)
            except ValueError as err:
                raise ConfigError(str(err)) from err
    kind = _get(cfg, "method.reparam_kind", "hadamard")
    if kind not in ("hadamard", "channel", "none"):
        raise ConfigError(f"method.reparam_kind={kind!r} is not valid; allowed values: hadamard, channel, none")
    init = _get(cfg, "method.reparam_init", "random")
    if init not in ("random", "equal", "ones"):
        raise ConfigError(f"method.reparam_init={init!r} is not valid; allowed values: random, equal, ones")
    for key in ("data.batch_size", "eval.n_test"):
        value = _get(cfg, key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{key}={value!r} must be an integer > 0")
