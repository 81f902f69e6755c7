"""Global magnitude / channel pruning: exact counts, factor and optimizer-state zeroing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from frep_lightning.pruning import (
    RobustPruning,
    apply_masks_,
    check_maskable_state,
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


def _train_steps(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["hadamard", "channel", "none"])
def test_pruned_weights_stay_zero_under_momentum_and_weight_decay(kind: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    reparameterize_(net, kind)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-2)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 5, (16,))
    _train_steps(net, opt, x, y, 3)  # build up momentum first
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


# ---- structured pruning removes channels: bias and BatchNorm of a pruned channel held at zero ----------
def test_channel_dependents_are_the_norms_reading_a_layer_directly() -> None:
    """Post-activation ResNet: every conv feeds its BN; pre-activation WRN: a block's last conv feeds a
    residual addition, never a BN, so the next block's BN (which reads the sum) is not paired."""
    from frep_lightning.channel_removal import channel_dependents
    from frep_lightning.models import build_model

    resnet = reparameterize_(build_model("resnet18", num_classes=10, width=4), "hadamard")
    names = [n for n, _, _ in iter_masked(resnet)]
    deps = channel_dependents(resnet, names)
    assert deps["net.conv1"] == ["net.bn1"]
    assert deps["net.layer1.0.conv2"] == ["net.layer1.0.bn2"]
    assert deps["net.layer2.0.shortcut.0"] == ["net.layer2.0.shortcut.1"]
    assert sum(len(v) for v in deps.values()) == 20 and deps[names[-1]] == []  # the classifier feeds no BN
    wrn = reparameterize_(build_model("wrn28_10", num_classes=10, width=1), "none")
    deps = channel_dependents(wrn, [n for n, _, _ in iter_masked(wrn)])
    assert deps["net.blocks.0.conv1"] == ["net.blocks.0.bn2"]
    assert deps["net.blocks.0.conv2"] == [] and deps["net.blocks.1.conv2"] == []  # into a residual sum
    assert deps["net.conv1"] == ["net.blocks.0.bn1"]  # the stem's output, read by the first block's BN


def test_channel_dependents_of_a_users_lightning_module() -> None:
    """The drop-in case: a torchvision backbone inside the user's LightningModule, traced whole."""
    import lightning.pytorch as pl
    import torchvision

    from frep_lightning.channel_removal import channel_dependents

    class UserModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = reparameterize_(torchvision.models.resnet18(num_classes=10), "hadamard")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    module = UserModule()
    deps = channel_dependents(module, [n for n, _, _ in iter_masked(module)])
    assert deps["net.conv1"] == ["net.bn1"] and deps["net.layer4.1.conv2"] == ["net.layer4.1.bn2"]
    assert deps["net.layer2.0.downsample.0"] == ["net.layer2.0.downsample.1"]
    assert sum(len(v) for v in deps.values()) == 20 and deps["net.fc"] == []


def test_channel_dependents_warn_where_the_graph_cannot_be_traced() -> None:
    from frep_lightning.channel_removal import channel_dependents

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    holder = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), Branchy())
    add_masks = reparameterize_(holder, "none")
    with pytest.warns(UserWarning, match=r"could not trace 2 \(Branchy\).*keeps its β"):
        deps = channel_dependents(add_masks, ["0", "2.conv"])
    assert deps == {"0": ["1"], "2.conv": []}


