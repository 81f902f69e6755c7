"""Backbones: shapes, parameter counts of the paper's models, normalisation inside, torchvision by name."""

from __future__ import annotations

import pytest
import torch
import torchvision

from frep_lightning.models import BUILTIN, build_model, wide_resnet
from frep_lightning.models.normalize import NormalizedModel


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_models_map_images_to_logits(name: str) -> None:
    model = build_model(name, num_classes=7, width=2 if name == "wrn28_10" else 8).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "params"), [("resnet18", 11_173_962), ("vgg16_bn", 14_728_266), ("wrn28_10", 36_479_194)]
)
def test_paper_models_have_the_published_size(name: str, params: int) -> None:
    count = sum(p.numel() for p in build_model(name, num_classes=10).net.parameters())
    assert abs(count - params) / params < 0.01


def test_normalisation_is_inside_the_model() -> None:
    model = build_model("resnet18", width=4).eval()
    assert isinstance(model, NormalizedModel)
    x = torch.rand(3, 3, 32, 32)
    mean, std = model.normalize.mean, model.normalize.std
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - mean) / std))
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_torchvision_by_name_loads_into_unmodified_torchvision_model() -> None:
    model = build_model("torchvision.resnet18", num_classes=7)
    fresh = torchvision.models.resnet18(num_classes=7)
    fresh.load_state_dict(model.net.state_dict(), strict=True)


def test_unknown_names_are_rejected_with_the_key() -> None:
    with pytest.raises(ValueError, match="model.name"):
        build_model("resnet1000")
    with pytest.raises(ValueError, match="model.name"):
        build_model("torchvision.not_a_model")
    with pytest.raises(ValueError, match="model.width"):
        build_model("torchvision.resnet18", width=8)
    with pytest.raises(ValueError, match="model.depth"):
        wide_resnet(depth=27)
