"""Global magnitude / channel pruning: exact counts, factor and optimizer-state zeroing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from frep_lightning.pruning import (
    RobustPruning,
    apply_masks_,
    compute_masks,
    global_channel_masks,
    global_magnitude_masks,
    sparsity_report,
)
from frep_lightning.reparam import factors, iter_masked, reparameterize_


def test_global_magnitude_keeps_exactly_k_largest() -> None:
    weights = {"a": torch.tensor([[0.5, -3.0], [0.1, 2.0]]), "b": torch.tensor([-1.0, 0.2, 4.0, -0.05])}
    masks = global_magnitude_masks(weights, sparsity=0.5)  # 8 entries, keep 4: 4, -3, 2, -1
    assert masks["a"].tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert masks["b"].tolist() == [1.0, 0.0, 1.0, 0.0]
    big = {f"l{i}": torch.randn(64, 32, 3, 3) for i in range(3)}
    for s in (0.9, 0.99, 0.999):
        kept = sum(int(m.sum()) for m in global_magnitude_masks(big, s).values())
        total = 3 * 64 * 32 * 9
        assert kept == total - round(s * total)


def test_global_channel_masks_exact_count_and_min_channels() -> None:
    torch.manual_seed(0)
    weights = {"c1": torch.randn(16, 3, 3, 3), "c2": torch.randn(32, 16, 3, 3) * 0.01, "fc": torch.randn(10, 32)}
    masks = global_channel_masks(weights, sparsity=0.7)
    rows = {n: m.flatten(1).amax(1) for n, m in masks.items()}
    for n, m in masks.items():  # whole output channels only
        assert torch.equal(m, rows[n].view(-1, *([1] * (m.dim() - 1))).expand_as(m))
    assert sum(int(r.sum()) for r in rows.values()) == 58 - round(0.7 * 58)
    assert int(rows["c2"].sum()) >= 1  # tiny-norm layer still keeps a channel
    # the kept channels of a layer are its largest-norm ones
    norms = weights["c1"].flatten(1).norm(dim=1)
    kept = rows["c1"].bool()
    if kept.any() and (~kept).any():
        assert norms[kept].min() >= norms[~kept].max()


@pytest.mark.parametrize("kind", ["hadamard", "channel", "none"])
def test_pruned_weights_stay_zero_under_momentum_and_weight_decay(kind: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    reparameterize_(net, kind)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-2)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 5, (16,))
    for _ in range(3):  # build up momentum first
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    masks = compute_masks(net, sparsity=0.8)
    apply_masks_(net, masks, [opt])
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        for name, module, _ in iter_masked(net):
            assert torch.all(module.weight[masks[name] == 0] == 0)
            if kind == "hadamard":
                for f in factors(module):
                    assert torch.all(f[masks[name] == 0] == 0)
    report = sparsity_report(net)
    total = sum(m.numel() for m in masks.values())
    assert report["zeros"] == total - (total - round(0.8 * total))


def test_structured_channel_reparam_zeroes_rows_of_m() -> None:
    conv = nn.Conv2d(3, 6, 3)
    reparameterize_(conv, "channel", "random")
    masks = compute_masks(conv, 0.5, mode="structured")
    apply_masks_(conv, masks)
    m, _ = factors(conv)
    dead = masks[""].flatten(1).amax(1) == 0
    assert int(dead.sum()) == 3
    assert torch.all(m[dead] == 0)
    assert torch.all(conv.weight[dead] == 0)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"sparsity": 1.0}, "pruning.sparsity"),
        ({"sparsity": -0.1}, "pruning.sparsity"),
        ({"sparsity": 0.9, "epoch": -1}, "pruning.epoch"),
        ({"sparsity": 0.9, "mode": "random"}, "pruning.mode"),
    ],
)
def test_callback_validates_arguments(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        RobustPruning(**kwargs)


def test_structured_pruning_never_removes_classes() -> None:
    """The classifier's output rows are the classes: structured pruning ranks filters only (the head
    here has tiny rows that a global ranking would remove first)."""
    from types import SimpleNamespace

    from frep_lightning.pruning import RobustPruning

    torch.manual_seed(0)
    holder = nn.Module()
    holder.model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    with torch.no_grad():
        holder.model[3].weight.mul_(1e-4)
    reparameterize_(holder.model, "hadamard")
    pruning = RobustPruning(0.5, epoch=0, mode="structured")
    pruning.setup(SimpleNamespace(max_epochs=2), holder, "fit")
    assert pruning.selected_layers == ["model.0", "model.1"]
    masks = compute_masks(holder, 0.5, "structured", pruning.selected_layers)
    assert set(masks) == {"model.0", "model.1"}
    assert sum(int(m.flatten(1).amax(1).sum()) for m in masks.values()) == 8  # 8 of 16 filters kept
    unstructured = RobustPruning(0.5, epoch=0)
    unstructured.setup(SimpleNamespace(max_epochs=2), holder, "fit")
    assert unstructured.selected_layers == ["model.0", "model.1", "model.3"]  # weights: the head counts


def test_structured_pruning_keeps_a_convolutional_head() -> None:
    """A fully convolutional classifier (a 1x1 conv gives the class maps) keeps every class too."""
    from frep_lightning.pruning import without_classifier

    holder = nn.Module()
    holder.model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert without_classifier(holder, ["model.0", "model.1"]) == ["model.0"]
    assert without_classifier(holder, ["model.0"]) == ["model.0"]  # head not selected: nothing to drop
