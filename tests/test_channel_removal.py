"""Which BatchNorm layers are held at zero with a pruned channel (:mod:`frep_lightning.channel_removal`):
only those that read nothing but the pruned layer's output, exactly as the layer computed it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from frep_lightning.channel_removal import channel_dependents, hold_dependents, zero_dependents_
from frep_lightning.reparam import iter_masked, merge_, reparameterize_


def _dependents(model: nn.Module) -> dict[str, list[str]]:
    model = reparameterize_(model, "none")
    return channel_dependents(model, [n for n, _, _ in iter_masked(model)])


class _SharedNorm(nn.Module):
    """One BatchNorm normalises the outputs of two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.a(x)) + self.bn(self.b(x))


class _NormCalledAgain(nn.Module):
    """The BatchNorm after ``a`` is called a second time, on a sum that carries ``c``'s channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.a(x))
        return self.bn(self.c(y) + y)


class _LayerCalledTwice(nn.Module):
    """One conv, two calls, a BatchNorm after each: every call's pruned channel is 0, both BNs pair."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn1, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.a(self.bn1(self.a(x))))


def test_a_norm_that_also_reads_something_else_is_not_paired() -> None:
    """Zeroing γ/β of a shared BN for ``a``'s pruned channels would zero those channels of ``b``'s
    (or of the sum's) path too, which are alive: such a BN keeps its γ/β."""
    assert _dependents(_SharedNorm()) == {"a": [], "b": []}
    assert _dependents(_NormCalledAgain()) == {"a": [], "c": []}
    assert _dependents(_LayerCalledTwice()) == {"a": ["bn1", "bn2"]}


def test_a_shared_norm_keeps_the_other_layers_live_channel() -> None:
    """The harm, numerically: pruning channel 0 of ``a`` only must leave ``bn(b(x))`` as it was."""
    model = reparameterize_(_SharedNorm(), "none")
    deps = channel_dependents(model, ["a", "b"])
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        model.bn.bias.fill_(0.5)
        before = model.bn(model.b(x))
        next(p for n, _, p in iter_masked(model) if n == "a").mask[0] = 0.0
        zero_dependents_(model, deps)
        torch.testing.assert_close(model.bn(model.b(x)), before, rtol=0, atol=0)


class _WrittenInPlace(nn.Module):
    """``a``'s output gets ``s``'s added in place before the BN reads it: fx's BN node still points
    at ``a``'s node, but the BN reads ``a + s``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.s, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.act = nn.Hardsigmoid(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        if self.how == "method":
            y.add_(self.s(x))
        elif self.how == "view":
            y.view(-1).add_(1.0)
        elif self.how == "module":
            self.act(y)  # hardsigmoid(0) = 0.5: a pruned channel would not stay 0
        elif self.how == "after":  # the BN has read y before it changes: still exactly a's output
            z = self.bn(y)
            y += self.s(x)
            return z + y
        return self.bn(y)


@pytest.mark.parametrize("how", ["method", "view", "module", "after"])
def test_a_layer_output_written_in_place_before_its_norm_is_not_paired(how: str) -> None:
    expected = ["bn"] if how == "after" else []
    assert _dependents(_WrittenInPlace(how)) == {"a": expected, "s": []}


def test_gradient_hooks_let_go_of_a_merged_layer() -> None:
    """The hooks outlive training on the module; once a layer is merged (no mask) they must not keep
    freezing its BN: the merged model is plain and trains like one (its deep copy has no hooks)."""
    model = reparameterize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2)))
    deps = channel_dependents(model, ["0"])
    assert deps == {"0": ["1"]}
    hooks = hold_dependents(model, deps)
    next(p for _, _, p in iter_masked(model)).mask[0] = 0.0
    zero_dependents_(model, deps)
    x = torch.rand(2, 3, 6, 6)

    model(x).square().sum().backward()
    assert model[1].bias.grad[0] == 0 and model[0].bias.grad[0] == 0  # held while the mask is there
    merge_(model)
    model.zero_grad()
    model(x).square().sum().backward()
    assert model[1].bias.grad[0] != 0  # β trains again (γ = 0 still blocks the conv's own gradient)
    for hook in hooks:
        hook.remove()


def test_resuming_a_filter_only_checkpoint_removes_its_channels(tmp_path) -> None:
    """A checkpoint pruned with ``remove_channels=false`` (or before the option existed), resumed with it
    on: the hooks alone would freeze the saved nonzero β of the pruned channels (neither removed nor
    trained); they are zeroed when training starts, in the live model and the ensemble, and say so."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import helpers
    from frep_lightning import RobustPruning, TemporalEnsemble
    from frep_lightning.pruning import averaged_copies

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = reparameterize_(
                nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(128, 4))
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.rand(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)), 4)

    def fit(remove: bool, epochs: int, ckpt: str | None = None) -> tuple[Module, pl.Trainer]:
        module = Module()
        callbacks = [
            RobustPruning(0.5, epoch=1, mode="structured", remove_channels=remove),
            TemporalEnsemble(every_n_steps=1, bn="copy"),
        ]
        trainer = helpers.quiet_trainer(tmp_path, callbacks, max_epochs=epochs)
        trainer.fit(module, loader, ckpt_path=ckpt)
        return module, trainer

    _, first = fit(False, 2)
    first.save_checkpoint(tmp_path / "filters_only.ckpt")

    with pytest.warns(UserWarning, match=r"already pruned channels were not zero .*zeroed now"):
        module, trainer = fit(True, 3, str(tmp_path / "filters_only.ckpt"))
    for model in (module, *averaged_copies(trainer)):
        dead = model.net[0].weight.detach().flatten(1).abs().amax(1) == 0
        assert int(dead.sum()) == 4
        for tensor in (model.net[0].bias, model.net[1].weight, model.net[1].bias):
            assert not tensor[dead].any()