class _TinyConvNet(torch.nn.Module):
    """conv(bias) -> BN -> ReLU -> conv -> BN -> pool -> linear: two prunable filter banks. The second BN
    feeds no ReLU (as before a residual sum), so its β keeps a gradient after pruning; ReLU'(0) = 0
    would hide that."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Identity(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _physically_pruned(net: nn.Sequential) -> nn.Sequential:
    """``net`` (merged, :class:`_TinyConvNet` layout) with the all-zero filters cut out: what an edge
    deployment runs. Equal outputs mean the pruned channels contributed exactly nothing."""
    import copy

    small = copy.deepcopy(net)
    keep_in: torch.Tensor | None = None
    for conv_i, bn_i in ((0, 1), (3, 4)):
        conv, bn = net[conv_i], net[bn_i]
        keep = (conv.weight.flatten(1) != 0).any(dim=1).nonzero().flatten()
        w = conv.weight[keep] if keep_in is None else conv.weight[keep][:, keep_in]
        new = nn.Conv2d(w.shape[1], len(keep), 3, padding=1, bias=conv.bias is not None)
        new.weight.data.copy_(w)
        if conv.bias is not None:
            new.bias.data.copy_(conv.bias[keep])
        small[conv_i] = new
        small[bn_i] = nn.BatchNorm2d(len(keep))
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(small[bn_i], key).data.copy_(getattr(bn, key)[keep])
        keep_in = keep
    head = nn.Linear(len(keep_in), 10)
    head.weight.data.copy_(net[8].weight[:, keep_in])
    head.bias.data.copy_(net[8].bias)
    small[8] = head
    return small.eval()


@pytest.mark.parametrize("remove", [True, False], ids=["remove_channels", "filters_only"])
def test_structured_pruning_removes_channels_end_to_end(tmp_path, remove: bool) -> None:
    """Trained with momentum and weight decay past the pruning epoch, with an ensemble: the bias and
    BN γ/β of every pruned channel stay exactly 0 in the live model and the averaged copy at every step,
    and the exported model equals the one with those filters physically cut out. Filter masking
    alone (``remove_channels=False``) leaves β alive, and cutting the filters changes the outputs."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import helpers
    from frep_lightning import TemporalEnsemble
    from frep_lightning.pruning import averaged_copies
    from frep_lightning.reparam import merge_
    from frep_lightning.slimming import slim

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _TinyConvNet()
            reparameterize_(self.model, "hadamard", seed=0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    class Probe(pl.Callback):
        """Largest |bias|, |γ|, |β| on a pruned channel after every step, live and averaged."""

        def __init__(self) -> None:
            self.worst: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if not pruning.pruned:
                return
            worst = 0.0
            for model in (pl_module, *averaged_copies(trainer)):
                for i_conv, i_bn in ((0, 1), (3, 4)):
                    conv, bn = model.model.net[i_conv], model.model.net[i_bn]
                    dead = conv.weight.detach().flatten(1).abs().amax(1) == 0
                    values = [bn.weight[dead], bn.bias[dead]] + ([conv.bias[dead]] if conv.bias is not None else [])
                    worst = max([worst, *(float(v.detach().abs().max()) for v in values if v.numel())])
            self.worst.append(worst)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    torch.manual_seed(0)
    module = Module()
    pruning = RobustPruning(0.5, epoch=1, mode="structured", remove_channels=remove)
    probe = Probe()
    ensemble = TemporalEnsemble(every_n_steps=1, c=1.0, bn="copy")
    trainer = helpers.quiet_trainer(tmp_path, [pruning, probe, ensemble], max_epochs=3)
    trainer.fit(module, DataLoader(data, batch_size=16))
    assert len(probe.worst) == 8  # epochs 1 and 2, 4 steps each
    dead = [int((module.model.net[i].weight.flatten(1).abs().amax(1) == 0).sum()) for i in (0, 3)]
    assert sum(dead) == 8 and min(dead) > 0  # 8 of 16 filters pruned, some in each layer

    exported = merge_(module.model).net.eval()
    x = torch.rand(16, 3, 8, 8, generator=g)
    with torch.no_grad():
        full, cut = exported(x), _physically_pruned(exported)(x)
    _, report = slim(exported, x)  # the package's own cut (checks its outputs itself)
    if remove:
        assert max(probe.worst) == 0.0  # exactly zero at every step, live and ensemble
        torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)
        hand = _physically_pruned(exported)
        assert report["layers"] == {"0": [8, 8 - dead[0]], "3": [8, 8 - dead[1]]}
        assert report["parameters"][1] == sum(p.numel() for p in hand.parameters())
    else:
        assert max(probe.worst) > 0.0  # β of pruned channels trained on
        assert not torch.allclose(cut, full, rtol=1e-3, atol=1e-4)
        assert report["layers"] == {}  # nothing is removable: the channels still carry β


