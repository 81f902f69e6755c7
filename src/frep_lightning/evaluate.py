"""Clean and robust accuracy of an exported model (eval mode, running BN stats untouched).

Robust accuracy over several attacks is the per-example worst case: an example counts as
robust only if every attack run on it fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from frep_lightning.attacks import SignGradientAttack, check_adversarial, cross_entropy_loss


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(dim=1)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attacks: Mapping[str, SignGradientAttack],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Accuracy for ``clean``, each attack, and ``worst_case`` over all attacks run."""
    model = model.to(device).eval()
    correct = {"clean": 0, **{name: 0 for name in attacks}, "worst_case": 0}
    n = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        if x.min() < 0 or x.max() > 1:
            raise ValueError("evaluate(): inputs must be images in [0, 1]; normalisation belongs inside the model")
        robust = _predict(model, x) == y
        correct["clean"] += int(robust.sum())
        for name, attack in attacks.items():
            x_adv = attack.perturb(model, x, cross_entropy_loss(y))
            check_adversarial(x_adv, x, attack.eps)
            ok = _predict(model, x_adv) == y
            correct[name] += int(ok.sum())
            robust &= ok
        correct["worst_case"] += int(robust.sum())
        n += len(y)
    if n == 0:
        raise ValueError("evaluate(): no examples")
    return {k: v / n for k, v in correct.items()} | {"n": n}
