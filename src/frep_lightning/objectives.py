"""Training objectives: SRE (FReP's default, Eq. 16), cross-entropy AT (FGSM-RS / PGD-k), TRADES, MART.

An objective is two functions of logits: ``attack_loss`` (what the training attack maximises
over x_adv) and ``__call__`` (what the optimizer minimises). A method is then a config choice of
objective + attack + callbacks, not a fork of the training loop. The config group ``objective``
(``conf/objective/``) pairs each objective with its training attack: ``sre`` (FGSM-RS), ``fgsm``
(CE, FGSM-RS), ``pgd`` (CE, PGD-10), ``trades`` and ``mart`` (PGD-10), paper Table VII.

Every objective computes in float32 whatever the logits' dtype: CPU bf16 autocast (e.g.
``trainer.precision=bf16-mixed`` on CPU) leaves softmax / log_softmax in bf16, unlike CUDA autocast,
which would quantise the probabilities to ~3 significant digits.
"""

from __future__ import annotations

import torch
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
    maximises all of L_SRE(W, x~, y): the first term evaluated at x~ plus ``lam`` times the second,
    the same balance as the loss (a sign step is invariant to scaling the whole loss, not to
    re-weighting its terms).
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
        p_adv = logits_adv.float().softmax(dim=1)
        consistency = self._sq(p_adv, logits_clean.detach().float().softmax(dim=1))
        if self.attack_target == "consistency":
            return consistency
        return self._sq(p_adv, F.one_hot(y, p_adv.shape[1]).to(p_adv)) + self.lam * consistency

    def __call__(self, logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor) -> Tensor:
        assert logits_clean is not None
        p_clean = logits_clean.float().softmax(dim=1)
        natural = self._sq(p_clean, F.one_hot(y, p_clean.shape[1]).to(p_clean))
        return natural + self.lam * self._sq(logits_adv.float().softmax(dim=1), p_clean)


class CrossEntropyAT(Objective):
    """Madry-style adversarial training: cross-entropy on x_adv only (FGSM-RS / PGD-k AT)."""

    uses_clean = False

    def __repr__(self) -> str:
        return "CrossEntropyAT()"

    def attack_loss(self, logits_adv: Tensor, logits_clean: Tensor | None, y: Tensor) -> Tensor:
        return F.cross_entropy(logits_adv, y)

    def __call__(self, logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits_adv, y)


class _BetaWeighted(Objective):
    """An objective with one weight ``beta`` >= 0 on its robustness term (TRADES, MART)."""

    def __init__(self, beta: float = 6.0) -> None:
        if not beta >= 0:
            raise ValueError(f"method.objective.beta={beta!r} must be >= 0")
        self.beta = float(beta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta})"


class TRADES(_BetaWeighted):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(softmax(f(x)) || softmax(f(x_adv))), batch mean.

    The attack maximises the KL term against the detached clean output (the reference), as in
    the reference implementation; with ``beta = 6`` as there.
    """

    @staticmethod
    def kl(logits_ref: Tensor, logits_adv: Tensor) -> Tensor:
        """KL(softmax(ref) || softmax(adv)) summed over classes, averaged over the batch."""
        return F.kl_div(
            logits_adv.float().log_softmax(dim=1),
            logits_ref.float().log_softmax(dim=1),
            reduction="batchmean",
            log_target=True,
        )

    def attack_loss(self, logits_adv: Tensor, logits_clean: Tensor | None, y: Tensor) -> Tensor:
        assert logits_clean is not None
        return self.kl(logits_clean.detach(), logits_adv)

    def __call__(self, logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor) -> Tensor:
        assert logits_clean is not None
        return F.cross_entropy(logits_clean.float(), y) + self.beta * self.kl(logits_clean, logits_adv)


class MART(_BetaWeighted):
    """MART (Wang et al. 2020): boosted CE on x_adv plus a KL term weighted by how badly the clean
    input is classified:

    BCE(p_adv, y) + beta * mean_i[ KL(p_clean_i || p_adv_i) * (1 - p_clean_i[y_i]) ],
    BCE = CE(f(x_adv), y) - log(1 - max_{k != y} p_adv[k]).

    The attack maximises CE on x_adv (PGD), as in the reference implementation; the small
    constants (1.0001, 1e-12, 1.0000001) are the reference implementation's, kept so that
    numbers are comparable.
    """

    def attack_loss(self, logits_adv: Tensor, logits_clean: Tensor | None, y: Tensor) -> Tensor:
        return F.cross_entropy(logits_adv, y)

    def __call__(self, logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor) -> Tensor:
        assert logits_clean is not None
        logits_clean, logits_adv = logits_clean.float(), logits_adv.float()
        p_adv = logits_adv.softmax(dim=1)
        # the most likely wrong class under attack
        wrong = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), float("-inf")).argmax(dim=1)
        boosted = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
        p_clean = logits_clean.softmax(dim=1)
        kl = (torch.xlogy(p_clean, p_clean) - p_clean * torch.log(p_adv + 1e-12)).sum(dim=1)
        true_prob = p_clean.gather(1, y[:, None]).squeeze(1)
        return boosted + self.beta * (kl * (1.0000001 - true_prob)).mean()


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).float().mean()