def test_remove_channels_is_validated() -> None:
    with pytest.raises(ValueError, match=r"pruning.remove_channels='yes' must be true or false"):
        RobustPruning(0.5, mode="structured", remove_channels="yes")  # type: ignore[arg-type]


def test_setup_twice_says_things_once(caplog: pytest.LogCaptureFixture) -> None:
    """TemporalEnsemble runs RobustPruning.setup before Lightning does: each message appears once per fit."""
    from types import SimpleNamespace

    holder = nn.Module()
    holder.model = _TinyConvNet()
    reparameterize_(holder.model, "hadamard")
    pruning = RobustPruning(0.5, epoch=1, mode="structured")
    with caplog.at_level("INFO"):
        for _ in range(2):
            pruning.setup(SimpleNamespace(max_epochs=3), holder, "fit")  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("RobustPruning")]
    assert len(said) == 2 and "leaves the classifier model.net.8 dense" in said[0] and "removed" in said[1]
    assert len(pruning._hooks) == 5  # bias of net.0, γ/β of net.1 and of net.4: not doubled either


def test_global_magnitude_exact_count_under_ties() -> None:
    """Tied magnitudes (low-precision weights, exact zeros) still give exactly k kept entries: a
    threshold ``|W| >= kth largest`` would keep every tied entry."""
    weights = {"a": torch.ones(4, 5), "b": -torch.ones(10), "c": torch.zeros(6)}  # 30 entries at |1|, 6 zeros
    masks = global_magnitude_masks(weights, sparsity=0.5)
    assert sum(int(m.sum()) for m in masks.values()) == 18
    assert int(masks["c"].sum()) == 0  # a zero is never kept while a nonzero tie is pruned
    masks = global_magnitude_masks(weights, sparsity=0.1)  # keep 36 - round(3.6) = 32: all 30 ones + 2 zeros
    assert sum(int(m.sum()) for m in masks.values()) == 32
    assert int(masks["a"].sum()) == 20 and int(masks["b"].sum()) == 10 and int(masks["c"].sum()) == 2


def test_global_magnitude_ranks_all_layers_together() -> None:
    """One ranking over every layer (paper Sec. III-D): a layer of small weights loses all of them, a
    layer of large ones keeps all, where a per-layer top-k would keep half of each."""
    weights = {"small": torch.full((8, 4), 0.01), "large": torch.linspace(1.0, 2.0, 32).view(8, 4)}
    masks = global_magnitude_masks(weights, sparsity=0.5)
    assert int(masks["small"].sum()) == 0 and bool(masks["large"].all())


def test_global_channel_masks_rank_by_l2_norm_across_layers() -> None:
    """Eq. 17: a channel's importance is the L2 norm of its weights. Here L1 (or a per-layer count) would
    pick a different channel: a.1 has L1 2.0 > b.1's 1.5 but L2 1.0 < 1.5."""
    a = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 1e-3)])  # conv (3, 1, 2, 2)
    b = torch.tensor([[3.0, 0.0, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0], [1e-3, 0.0, 0.0, 0.0]])  # linear (3, 4)
    masks = global_channel_masks({"a": a, "b": b}, sparsity=0.5)  # keep 3 of 6
    assert masks["a"].flatten(1).amax(1).tolist() == [1.0, 0.0, 0.0]
    assert masks["b"].flatten(1).amax(1).tolist() == [1.0, 1.0, 0.0]


def test_global_channel_masks_exact_count_with_zero_norm_channels() -> None:
    """A layer whose filters are all zero ties every norm at 0 with the channels guaranteed to other layers:
    the guaranteed ones must not be drawn again, or fewer than ``round((1 - s) * D)`` channels are kept."""
    torch.manual_seed(0)
    weights = {"dead": torch.zeros(4, 3), "live": torch.randn(4, 3)}
    masks = global_channel_masks(weights, sparsity=0.25)  # keep 6 of 8: all 4 live + 2 dead (one guaranteed)
    rows = {n: m.flatten(1).amax(1) for n, m in masks.items()}
    assert int(rows["live"].sum()) == 4 and int(rows["dead"].sum()) == 2


