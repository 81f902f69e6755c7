"""CIFAR VGG-16 with BatchNorm and a single linear classifier.

This is the VGG used by robust-pruning work (HYDRA and follow-ups): five max-pools take 32x32 to 1x1, so
one ``nn.Linear`` on the 512 features replaces ImageNet VGG's three large FC layers (14.7M parameters).
"""

from __future__ import annotations

from torch import Tensor, nn

CFG16: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]


class VGG(nn.Module):
    """``features`` (conv3x3 pad 1 + BN + ReLU, "M" = 2x2 max-pool) then ``classifier`` (one Linear)."""

    def __init__(self, cfg: list[int | str], num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"model.width={width} must be a positive integer")
        layers: list[nn.Module] = []
        c_in = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = max(1, int(v) * width // 64)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def vgg16_bn(num_classes: int = 10, width: int = 64) -> VGG:
    """CIFAR VGG-16-BN; ``width`` scales every conv's channels by ``width / 64``."""
    return VGG(CFG16, num_classes, width)
