"""The catastrophic-overfitting monitor: a measurement that leaves training alone (eval mode, its own
random start, the global RNG streams untouched), one loud warning per collapse, and never silently off."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from frep_lightning.module import FReP
from frep_lightning.monitor import RobustnessMonitor, _masks_kept


def _module() -> FReP:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    module = FReP(net)
    module.logged = {}  # type: ignore[attr-defined]
    module.log = lambda name, value, **kwargs: module.logged.__setitem__(name, value)  # type: ignore[method-assign,attr-defined]
    return module


def _trainer(epoch: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)

    def loader(n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        torch.randperm(n)  # a loader that draws from the global RNG (a shuffle without its own generator)
        return [(x[:8], y[:8]), (x[8:], y[8:])]

    datamodule = SimpleNamespace(train_subset_loader=loader)
    return SimpleNamespace(datamodule=datamodule, current_epoch=epoch)


def test_measurement_leaves_rng_and_bn_alone_and_uses_a_fixed_random_start() -> None:
    """Switching the monitor on must not shift the training attack's random starts (global RNG), nor BN
    statistics; and with the same weights it measures the same number every epoch (fixed random start)."""
    module = _module()
    module.train()
    monitor = RobustnessMonitor(n_images=16, steps=2, batch_size=8, eps="64/255", step_size="16/255")
    bn = module.model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    crafted: list[torch.Tensor] = []
    perturb = monitor.attack.perturb
    monitor.attack.perturb = lambda *a, **k: crafted.append(perturb(*a, **k)) or crafted[-1]  # type: ignore[method-assign]
    for epoch, seed in enumerate((123, 456, 789)):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        monitor.on_train_epoch_end(_trainer(epoch), module)  # type: ignore[arg-type]
        assert torch.equal(torch.get_rng_state(), before), "the monitor drew from the global RNG"
        assert "train/pgd_subset" in module.logged  # type: ignore[attr-defined]
    assert len(crafted) == 6  # 2 batches x 3 epochs
    for i in (2, 3, 4, 5):  # same weights, same images: the same adversarial images every epoch
        assert torch.equal(crafted[i], crafted[i % 2])
    assert module.training and bn.training  # modes restored
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]


def test_one_warning_per_collapse_every_collapsed_epoch_recorded() -> None:
    monitor = RobustnessMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch, acc in enumerate([0.30, 0.40, 0.05, 0.04, 0.03, 0.38, 0.02]):
            monitor.observe(acc, epoch)
    messages = [str(w.message) for w in caught if "CATASTROPHIC OVERFITTING" in str(w.message)]
    assert len(messages) == 2, messages  # epoch 2 (collapse) and epoch 6 (a new collapse after recovery)
    assert "epoch 2" in messages[0] and "epoch 6" in messages[1]
    assert monitor.collapsed_epochs == [2, 3, 4, 6]  # summary.json's overfitting_epochs keeps all of them


def test_collapse_state_survives_a_resume() -> None:
    """Resumed inside a collapse: no second warning for the same collapse."""
    first = RobustnessMonitor()
    with pytest.warns(UserWarning, match="CATASTROPHIC OVERFITTING"):
        for epoch, acc in enumerate([0.40, 0.05]):
            first.observe(acc, epoch)
    resumed = RobustnessMonitor()
    resumed.load_state_dict(first.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resumed.observe(0.04, 2)
    assert resumed.collapsed_epochs == [1, 2]


def test_no_subset_loader_is_said_once() -> None:
    """A Trainer without a datamodule (dataloaders passed to fit): the watch is off, and says so."""
    monitor = RobustnessMonitor()
    module = _module()
    with pytest.warns(UserWarning, match="NOT being watched"):
        monitor.on_train_epoch_end(SimpleNamespace(datamodule=None, current_epoch=0), module)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.on_train_epoch_end(SimpleNamespace(datamodule=None, current_epoch=1), module)  # type: ignore[arg-type]


def test_pruning_damage_is_not_catastrophic_overfitting() -> None:
    """One-shot pruning to 99 % drops robust accuracy: the watch compares with the best since the masks
    last changed, so the pruning epoch is no collapse; a later collapse of the pruned network still is."""
    from frep_lightning.pruning import apply_masks_, compute_masks

    module = _module()  # FReP gives every Conv/Linear its (all-ones) mask
    monitor = RobustnessMonitor(n_images=16, steps=1, batch_size=8)
    flags: list[bool] = []
    observe = monitor.observe
    monitor.observe = lambda acc, epoch, changed=False, removed=1.0: (  # type: ignore[method-assign]
        flags.append(changed) or observe(acc, epoch, changed, removed)
    )
    for epoch in range(4):
        if epoch == 2:
            apply_masks_(module, compute_masks(module, 0.99))
        monitor.on_train_epoch_end(_trainer(epoch), module)  # type: ignore[arg-type]
    assert flags == [False, False, True, False]  # the change is seen once, at the first epoch after it

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = RobustnessMonitor()
        assert not watch.observe(0.40, 0)
        assert not watch.observe(0.15, 1, masks_changed=True)  # below 0.5 x 0.40, but another network
        assert not watch.observe(0.30, 2)
        assert watch.observe(0.05, 3)  # the pruned network collapses: still caught
    assert [str(w.message).split(":")[0] for w in caught] == ["CATASTROPHIC OVERFITTING suspected at epoch 3"]
    resumed = RobustnessMonitor()
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.masks_kept == monitor.masks_kept is not None  # a resume does not count as a change


def test_a_collapse_during_gradual_pruning_is_still_caught() -> None:
    """A gradual schedule changes the masks every epoch: a reset at each change would never compare two epochs
    (the watch was blind there). A small step compares with the previous epoch; a big one still restarts."""
    from frep_lightning.pruning import apply_masks_, compute_masks

    module = _module()
    monitor = RobustnessMonitor(n_images=16, steps=1, batch_size=8)
    seen: list[tuple[bool, float]] = []
    observe = monitor.observe
    monitor.observe = lambda acc, epoch, changed=False, removed=1.0: (  # type: ignore[method-assign]
        seen.append((changed, removed)) or observe(acc, epoch, changed, removed)
    )
    total = monitor.masks_kept = _masks_kept(module)
    assert total is not None
    for epoch, sparsity in enumerate([0.2, 0.36]):  # kept 80 %, then 64 %: a fifth of the kept each time
        apply_masks_(module, compute_masks(module, sparsity))
        monitor.on_train_epoch_end(_trainer(epoch), module)  # type: ignore[arg-type]
    assert [c for c, _ in seen] == [True, True]
    assert [round(r, 2) for _, r in seen] == [0.2, 0.2]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = RobustnessMonitor()
        assert not watch.observe(0.40, 0)
        assert not watch.observe(0.35, 1, masks_changed=True, removed=0.2)  # a gradual step: a small dip
        assert watch.observe(0.05, 2, masks_changed=True, removed=0.2)  # collapsed while the masks keep changing
        assert not watch.observe(0.04, 3, masks_changed=True, removed=0.9)  # a one-shot prune restarts the watch
        assert not watch.observe(0.30, 4)
        assert not watch.observe(0.16, 5, masks_changed=True, removed=0.3)  # 0.16 >= 0.5 x 0.30: not a collapse
    assert [str(w.message).split(":")[0] for w in caught] == ["CATASTROPHIC OVERFITTING suspected at epoch 2"]


def test_pruning_after_resuming_a_checkpoint_without_masks_kept_is_not_a_collapse() -> None:
    """A checkpoint saved before the monitor stored ``masks_kept`` (best 0.9 of the dense network), resumed
    before the pruning epoch: the prune must still reset the best, not be reported as a collapse."""
    from frep_lightning.pruning import apply_masks_, compute_masks

    module = _module()
    monitor = RobustnessMonitor(n_images=16, steps=1, batch_size=8)
    monitor.load_state_dict({"best": 0.9, "history": [0.9], "collapsed_epochs": []})  # an older checkpoint
    monitor.on_train_start(_trainer(1), module)  # type: ignore[arg-type]
    apply_masks_(module, compute_masks(module, 0.99))  # pruning.epoch=1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.on_train_epoch_end(_trainer(1), module)  # type: ignore[arg-type]
    assert monitor.history[-1] < 0.45 and monitor.collapsed_epochs == []  # below 0.5 x 0.9, yet no collapse


def test_collapse_thresholds_min_best_and_ratio() -> None:
    """A collapse is accuracy strictly below ``collapse_ratio`` x best, once the best reached ``min_best``."""
    monitor = RobustnessMonitor(collapse_ratio=0.8, min_best=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not monitor.observe(0.15, 0)
        assert not monitor.observe(0.01, 1)  # a fall from a best below min_best: noise of an untrained model
        assert not monitor.observe(0.50, 2)
        assert not monitor.observe(0.40, 3)  # exactly 0.8 x 0.5: not below
        assert monitor.observe(0.39, 4)
    assert monitor.collapsed_epochs == [4] and monitor.best == 0.5
    assert [str(w.message).split(":")[0] for w in caught] == ["CATASTROPHIC OVERFITTING suspected at epoch 4"]
