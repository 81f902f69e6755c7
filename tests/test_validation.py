"""The config schema (frep_lightning.config): one test per rule, each checking that the message
names the key, the bad value and the allowed values, and that nothing is loaded before it fails."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from frep_lightning import config as config_module
from frep_lightning.config import (
    RULES,
    ConfigError,
    DataNotFoundError,
    check_rules,
    config_dir,
    method_names,
    schedule_warnings,
    validate_train_config,
)
from frep_lightning.data.pack import KNOWN_SHA256


@pytest.fixture(scope="module")
def base() -> DictConfig:
    """The default experiment (trainer.max_epochs=6), composed once."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=["model.width=4"])


def with_value(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def test_default_config_is_valid(base: DictConfig) -> None:
    validate_train_config(base)
    assert check_rules(base) == []


def test_every_rule_key_exists_in_the_default_config(base: DictConfig) -> None:
    """The table does not drift from conf/: each rule's key is present (objective-specific ones aside)."""
    optional = {"method.objective.beta", "checkpoint.every_n_train_steps"}
    missing = [
        r.key
        for r in RULES
        if r.key not in optional and OmegaConf.select(base, r.key, default="<absent>") == "<absent>"
    ]
    assert missing == []


BAD = [
    # (key, value, fragment of the message after "<key>=<value!r> ")
    ("pruning.sparsity", 1.0, "must be in [0, 1)"),
    ("pruning.sparsity", -0.1, "must be in [0, 1)"),
    ("pruning.sparsity", "0.5", "must be in [0, 1)"),
    ("pruning.epoch", 6, "must be an integer in [0, trainer.max_epochs=6)"),
    ("pruning.epoch", -1, "must be an integer in [0, trainer.max_epochs=6)"),
    ("pruning.mode", "random", "allowed values: unstructured, structured"),
    ("ensemble.every_n_steps", 0, "must be an integer > 0"),
    ("ensemble.every_n_steps", 2.5, "must be an integer > 0"),
    ("ensemble.tau0", 0.0, "must be in (0, 1)"),
    ("ensemble.tau0", 1.0, "must be in (0, 1)"),
    ("ensemble.c", 0, "must be a number > 0"),
    ("ensemble.bn", "ema", "allowed values: recompute, copy, average"),
    ("ensemble.average", "mean", "allowed values: factors, product"),
    ("method.attack.eps", 0, "must be a number in (0, 1] or a fraction like 8/255"),
    ("method.attack.eps", "8/0", "must be a number in (0, 1] or a fraction like 8/255"),
    ("method.attack.eps", 8, "must be a number in (0, 1] or a fraction like 8/255"),
    ("eval.eps", -0.1, "must be a number in (0, 1] or a fraction like 8/255"),
    ("eval.restarts", 0, "must be an integer > 0"),
    ("eval.queries", 0, "must be an integer > 0"),
    ("method.attack.steps", 0, "must be an integer > 0"),
    ("method.reparam_kind", "lowrank", "allowed values: hadamard, channel, none"),
    ("method.reparam_init", "zeros", "allowed values: random, equal, ones"),
    ("reparam.init", "zeros", "allowed values: random, equal, ones"),
    ("model.name", "resnet1000", "allowed values: resnet18, resnet34"),
    ("model.name", "torchvision.no_such_net", "torchvision.<name>"),
    ("data.name", "imagenet", "allowed values: cifar10, cifar100, svhn"),
    ("data.format", "zip", "allowed values: auto, pack, torchvision"),
    ("data.batch_size", 0, "must be an integer > 0"),
    ("data.n_train", -5, "must be an integer > 0 or null"),
    ("data.download", "yes", "must be true or false"),
    ("trainer.max_epochs", 2.5, "must be an integer > 0"),
    ("optim.lr", 0.0, "must be a number > 0"),
    ("optim.momentum", 1.0, "must be in [0, 1)"),
    ("optim.milestones", [5, 3], "strictly increasing"),
    ("optim.milestones", [4, 4], "strictly increasing"),  # MultiStepLR would drop the LR twice at epoch 4
    ("optim.gamma", 0.0, "must be in (0, 1]"),
    ("seed", -1, "must be an integer >= 0"),
    ("val_attack_steps", -1, "must be an integer >= 0"),
    ("val_attack_precision", "fp16", "allowed values: fp32, bf16"),
    ("monitor.precision", "half", "allowed values: fp32, bf16"),
    ("checkpoint.every_n_train_steps", 0, "must be an integer > 0 or null"),
    ("checkpoint.background", "yes", "must be true or false"),
    ("ckpt_path", "/no/such/last.ckpt", "must be an existing checkpoint file"),
    ("monitor.collapse_ratio", 1.5, "must be in (0, 1)"),
    ("pruning.remove_channels", "yes", "must be true or false"),
    # the bounds of the keys above that had no case (an off-by-one there passes a sweep's check)
    ("data.eval_batch_size", 0, "must be an integer > 0"),
    ("data.n_val", 0, "must be an integer > 0 or null"),
    ("data.num_workers", -1, "must be an integer >= 0"),
    ("data.augment", 1, "must be true or false"),
    ("data.seed", -1, "must be an integer >= 0"),
    ("data.root", "", "must be a non-empty path or null"),
    ("data.cache_dir", "", "must be a non-empty path or null"),
    ("data.on_device", "maybe", "must be true, false or null"),
    ("model.width", 0, "must be an integer > 0 or null"),
    ("model.mean", [125.3, 123.0, 113.9], "must be 3 numbers in [0, 1], one per RGB channel"),  # 0-255 units
    ("model.mean", [0.5, 0.5], "must be 3 numbers in [0, 1], one per RGB channel"),
    ("model.mean", 0.5, "must be 3 numbers in [0, 1], one per RGB channel"),
    ("model.std", [0.2, 0.0, 0.2], "must be 3 numbers in (0, 1], one per RGB channel"),
    ("model.std", "0.2,0.2,0.2", "must be 3 numbers in (0, 1], one per RGB channel"),
    ("method.objective.lam", -0.5, "must be a number >= 0"),
    ("optim.weight_decay", -1e-4, "must be a number >= 0"),
    ("optim.nesterov", "no", "must be true or false"),
    ("ensemble.interval_factor", 0, "must be an integer >= 1"),
    ("ensemble.lr_drop_ratio", 0.0, "must be in (0, 1)"),
    ("ensemble.lr_drop_ratio", 1.0, "must be in (0, 1)"),
    ("ensemble.bn_batches", 0, "must be an integer > 0"),
    ("eval.n_test", 0, "must be an integer > 0 or null"),  # data.n_test copies it: reported once
    ("eval.pgd_steps", 0, "must be an integer > 0"),
    ("eval.batch_size", 0, "must be an integer > 0"),
    ("monitor.n_images", 0, "must be an integer > 0"),
    ("monitor.steps", 0, "must be an integer > 0"),
    ("monitor.min_best", 1.5, "must be in [0, 1]"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_rule_rejects_bad_value(base: DictConfig, key: str, value: Any, fragment: str) -> None:
    cfg = with_value(base, key, value)
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert f"{key}={value!r} " in message
    assert fragment in message
    assert "invalid config (1 problem)" in message  # only the key that is wrong


def test_nesterov_without_momentum_is_a_config_error(base: DictConfig) -> None:
    """torch's SGD refuses it only when the optimizer is built, after the data is set up."""
    cfg = with_value(with_value(base, "optim.momentum", 0.0), "optim.nesterov", True)
    with pytest.raises(ConfigError, match=r"optim\.nesterov=True must be true or false \(true needs optim\.momentum"):
        validate_train_config(cfg)
    validate_train_config(with_value(base, "optim.nesterov", True))  # with the default momentum 0.9


# the keys whose null means something (conf/ documents each: "null: all", "null: auto"...)
NULLABLE = {
    "ckpt_path", "checkpoint.every_n_train_steps", "data.n_train", "data.n_val", "data.n_test", "data.root",
    "data.cache_dir", "data.on_device", "model.width", "method.attack.step_size", "eval.n_test", "monitor.precision",
}  # fmt: skip


def test_null_is_accepted_exactly_where_it_means_something(base: DictConfig) -> None:
    """``key=null`` passes the keys of :data:`NULLABLE` (``data.n_val=null``: validate on the whole test split);
    on any other key it is named now, not met later as a TypeError inside a constructor or a training step."""
    for rule in RULES:
        if OmegaConf.select(base, rule.key, default="<absent>") == "<absent>":
            continue
        named = [e for e in check_rules(with_value(base, rule.key, None)) if e.startswith(f"{rule.key}=None ")]
        assert bool(named) == (rule.key not in NULLABLE), (rule.key, named)


GOOD = [
    # values on the closed end of a range (an off-by-one there fails a valid run)
    ("seed", 0),
    ("data.num_workers", 0),
    ("val_attack_steps", 0),
    ("pruning.sparsity", 0.0),
    ("pruning.epoch", 0),
    ("pruning.epoch", 5),  # trainer.max_epochs=6
    ("optim.momentum", 0.0),
    ("optim.weight_decay", 0.0),
    ("optim.gamma", 1.0),
    ("method.objective.lam", 0.0),
    ("method.attack.eps", 1.0),
    ("method.attack.eps", "16/255"),
    ("monitor.min_best", 0.0),
    ("monitor.min_best", 1.0),
    ("ensemble.interval_factor", 1),
    ("model.mean", [0.0, 0.5, 1.0]),
    ("model.std", [1.0, 1.0, 1.0]),
]


@pytest.mark.parametrize(("key", "value"), GOOD, ids=[f"{k}={v}" for k, v in GOOD])
def test_rule_accepts_the_ends_of_its_range(base: DictConfig, key: str, value: Any) -> None:
    assert check_rules(with_value(base, key, value)) == []


def test_bad_eval_attack_is_reported_with_the_other_problems(base: DictConfig) -> None:
    """The final evaluation runs after training: its attack list is checked with everything else."""
    cfg = with_value(with_value(base, "eval.attacks", ["pgd50", "bogus"]), "pruning.sparsity", 1.5)
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert "invalid config (2 problems)" in message
    assert "eval.attacks: unknown attack name(s) 'bogus'" in message


def test_method_names_come_from_conf(base: DictConfig) -> None:
    names = method_names()
    assert {"frep", "frep_ch", "ori"} <= set(names)
    with pytest.raises(ConfigError, match=r"method\.name='frepp' is not valid; allowed values: .*frep_ch"):
        validate_train_config(with_value(base, "method.name", "frepp"))


def test_all_problems_are_reported_together(base: DictConfig) -> None:
    cfg = with_value(with_value(base, "pruning.sparsity", 1.5), "ensemble.tau0", 2.0)
    cfg = with_value(cfg, "data.name", "mnist")
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert "invalid config (3 problems)" in message
    assert "pruning.sparsity=1.5 must be in [0, 1)" in message
    assert "ensemble.tau0=2.0 must be in (0, 1)" in message
    assert "data.name='mnist' is not valid; allowed values: cifar10, cifar100, svhn" in message


def test_disabled_groups_are_not_checked(base: DictConfig) -> None:
    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        cfg.pruning = None
        cfg.ensemble = None
        cfg.monitor = None
    validate_train_config(with_value(cfg, "trainer.max_epochs", 1))  # pruning.epoch=2 no longer matters


def test_missing_required_key(base: DictConfig) -> None:
    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        del cfg.trainer["max_epochs"]
        del cfg.data["name"]
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    assert "trainer.max_epochs is missing; it must be an integer > 0" in str(info.value)
    assert "data.name is missing; allowed values: cifar10, cifar100, svhn" in str(info.value)


def test_unknown_key_of_a_constructor_is_rejected(base: DictConfig) -> None:
    """A typo added with + would otherwise surface as a TypeError after the data is loaded."""
    with pytest.raises(ConfigError) as info:
        validate_train_config(with_value(base, "pruning.sparsty", 0.9))
    message = str(info.value)
    assert "pruning.sparsty is not a parameter of frep_lightning.pruning.RobustPruning" in message
    assert "allowed keys: sparsity, epoch, mode, include, exclude" in message
    with pytest.raises(ConfigError, match=r"ensemble\.tauu is not a parameter of .*TemporalEnsemble"):
        validate_train_config(with_value(base, "ensemble.tauu", 0.5))
    with pytest.raises(ConfigError, match=r"trainer\.max_epoch is not a parameter of lightning\.pytorch\.Trainer"):
        validate_train_config(with_value(base, "trainer.max_epoch", 5))
    with pytest.raises(ConfigError, match=r"data\.n_tarin is not a parameter of frep_lightning\.data\.ImageClass"):
        validate_train_config(with_value(base, "data.n_tarin", 100))


def test_unknown_key_of_a_plain_node_or_the_top_level_is_rejected() -> None:
    """Keys our own code reads (checkpoint, optim, fast, monitor, eval, top level): a + typo used to be
    ignored (the run trained without the option) or end in a bare TypeError after setup."""
    overrides = ["+checkpoint.every_n_steps=2", "+fast.enable=true", "+eval.n_tst=5", "++foo=1",
                 "+optim.lrr=0.1", "+monitor.foo=1", "+reparam.inti=ones", "+run_dir=/tmp/x"]  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert "(7 problems)" in message and "run_dir" not in message.split("allowed")[0]
    for fragment in (
        "checkpoint.every_n_steps is not a key of checkpoint; allowed keys: background, every_n_train_steps",
        "fast.enable is not a key of fast; allowed keys: cache_weights,",
        "eval.n_tst is not a key of eval",
        "foo is not a config key of train; allowed top-level keys: checkpoint, ckpt_path, data,",
        "optim.lrr is not a key of optim; allowed keys: gamma, lr, milestones",
        "monitor.foo is not a key of monitor",
        "reparam.inti is not a key of reparam; allowed keys: init",
    ):
        assert fragment in message, fragment


def test_target_that_does_not_import(base: DictConfig) -> None:
    with pytest.raises(ConfigError, match=r"ensemble\._target_='frep_lightning\.nowhere\.Ensemble' cannot be imported"):
        validate_train_config(with_value(base, "ensemble._target_", "frep_lightning.nowhere.Ensemble"))


def test_missing_data_names_root_download_and_sha256(base: DictConfig, tmp_path: Path) -> None:
    cfg = with_value(base, "data.root", str(tmp_path / "nothing"))
    validate_train_config(cfg)  # the schema alone does not look at files
    with pytest.raises(DataNotFoundError) as info:
        validate_train_config(cfg, check_data=True)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ConfigError)
    message = str(info.value)
    assert f"data.root={str(tmp_path / 'nothing')!r}" in message and "data.download=true" in message
    assert str(tmp_path / "nothing" / "cifar10" / "train.npz") in message
    assert f"train.npz sha256 {KNOWN_SHA256[('cifar10', 'train')]}" in message
    # allowed when the data may be downloaded
    validate_train_config(with_value(cfg, "data.download", True), check_data=True)


def test_invalid_key_fails_before_any_data_is_read(
    base: DictConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frep_lightning.data import datamodule
    from frep_lightning.train import run

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("data was loaded before the config was validated")

    monkeypatch.setattr(datamodule, "load_pack", no_loading)
    monkeypatch.setattr(datamodule.ImageClassificationData, "check_available", no_loading)
    cfg = with_value(with_value(base, "ensemble.every_n_steps", 0), "run_dir", str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"ensemble\.every_n_steps=0 must be an integer > 0"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_rules_table_is_one_per_key() -> None:
    keys = [r.key for r in config_module.RULES]
    assert len(keys) == len(set(keys))


def test_missing_or_corrupt_pack_file_names_file_and_sha256(tmp_path: Path) -> None:
    from frep_lightning.data.pack import load_pack

    path = tmp_path / "cifar10" / "train.npz"
    sha = KNOWN_SHA256[("cifar10", "train")]
    with pytest.raises(FileNotFoundError) as info:
        load_pack(path, tmp_path / "cache")
    assert str(path) in str(info.value) and f"expected sha256 {sha}" in str(info.value)
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(ValueError) as corrupt:
        load_pack(path, tmp_path / "cache")
    assert str(path) in str(corrupt.value) and f"expected sha256 {sha}" in str(corrupt.value)


def test_model_width_with_a_torchvision_model_is_a_config_error(base: DictConfig) -> None:
    """``experiment=smoke model=torchvision`` keeps smoke's width: named before anything is built."""
    cfg = with_value(with_value(base, "model.name", "torchvision.resnet18"), "model.width", 8)
    with pytest.raises(
        ConfigError, match=r"model.width=8 applies to the built-in CIFAR models only; use model.width=null"
    ):
        validate_train_config(cfg)
    validate_train_config(with_value(cfg, "model.width", None))


def test_lr_drops_after_the_last_epoch_are_warned(base: DictConfig) -> None:
    """A shortened paper recipe (trainer.max_epochs=30 with milestones [70, 85]) never drops the LR."""
    assert schedule_warnings(base) == []  # the default experiment: milestones [4, 5] of 6 epochs
    short = with_value(with_value(base, "optim.milestones", [70, 85]), "trainer.max_epochs", 30)
    (warning,) = schedule_warnings(short)
    assert "optim.milestones=[70, 85]" in warning and "trainer.max_epochs=30" in warning and "[21,26]" in warning
    (warning,) = schedule_warnings(with_value(short, "trainer.max_epochs", 80))  # [85] still late
    assert "[85]" in warning and "[56,68]" in warning
    (warning,) = schedule_warnings(with_value(with_value(base, "optim.milestones", [5, 9]), "trainer.max_epochs", 8))
    assert warning.endswith("move them below 8")  # not the paper's recipe: no proportions to scale


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn"])
def test_model_normalisation_defaults_to_the_datasets_statistics(dataset: str) -> None:
    """model.mean/std follow data.name (SVHN's std is ~0.2, CIFAR-10's ~0.25), and the built model's first
    layer holds them; CIFAR-10's are the constants ``build_model`` defaults to."""
    from hydra.utils import instantiate

    from frep_lightning.data import NORMALIZATION
    from frep_lightning.models import CIFAR_MEAN, CIFAR_STD

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={dataset}", "model.width=4"])
    validate_train_config(cfg)
    mean, std = NORMALIZATION[dataset]
    assert list(cfg.model.mean) == list(mean) and list(cfg.model.std) == list(std)
    model = instantiate(cfg.model)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(mean)
    assert model.normalize.std.flatten().tolist() == pytest.approx(std)
    assert NORMALIZATION["cifar10"] == (CIFAR_MEAN, CIFAR_STD)
    assert NORMALIZATION["svhn"][1] != CIFAR_STD and NORMALIZATION["cifar100"][0] != CIFAR_MEAN


def test_normalisation_and_class_counts_cover_the_same_datasets() -> None:
    """config.py keeps its own dataset table (it must not import Lightning): it cannot drift from the data's."""
    from frep_lightning.data import DATASETS, NORMALIZATION

    assert config_module.DATASETS == DATASETS and NORMALIZATION.keys() == DATASETS.keys()


def test_a_default_that_cannot_resolve_is_reported_with_the_others(base: DictConfig) -> None:
    """An interpolation that fails (a resolver's error) is one problem in the list, not an exception that hides
    the rest; one computed from a rejected key is that key's problem only."""
    cfg = with_value(with_value(base, "model.std", "${oc.env:FREP_NO_SUCH_VARIABLE}"), "seed", -1)
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert "invalid config (2 problems)" in message
    assert "model.std cannot be resolved" in message and "seed=-1 must be" in message
    cfg = with_value(with_value(base, "data.name", "imagenet"), "model.mean", [0.5, 0.5])
    errors = check_rules(cfg)  # model.std reads data.name: not reported again; model.mean is its own problem
    assert len(errors) == 2 and errors[0].startswith("data.name='imagenet'") and errors[1].startswith("model.mean=")
