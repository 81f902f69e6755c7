"""The Hydra app: every config group composes and instantiates; bad configs fail before data
loads, naming the key; the smoke experiment runs end to end on the real offline pack."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from frep_lightning.config import ConfigError, validate_train_config
from frep_lightning.models import build_model
from frep_lightning.train import build_callbacks, build_module, config_dir, run
from helpers import tiny_run_overrides

CONF = Path(config_dir())


def cfg_for(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes_validates_and_builds(experiment: str, tmp_path: Path) -> None:
    cfg = cfg_for(f"experiment={experiment}", "model.width=4" if experiment != "smoke" else "model.width=8")
    validate_train_config(cfg)
    module = build_module(cfg)
    callbacks, _ = build_callbacks(cfg, tmp_path)
    assert module.hparams.milestones == list(cfg.optim.milestones)
    assert any(type(cb).__name__ == "RobustPruning" for cb in callbacks)


@pytest.mark.parametrize("source", ["paper experiment", "FReP defaults"])
def test_the_papers_optimizer_and_lr_schedule(source: str) -> None:
    """Sec. IV-A: SGD (momentum 0.9, weight decay 2e-4 on every parameter, W1 and W2 included), lr 0.1 divided
    by 10 at the 70th and 85th of 100 epochs, batch size 128, pruning at epoch 30, eps 8/255. The module's own
    defaults (experiments/bench.py builds it without a config) are the same recipe."""
    from frep_lightning import FReP

    if source == "paper experiment":
        cfg = cfg_for("experiment=paper_resnet18_c10", "model.width=4")
        validate_train_config(cfg)
        assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.pruning.epoch) == (100, 128, 30)
        assert cfg.method.attack.eps == "8/255" and cfg.eval.eps == "8/255"
        module = build_module(cfg)
    else:
        module = FReP(build_model("resnet18", width=4), val_attack_steps=0)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.SGD and config["lr_scheduler"]["interval"] == "epoch"
    (group,) = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 2e-4)
    assert not group["nesterov"] and group["dampening"] == 0
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in group["params"]}
    assert decayed == set(names.values())  # every parameter: both factors, BN, the classifier
    assert any(n.endswith("original0") for n in decayed) and any(n.endswith("original1") for n in decayed)
    lrs = []
    for _ in range(100):  # Lightning steps an epoch-interval scheduler once per epoch end
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing (the scheduler wants a step before its own)
        scheduler.step()
    assert lrs[0] == lrs[69] == 0.1
    assert lrs[70] == pytest.approx(0.01) and lrs[84] == pytest.approx(0.01)
    assert lrs[85] == pytest.approx(0.001) and lrs[99] == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"milestones": [70, 70]}, "optim.milestones"),  # MultiStepLR would drop the LR 100x at epoch 70
        ({"milestones": [85, 70]}, "optim.milestones"),
        ({"milestones": [0, 70]}, "optim.milestones"),
        ({"lr": 0.0}, "optim.lr"),
        ({"momentum": 1.0}, "optim.momentum"),
        ({"weight_decay": -2e-4}, "optim.weight_decay"),
        ({"gamma": 0.0}, "optim.gamma"),
        ({"gamma": 10.0}, "optim.gamma"),  # an LR that grows 10x at each "drop"
        ({"nesterov": True, "momentum": 0.0}, "optim.nesterov"),  # torch: only at configure_optimizers
        ({"nesterov": "yes"}, "optim.nesterov"),
    ],
)
def test_frep_refuses_a_bad_sgd_schedule_naming_the_key(kwargs: dict[str, Any], key: str) -> None:
    """FReP built directly (no Hydra config to validate it) refuses what the config rules refuse."""
    from frep_lightning import FReP

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        FReP(build_model("resnet18", width=4), val_attack_steps=0, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "module_precision", "monitor_precision"),
    [
        ((), "fp32", "fp32"),
        (("val_attack_precision=bf16",), "bf16", "bf16"),  # the monitor follows unless told otherwise
        (("val_attack_precision=bf16", "monitor.precision=fp32"), "bf16", "fp32"),
    ],
)
def test_per_epoch_attack_precision_reaches_module_and_monitor(
    overrides: tuple[str, ...], module_precision: str, monitor_precision: str, tmp_path: Path
) -> None:
    cfg = cfg_for("model.width=4", *overrides)
    validate_train_config(cfg)
    assert build_module(cfg).hparams.val_attack_precision == module_precision
    callbacks, _ = build_callbacks(cfg, tmp_path)
    (monitor,) = [cb for cb in callbacks if type(cb).__name__ == "RobustnessMonitor"]
    assert monitor.precision == monitor_precision


@pytest.mark.parametrize("group", ["method", "pruning", "ensemble", "data", "logger", "trainer"])
def test_every_group_option_instantiates(group: str, tmp_path: Path) -> None:
    for option in group_options(group):
        cfg = cfg_for(f"{group}={option}", "model.width=4")
        validate_train_config(cfg)
        node = cfg.get(group)
        if node is None or "_target_" not in node:
            continue
        if group == "logger":
            obj = instantiate(node, save_dir=str(tmp_path))
        elif group == "trainer":
            if node.accelerator == "gpu" and not torch.cuda.is_available():
                assert option == "gpu"  # composes and validates; a Trainer needs a GPU to exist
                continue
            obj = instantiate(node, logger=False)
        elif group == "method":
            obj = build_module(cfg)
        else:
            obj = instantiate(node)
        assert obj is not None


def test_every_model_config_builds() -> None:
    for option in group_options("model"):
        cfg = cfg_for(f"model={option}")
        with open_dict(cfg):
            cfg.model.width = None if option == "torchvision" else 4
        model = instantiate(cfg.model)
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


BAD = [
    ("pruning.sparsity=1.0", "pruning.sparsity"),
    ("pruning.sparsity=-0.5", "pruning.sparsity"),
    ("pruning.epoch=6", "pruning.epoch"),  # default experiment: max_epochs=6
    ("ensemble.every_n_steps=0", "ensemble.every_n_steps"),
    ("ensemble.tau0=1.5", "ensemble.tau0"),
    ("model.name=resnet1000", "model.name"),
    ("data.name=imagenet", "data.name"),
    ("method.attack.eps=0", "method.attack.eps"),
    ("method.reparam_kind=lowrank", "method.reparam_kind"),
]


@pytest.mark.parametrize(("override", "key"), BAD)
def test_invalid_config_fails_before_data_loads(override: str, key: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg = cfg_for(override, f"data.root={missing}")
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path / "run")
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_missing_data_names_the_root(tmp_path: Path) -> None:
    cfg = cfg_for("experiment=smoke", f"data.root={tmp_path / 'nothing'}")
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="data.root"):
        run(cfg)


@pytest.mark.slow
def test_smoke_experiment_end_to_end(
    pack_root: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import frep_lightning.train as train_module

    seen: dict[str, Any] = {}
    real = train_module.evaluate

    def spy(model: Any, loader: Any, attacks: Any, **kwargs: Any) -> Any:  # the fit-end evaluation's inputs
        seen.update(batch_size=loader.batch_size, restarts=attacks["pgd10"].restarts)
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, loader, attacks, **kwargs)

    evaluated: list[dict[str, torch.Tensor]] = []

    monkeypatch.setattr(train_module, "evaluate", spy)
    cfg = cfg_for(
        "experiment=smoke",
        f"data.root={pack_root}",
        f"data.cache_dir={cache_dir}",
        "logger=csv",
        "eval.batch_size=64",
        "eval.restarts=2",
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    summary = run(cfg)
    assert seen == {"batch_size": 64, "restarts": 2}  # eval.* keys, not data.eval_batch_size (validation)
    assert summary["pgd_restarts"] == 2
    run_dir = tmp_path / "run"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    for key in (
        "method",
        "model",
        "dataset",
        "sparsity_target",
        "sparsity",
        "clean_acc",
        "pgd_acc",
        "epochs",
        "train_seconds",
        "device",
    ):
        assert key in summary
    assert summary["method"] == "frep" and summary["dataset"] == "cifar10" and summary["epochs"] == 4
    assert abs(summary["sparsity"] - 0.9) < 1e-3
    assert 0.0 <= summary["pgd_acc"] <= summary["clean_acc"] <= 1.0
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert not any("parametrizations" in k or k.endswith("mask") for k in state)
    model = build_model("resnet18", num_classes=10, width=8)
    model.load_state_dict(state, strict=True)
    # the numbers are the exported file's: a plain backbone holding exactly model.pt, not the live module
    (evaluated_state,) = evaluated
    assert evaluated_state.keys() == state.keys()
    assert all(torch.equal(evaluated_state[k], state[k]) for k in state)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert summary["train_step"] == "plain (automatic optimization)"


@pytest.mark.slow
def test_fast_path_end_to_end_through_the_config(pack_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """fast.enabled with every option the GPU bench compares, through Hydra, pruning, the ensemble, merge and
    the final evaluation: the exported model is exactly as sparse as asked and summary.json says what ran
    (on CPU the captured step runs eagerly, and the second stream is not used)."""
    cfg = cfg_for(
        "experiment=smoke",
        f"data.root={pack_root}",
        f"data.cache_dir={cache_dir}",
        "logger=none",
        "data.n_train=128",
        "trainer.max_epochs=3",
        "pruning.epoch=1",
        "optim.milestones=[2]",
        "eval.n_test=100",
        "fast.enabled=true",
        "fast.precision=bf16",
        "fast.channels_last=true",
        "fast.cache_weights=true",
        "fast.streams=2",
        "val_attack_precision=bf16",
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    summary = run(cfg)
    assert summary["train_step"].startswith("eager, bf16") and "cached W" in summary["train_step"]
    assert "2 streams" not in summary["train_step"]  # CPU: one stream
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-4) and summary["global_steps"] == 12
    assert 0.0 <= summary["pgd_acc"] <= summary["clean_acc"] <= 1.0


def test_summary_sparsity_counts_the_layers_pruning_selected() -> None:
    """summary.json's sparsity is over the layers the pruning pruned (pruning.include / the classifier a
    structured run keeps), as keys of model.pt; without pruning, over every exported Conv2d/Linear."""
    from types import SimpleNamespace

    from frep_lightning.export import MergeReparameterization
    from frep_lightning.pruning import RobustPruning
    from frep_lightning.train import _prunable_keys

    export = MergeReparameterization(attr="model")
    export.report = {"layers": {"net.conv1": {}, "net.layer4.0.conv1": {}, "net.linear": {}}}
    pruning = RobustPruning(sparsity=0.9, epoch=1, include=["model.net.layer4.*"])
    pruning.selected_layers = ["model.net.layer4.0.conv1"]
    trainer = SimpleNamespace(callbacks=[pruning, export])
    assert _prunable_keys(trainer, export) == ["net.layer4.0.conv1.weight"]  # type: ignore[arg-type]
    trainer = SimpleNamespace(callbacks=[export])
    assert _prunable_keys(trainer, export) == [  # type: ignore[arg-type]
        "net.conv1.weight",
        "net.layer4.0.conv1.weight",
        "net.linear.weight",
    ]


def test_a_run_that_trains_no_step_fails_instead_of_exporting(pack_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    cfg = cfg_for(
        "experiment=smoke",
        f"data.root={pack_root}",
        f"data.cache_dir={cache_dir}",
        "logger=none",
        "+trainer.limit_train_batches=0",
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    with (
        pytest.warns(UserWarning, match="TemporalEnsemble made no update"),
        pytest.raises(RuntimeError, match=r"training made no optimizer step .*the exported model is untrained"),
    ):
        run(cfg)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_structured_run_accounts_for_the_channels_it_can_cut(
    pack_root: Path, cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """summary.json of a structured run says what cutting the emptied channels leaves (parameters and
    multiply-adds per image, equal to frep_lightning.slim on model.pt); a model the cut fails on is
    reported in the summary, not a lost run."""
    import frep_lightning.train as train_module
    from frep_lightning.slimming import macs_per_image, slim

    overrides = ("method=frep_ch", "logger=none", "eval.n_test=10", "eval.pgd_steps=1")
    cfg = cfg_for(*tiny_run_overrides(pack_root, cache_dir), *overrides)
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    summary = run(cfg)
    model = build_model("resnet18", num_classes=10, width=4).eval()
    model.load_state_dict(torch.load(tmp_path / "run" / "model.pt", weights_only=True))
    x = torch.rand(2, 3, 32, 32)
    small, report = slim(model, x)
    assert summary["slim"] == {"parameters": report["parameters"], "macs": report["macs"]}
    assert summary["slim"]["macs"][1] == macs_per_image(small, x)[1] < summary["slim"]["macs"][0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["slim"] == summary["slim"]

    def broken(*args: Any) -> Any:
        raise RuntimeError("an architecture the cut misjudges")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_module, "slim", broken)
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path / "again")
        assert run(cfg)["slim"] == {"error": "an architecture the cut misjudges"}
    assert "could not be cut out of the model" in caplog.text
