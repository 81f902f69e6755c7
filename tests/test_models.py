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
    [
        ("resnet18", 11_173_962),
        ("resnet34", 21_282_122),
        ("resnet50", 23_520_842),
        ("vgg16_bn", 14_728_266),
        ("wrn28_10", 36_479_194),
    ],
)
def test_paper_models_have_the_published_size(name: str, params: int) -> None:
    # build only, no forward: the full-width models are slow on CPU. Exact: a shortcut's BatchNorm or the
    # WRN's final BN is < 0.1 % of the parameters, and a model without it is not the published one.
    count = sum(p.numel() for p in build_model(name, num_classes=10).net.parameters())
    assert count == params


@pytest.mark.parametrize(
    ("name", "stages", "sizes"),
    [
        ("resnet18", ["conv1", "layer1", "layer2", "layer3", "layer4"], [32, 32, 16, 8, 4]),
        ("resnet50", ["conv1", "layer1", "layer2", "layer3", "layer4"], [32, 32, 16, 8, 4]),
        ("wrn28_10", ["conv1", "blocks.3", "blocks.7", "blocks.11"], [32, 32, 16, 8]),
    ],
)
def test_cifar_models_keep_the_32x32_resolution_in_the_stem(name: str, stages: list[str], sizes: list[int]) -> None:
    """The CIFAR layout: a stride-1 3x3 stem without max-pool, then strides 1, 2, 2(, 2): an ImageNet-style
    stem (stride 2 or a pool) or a stage without its stride still maps images to logits, just not this way."""
    model = build_model(name, width=TINY_WIDTH[name]).eval()
    modules = dict(model.net.named_modules())
    assert modules["conv1"].kernel_size == (3, 3)
    seen: dict[str, int] = {}
    for stage in stages:
        modules[stage].register_forward_hook(lambda m, i, out, stage=stage: seen.update({stage: out.shape[-1]}))
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert [seen[s] for s in stages] == sizes
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_wide_resnet_blocks_are_pre_activation() -> None:
    """Zagoruyko & Komodakis: BN-ReLU before each conv; a projection shortcut takes the pre-activated input,
    an identity shortcut the raw one."""
    from torch.nn import functional as F

    net = wide_resnet(depth=16, widen_factor=2, num_classes=10).eval()
    for m in net.modules():  # BN with a visible effect (eval mode: running statistics)
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
    project, identity = net.blocks[0], net.blocks[1]  # 16 -> 32 channels, then 32 -> 32
    assert project.shortcut is not None and identity.shortcut is None
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        o = F.relu(project.bn1(x))
        residual = project.conv2(F.relu(project.bn2(project.conv1(o))))
        torch.testing.assert_close(project(x), residual + project.shortcut(o))
        h = torch.randn(2, identity.conv1.in_channels, 8, 8)
        residual = identity.conv2(F.relu(identity.bn2(identity.conv1(F.relu(identity.bn1(h))))))
        torch.testing.assert_close(identity(h), residual + h)
        images = torch.rand(2, 3, 32, 32)
        pooled = F.relu(net.bn(net.blocks(net.conv1(images)))).mean((2, 3))  # the last sum is BN-ReLU'd, pooled
        torch.testing.assert_close(net(images), net.fc(pooled))


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
    # the CIFAR-10 training set's per-pixel statistics (not the often-copied 0.2023/0.1994/0.2010)
    assert CIFAR_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR_STD == (0.2471, 0.2435, 0.2616)
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