@pytest.mark.parametrize(
    ("kind", "mode"),
    [("hadamard", "unstructured"), ("hadamard", "structured"), ("channel", "structured"), ("channel", "unstructured")],
)
def test_installing_masks_changes_only_the_pruned_weights(kind: str, mode: str) -> None:
    """Pruning fixes a mask and nothing else: every kept weight (W1·W2, or M·W2 for FReP-CH, whose factor
    rows are zeroed for pruned channels) is what it was, and every pruned one is exactly 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6))
    reparameterize_(net, kind, "random", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.rand(2, 3, 6, 6)).square().sum().backward()
    opt.step()
    before = {n: m.weight.detach().clone() for n, m, _ in iter_masked(net)}
    masks = compute_masks(net, 0.5, mode)
    apply_masks_(net, masks, [opt])
    for name, module, _ in iter_masked(net):
        assert int(masks[name].sum()) < masks[name].numel()  # something was pruned in every layer
        torch.testing.assert_close(module.weight.detach(), before[name] * masks[name], rtol=1e-6, atol=0.0)


def test_sparsity_report_counts_zeros_and_live_channels() -> None:
    """``live_channels`` (summary.json) counts output channels with any nonzero weight, not fully dense ones."""
    conv = torch.ones(3, 2, 2, 2)
    conv[0] = 0.0  # a pruned filter
    conv[1, 0] = 0.0  # a partly pruned one: still live
    report = sparsity_report({"conv.weight": conv, "bn.weight": torch.zeros(3), "fc.weight": torch.eye(4)})
    assert report["layers"]["conv"] == {"zeros": 12, "numel": 24, "sparsity": 0.5, "live_channels": 2, "channels": 3}
    assert report["layers"]["fc"]["live_channels"] == 4 and report["layers"]["fc"]["zeros"] == 12
    assert report["zeros"] == 24 and report["numel"] == 40 and report["sparsity"] == 24 / 40  # BN γ not counted


def test_excluded_layers_stay_dense_when_the_whole_model_is_reparameterized(tmp_path: Path) -> None:
    """``reparameterize_`` without patterns gives every layer factors and a mask; ``pruning.exclude`` must
    still keep the excluded layer out of the ranking and dense (its mask all ones)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import helpers

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = reparameterize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    module = Module()
    pruning = RobustPruning(0.9, epoch=0, exclude=["net.0"])
    data = TensorDataset(torch.rand(4, 3, 6, 6), torch.randint(0, 3, (4,)))
    helpers.quiet_trainer(tmp_path, [pruning], max_epochs=1).fit(module, DataLoader(data, batch_size=4))
    assert pruning.pruned and pruning.selected_layers == ["net.2"]
    masks = {n: p.mask for n, _, p in iter_masked(module)}
    assert bool(masks["net.0"].all()) and bool((module.net[0].weight != 0).all())
    assert int(masks["net.2"].sum()) == 192 - round(0.9 * 192)


@pytest.mark.parametrize("kind", ["hadamard", "none"])
def test_adam_state_is_maskable_and_pruned_weights_stay_zero(kind: str) -> None:
    """Adam keeps a scalar ``step`` beside per-weight moments: its state passes the maskability check, and
    with both moments zeroed (and AdamW's decoupled decay) pruned weights and factors stay exactly 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    reparameterize_(net, kind)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 3, (8,))
    _train_steps(net, opt, x, y, 3)  # build up both moments first
    check_maskable_state([opt])
    masks = compute_masks(net, sparsity=0.7)
    apply_masks_(net, masks, [opt])
    _train_steps(net, opt, x, y, 3)
    for name, module, _ in iter_masked(net):
        pruned = masks[name] == 0
        assert bool(pruned.any()) and not module.weight[pruned].any()
        for f in factors(module):
            assert not f[pruned].any()
