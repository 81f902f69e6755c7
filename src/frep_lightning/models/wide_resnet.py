"""WideResNet-depth-k for CIFAR (Zagoruyko & Komodakis, 2016): pre-activation blocks, no dropout.

WRN-28-10 is the standard large backbone of adversarial-robustness benchmarks (RobustBench), so results
on it compare directly with published numbers; the layout follows the widely used reference code.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; a 1x1 conv on the pre-activated input when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """3x3 stem (16 ch), three groups of (depth-4)/6 blocks (16k, 32k, 64k ch), BN-ReLU, pool, ``fc``."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"model.depth={depth} must be 6n+4 with n >= 1 (e.g. 10, 16, 28, 34)")
        if widen_factor < 1:
            raise ValueError(f"model.width={widen_factor} (widen factor) must be a positive integer")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for i, stride in enumerate((1, 2, 2)):
            for j in range(n):
                blocks.append(WideBlock(c_in, widths[i + 1], stride if j == 0 else 1))
                c_in = widths[i + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        # the reference initialisation; PyTorch's defaults train noticeably worse on WRNs
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wide_resnet(depth: int = 28, widen_factor: int = 10, num_classes: int = 10) -> WideResNet:
    """WRN-``depth``-``widen_factor``."""
    return WideResNet(depth, widen_factor, num_classes)


def wrn28_10(num_classes: int = 10, width: int | None = None) -> WideResNet:
    """WRN-28-10 (36.48M parameters, 10 classes); ``width`` overrides the widen factor for tiny tests."""
    return WideResNet(28, 10 if width is None else width, num_classes)
