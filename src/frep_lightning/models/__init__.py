"""Backbones: CIFAR ResNet-18/34/50, VGG-16-BN, WRN-28-10, or any torchvision classifier by name.

Every model comes wrapped in :class:`NormalizedModel`, so it takes [0, 1] images (what attacks perturb)
and an exported state_dict loads into ``build_model(...)`` called with the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torchvision
from torch import nn

from frep_lightning.models.cifar_resnet import CifarResNet, resnet18, resnet34, resnet50
from frep_lightning.models.normalize import Normalize, NormalizedModel
from frep_lightning.models.vgg import VGG, vgg16_bn
from frep_lightning.models.wide_resnet import WideResNet, wide_resnet, wrn28_10

# CIFAR-10 training-set statistics, the convention of the robust-training literature
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)

BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg16_bn": vgg16_bn,
    "wrn28_10": wrn28_10,
}

TORCHVISION_PREFIX = "torchvision."


def model_names() -> list[str]:
    """The built-in CIFAR model names (any ``torchvision.<name>`` classifier is accepted as well)."""
    return list(BUILTIN)


def _torchvision_classifiers() -> list[str]:
    # module= restricts to image classifiers (no detection/segmentation/video/optical-flow models)
    return list(torchvision.models.list_models(module=torchvision.models))


def _allowed_values() -> str:
    available = _torchvision_classifiers()
    spread = available[:: max(1, len(available) // 4)][:4]  # a few real names from across the list
    examples = [f"{TORCHVISION_PREFIX}{n}" for n in ["resnet18", "mobilenet_v3_small", *spread]]
    return (
        f"allowed values: {', '.join(BUILTIN)}, or {TORCHVISION_PREFIX}<name> for any torchvision "
        f"classifier (e.g. {', '.join(dict.fromkeys(examples))})"
    )


def build_model(
    name: str,
    num_classes: int = 10,
    width: int | None = None,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> NormalizedModel:
    """A freshly initialised backbone behind :class:`Normalize` (the architecture ``model.pt`` loads into).

    ``width`` (built-in models only) is the base channel count (ResNet, VGG) or widen factor (WRN); ``None``
    keeps the published size. torchvision models are built with ``weights=None``: nothing is downloaded.
    """
    if name in BUILTIN:
        kwargs = {} if width is None else {"width": width}
        net = BUILTIN[name](num_classes=num_classes, **kwargs)
    elif name.startswith(TORCHVISION_PREFIX):
        fn = name[len(TORCHVISION_PREFIX) :]
        if fn not in _torchvision_classifiers():
            raise ValueError(f"model.name={name}: torchvision has no classifier called {fn!r}; {_allowed_values()}")
        if width is not None:
            raise ValueError(
                f"model.width={width} applies to the built-in CIFAR models only ({', '.join(BUILTIN)}), "
                f"not to {name}; leave model.width unset (null)"
            )
        net = torchvision.models.get_model(fn, weights=None, num_classes=num_classes)
    else:
        raise ValueError(f"model.name={name} is not a known model; {_allowed_values()}")
    return NormalizedModel(net, mean, std)


__all__ = [
    "BUILTIN",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "VGG",
    "CifarResNet",
    "Normalize",
    "NormalizedModel",
    "WideResNet",
    "build_model",
    "model_names",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16_bn",
    "wide_resnet",
    "wrn28_10",
]
