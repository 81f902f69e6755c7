"""Training objectives: SRE (FReP's default, Eq. 16) and cross-entropy adversarial training.

An objective is two functions of logits: ``attack_loss`` (what the training attack maximises
over x_adv) and ``__call__`` (what the optimizer minimises). A method is then a config choice of
objective + attack + callbacks, not a fork of the training loop.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

ATTACK_TARGETS = ("consistency", "sre")


class Objective:
    """Interface. ``uses_clean``: whether ``__call__`` needs the clean logits (one forward less if not)."""

    uses_clean: bool = True

    def attack_loss(self, logits_adv: Tensor, logits_clean: Tensor | None, y: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError


class SRE(Objective):
    """Self-consistent robust error (Pang et al. 2022), Eq. 16:
    ||softmax(f(x)) - onehot(y)||^2 + lam * ||softmax(f(x_adv)) - softmax(f(x))||^2, batch mean.

    ``attack_target``: ``consistency`` (default) maximises the second term only, the part of
    L_SRE(W, x~, y) that depends on x~ (Alg. 1 line 6), as TRADES-style attacks do; ``sre``
    also adds the first term evaluated at x~.
    """

    def __init__(self, lam: float = 6.0, attack_target: str = "consistency") -> None:
        if not lam >= 0:
            raise ValueError(f"method.objective.lam={lam!r} must be >= 0")
        if attack_target not in ATTACK_TARGETS:
            raise ValueError(
                f"method.objective.attack_target={attack_target!r} is not valid; allowed: {', '.join(ATTACK_TARGETS)}"
            )
        self.lam = float(lam)
        self.attack_target = attack_target

    def __repr__(self) -> str:
        return f"SRE(lam={self.lam}, attack_target={self.attack_target!r})"

    @staticmethod
    def _sq(a: Tensor, b: Tensor) -> Tensor:
        return (a - b).pow(2).sum(dim=1).mean()

    def attack_loss(self, logits_adv: Tensor, logits_clean: Tensor | None, y: Tensor) -> Tensor:
        assert logits_clean is not None
        p_adv = logits_adv.softmax(dim=1)
        loss = self._sq(p_adv, logits_clean.detach().softmax(dim=1))
        if self.attack_target == "sre":
            loss = loss + self._sq(p_adv, F.one_hot(y, p_adv.shape[1]).to(p_adv))
        return loss

    def __call__(self, logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor) -> Tensor:
        assert logits_clean is not None
        p_clean = logits_clean.softmax(dim=1)
        natural = self._sq(p_clean, F.one_hot(y, p_clean.shape[1]).to(p_clean))
        return natural + self.lam * self._sq(logits_adv.softmax(dim=1), p_clean)


class CrossEntropyAT(Objective):
    """Madry-style adversarial training: cross-entropy on x_adv only (FGSM-RS / PGD-k AT)."""

    uses_clean = False

    def __repr__(self) -> str:
        return "CrossEntropyAT()"

    def attack_loss(self, logits_adv: Tensor, logits_clean: Tensor | None, y: Tensor) -> Tensor:
        return F.cross_entropy(logits_adv, y)

    def __call__(self, logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits_adv, y)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).float().mean()
