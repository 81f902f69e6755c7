"""Reparameterization: parametrizations, inits, merge == unmerged, plain state_dict keys."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from frep_lightning.reparam import (
    Channel,
    Hadamard,
    add_masks_,
    factors,
    iter_masked,
    merge_,
    reparameterize_,
    weight_parametrization,
)


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


CASES = [
    ("hadamard", "random"),
    ("hadamard", "equal"),
    ("hadamard", "ones"),
    ("channel", "random"),
    ("channel", "ones"),
    ("none", "random"),
]


@pytest.mark.parametrize(("kind", "init"), CASES)
def test_merge_matches_reparameterized_outputs_and_keys(kind: str, init: str) -> None:
    net = small_net()
    plain_keys = list(net.state_dict())
    reparameterize_(net, kind, init, seed=1)
    net.eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
    merged = merge_(copy.deepcopy(net))
    with torch.no_grad():
        got = merged(x)
    assert (got - expected).abs().max().item() < 1e-5
    assert list(merged.state_dict()) == plain_keys
    assert not any(isinstance(m, nn.Module) and hasattr(m, "parametrizations") for m in merged.modules())
    # merging the copy must not break the original (deepcopy shares parametrize's injected class)
    with torch.no_grad():
        assert torch.equal(net(x), expected)
    fresh = small_net()
    fresh.load_state_dict(merged.state_dict(), strict=True)


def test_hadamard_inits_follow_the_paper() -> None:
    torch.manual_seed(3)
    for init in ("random", "equal", "ones"):
        layer = nn.Linear(50, 40)
        w0 = layer.weight.detach().clone()
        reparameterize_(layer, "hadamard", init, seed=0)
        w1, w2 = factors(layer)
        assert torch.equal(w1, w0)
        if init == "equal":
            assert torch.equal(w2, w0.abs())
        elif init == "ones":
            assert torch.equal(w2, torch.ones_like(w0))
        else:  # independent draw from the same distribution: same multiset, different order
            assert torch.equal(w2.flatten().sort().values, w0.flatten().sort().values)
            assert not torch.equal(w2, w0)
            # the product is much sparser than the original weight (paper Sec. III-B)
            assert (w1 * w2).abs().median() < 0.2 * w0.abs().median()


@pytest.mark.parametrize("init", ["random", "equal", "sqrt"])
def test_zero_initialised_layer_still_trains(init: str) -> None:
    # torchvision's VisionTransformer zero-initialises its head: W1 = W2 = 0 would get no gradient, nor
    # would any layer before it (the paper's factors are "randomly initialized")
    torch.manual_seed(0)
    head = nn.Linear(8, 3)
    nn.init.zeros_(head.weight)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), head)
    reparameterize_(net, "hadamard", init, seed=0)
    if init == "sqrt":  # keeps the function of the given weights
        assert torch.equal(head.weight, torch.zeros_like(head.weight))
    nn.functional.cross_entropy(net(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert factors(head)[0].grad is not None and factors(head)[0].grad.abs().sum() > 0
    if init != "sqrt":
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in factors(net[0]))


def test_channel_factor_shapes_and_identity_init() -> None:
    conv = nn.Conv2d(4, 6, 3)
    w0 = conv.weight.detach().clone()
    reparameterize_(conv, "channel", "ones")
    m, w2 = factors(conv)
    assert m.shape == (6, 6) and w2.shape == w0.shape
    assert torch.allclose(conv.weight, w0)
    assert isinstance(weight_parametrization(conv), Channel)
    with pytest.raises(ValueError, match="reparam.init"):
        reparameterize_(nn.Conv2d(4, 6, 3), "channel", "equal")


def test_mask_zeroes_weights_and_gradients() -> None:
    layer = nn.Linear(5, 3)
    reparameterize_(layer, "hadamard", "random")
    p = weight_parametrization(layer)
    assert isinstance(p, Hadamard)
    assert torch.equal(p.mask, torch.ones(3, 5))
    p.mask[0].zero_()
    assert torch.all(layer.weight[0] == 0)
    layer(torch.randn(7, 5)).sum().backward()
    for f in factors(layer):
        assert torch.all(f.grad[0] == 0)


def test_idempotent_and_validation() -> None:
    net = small_net()
    reparameterize_(net, "hadamard")
    before = list(net.state_dict())
    reparameterize_(net, "hadamard")
    add_masks_(net)
    assert list(net.state_dict()) == before
    assert len(list(iter_masked(net))) == 3
    with pytest.raises(ValueError, match="reparam.kind"):
        reparameterize_(small_net(), "lowrank")
    with pytest.raises(ValueError, match="include"):
        reparameterize_(small_net(), "hadamard", include=["nothing.*"])


def test_include_exclude_patterns() -> None:
    net = small_net()
    reparameterize_(net, "hadamard", exclude=["7"])
    assert [n for n, _, _ in iter_masked(net)] == ["0", "3"]


@pytest.mark.parametrize("kind", ["hadamard", "channel", "none"])
def test_merge_after_pruning_keeps_the_mask(kind: str) -> None:
    """Merged after an unstructured pruning, the plain weights are the *masked* product: FReP-CH's factors
    are not zeroed for an unstructured mask (M mixes channels), so only the mask makes them sparse."""
    from frep_lightning.pruning import apply_masks_, compute_masks

    torch.manual_seed(0)
    net = small_net()
    reparameterize_(net, kind, "random", seed=0)
    masks = compute_masks(net, 0.8)
    apply_masks_(net, masks)
    net.eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
    merged = merge_(copy.deepcopy(net))
    for name, mask in masks.items():
        weight = merged.get_submodule(name).weight
        assert torch.equal(weight == 0, mask == 0)  # kept entries of a random init are never exactly 0
    with torch.no_grad():
        assert (merged(x) - expected).abs().max().item() < 1e-5


def test_channel_random_init_is_the_linear_init() -> None:
    """FReP-CH ``random``: M is drawn as ``nn.Linear(D, D)`` draws its weight, U(±1/√D), so M·W2 keeps the
    scale of the layer's own init (a unit bound would grow every layer's output by about √D)."""
    conv = nn.Conv2d(16, 64, 3)
    reparameterize_(conv, "channel", "random", seed=0)
    m = factors(conv)[0].detach()
    bound = 1 / 64**0.5
    assert float(m.abs().max()) <= bound and float(m.abs().max()) > 0.9 * bound
    assert abs(float(m.std()) - bound / 3**0.5) < 0.1 * bound
    again = reparameterize_(nn.Conv2d(16, 64, 3), "channel", "random", seed=0)
    assert torch.equal(factors(again)[0], m)  # the seed fixes M


def test_merged_state_dict_leaves_the_training_model_alone() -> None:
    """The export at fit end reads a merged *copy*: the LightningModule keeps its factors and masks, so a
    checkpoint saved or a test run after ``fit`` still sees the reparameterized model."""
    from frep_lightning.export import merged_state_dict

    net = small_net()
    plain_keys = list(net.state_dict())
    reparameterize_(net, "hadamard", seed=0)
    keys = list(net.state_dict())
    state = merged_state_dict(net)
    assert list(state) == plain_keys
    assert list(net.state_dict()) == keys and len(list(iter_masked(net))) == 3
    with torch.no_grad():
        assert torch.equal(state["0.weight"], net[0].weight)
