"""Backbones: shapes, parameter counts of the paper's models, normalisation inside, torchvision by name."""

from __future__ import annotations

import pytest
import torch
import torchvision

from frep_lightning.models import (
    BUILTIN,
    CIFAR_MEAN,
    CIFAR_STD,
    build_model,
    model_names,
    wide_resnet,
)
from frep_lightning.models.normalize import Normalize, NormalizedModel

TINY_WIDTH = {"resnet18": 8, "resnet34": 8, "resnet50": 8, "vgg16_bn": 8, "wrn28_10": 1}


def test_model_names_are_the_builtins() -> None:
    assert model_names() == ["resnet18", "resnet34", "resnet50", "vgg16_bn", "wrn28_10"]
    assert set(BUILTIN) == set(TINY_WIDTH)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_models_map_images_to_logits(name: str) -> None:
    model = build_model(name, num_classes=7, width=TINY_WIDTH[name]).eval()
    assert isinstance(model, NormalizedModel)
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_small_wide_resnet_maps_images_to_logits() -> None:
    net = wide_resnet(depth=10, widen_factor=1, num_classes=5)
    assert len(net.blocks) == 3  # (10 - 4) / 6 = 1 block per group
    model = NormalizedModel(net, CIFAR_MEAN, CIFAR_STD).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_width_scales_the_channels() -> None:
    assert build_model("resnet18", width=8).net.linear.in_features == 64
    assert build_model("resnet50", width=8).net.linear.in_features == 256  # 8w * expansion 4
    assert build_model("vgg16_bn", width=8).net.classifier.in_features == 64
    assert build_model("wrn28_10", width=1).net.fc.in_features == 64


@pytest.mark.parametrize(
    ("name", "params"),
    [("resnet18", 11_173_962), ("vgg16_bn", 14_728_266), ("wrn28_10", 36_479_194)],
)
def test_paper_models_have_the_published_size(name: str, params: int) -> None:
    # build only, no forward: the full-width models are slow on CPU
    count = sum(p.numel() for p in build_model(name, num_classes=10).net.parameters())
    assert abs(count - params) / params < 0.01


def test_normalisation_is_inside_the_model() -> None:
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    model = build_model("resnet18", width=4, mean=mean, std=std).eval()
    assert isinstance(model.normalize, Normalize)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - m) / s), atol=1e-6)
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"], m)
    assert torch.equal(state["normalize.std"], s)
    assert all(k.startswith(("normalize.", "net.")) for k in state)
    # buffers, not parameters: the optimiser and the pruner must never touch them
    assert not any(n.startswith("normalize.") for n, _ in model.named_parameters())


def test_default_normalisation_is_cifar10() -> None:
    model = build_model("vgg16_bn", width=8)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(CIFAR_MEAN))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(CIFAR_STD))


def test_state_dict_round_trips_into_a_fresh_build() -> None:
    a = build_model("resnet18", num_classes=10, width=8)
    b = build_model("resnet18", num_classes=10, width=8)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_torchvision_by_name_loads_into_unmodified_torchvision_model() -> None:
    model = build_model("torchvision.resnet18", num_classes=7)
    assert isinstance(model, NormalizedModel)
    assert model.net.fc.out_features == 7
    fresh = torchvision.models.resnet18(num_classes=7)
    fresh.load_state_dict(model.net.state_dict(), strict=True)


def test_unknown_names_are_rejected_with_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.name=resnet1000") as info:
        build_model("resnet1000")
    message = str(info.value)
    assert all(name in message for name in BUILTIN)
    assert "torchvision.<name>" in message
    with pytest.raises(ValueError, match=r"model\.name=torchvision\.not_a_model"):
        build_model("torchvision.not_a_model")
    with pytest.raises(ValueError, match=r"model\.width"):
        build_model("torchvision.resnet18", width=8)
    with pytest.raises(ValueError, match=r"model\.depth"):
        wide_resnet(depth=27)
