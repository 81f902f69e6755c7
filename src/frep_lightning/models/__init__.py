"""Backbones: CIFAR ResNet-18/34/50, VGG-16-BN, WRN-28-10, or any torchvision classifier by name.

Every model is returned wrapped in :class:`NormalizedModel`, so it takes [0, 1] images and the
exported state_dict loads into ``build_model(...)`` of the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torchvision
from torch import nn

from frep_lightning.models.cifar_resnet import resnet18, resnet34, resnet50
from frep_lightning.models.normalize import Normalize, NormalizedModel
from frep_lightning.models.vgg import vgg16_bn
from frep_lightning.models.wide_resnet import wide_resnet, wrn28_10

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)

BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg16_bn": vgg16_bn,
    "wrn28_10": wrn28_10,
}


def model_names() -> list[str]:
    return list(BUILTIN)


def build_model(
    name: str,
    num_classes: int = 10,
    width: int | None = None,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> NormalizedModel:
    """A fresh, unmodified backbone (the architecture that ``model.pt`` loads into)."""
    if name in BUILTIN:
        net = BUILTIN[name](num_classes=num_classes, **({} if width is None else {"width": width}))
    elif name.startswith("torchvision."):
        fn = name.split(".", 1)[1]
        available = torchvision.models.list_models(module=torchvision.models)
        if fn not in available:
            raise ValueError(f"model.name={name!r}: torchvision has no classifier {fn!r}; e.g. {available[:6]}")
        if width is not None:
            raise ValueError(f"model.width={width} applies to the built-in CIFAR models only, not {name}")
        net = torchvision.models.get_model(fn, weights=None, num_classes=num_classes)
    else:
        raise ValueError(
            f"model.name={name!r} is not valid; allowed values: {', '.join(BUILTIN)}, or torchvision.<name> "
            "(e.g. torchvision.resnet18, torchvision.mobilenet_v3_small)"
        )
    return NormalizedModel(net, mean, std)


__all__ = [
    "BUILTIN",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "Normalize",
    "NormalizedModel",
    "build_model",
    "model_names",
    "wide_resnet",
]
