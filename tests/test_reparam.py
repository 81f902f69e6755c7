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
