"""L-inf sign-gradient attacks in [0, 1] pixel space: FGSM(-RS), PGD and MIM.

One implementation serves training (FGSM with random start on the SRE objective, Alg. 1
lines 4-6) and evaluation (PGD-k / MIM-k on cross-entropy). Inputs are never normalised here:
normalisation is the model's first layer, so eps = 8/255 means 8/255 of the pixel range.

BatchNorm during the training attack (``bn``): ``train`` (default) crafts the perturbation
against the same batch-statistics function that the loss then trains, as in fast FGSM-RS
training (Wong et al.), but freezes the running statistics so that random-start inputs do not
leak into the statistics used at test time; ``eval`` uses the running statistics. Evaluation
attacks always run with the model in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from frep_lightning.checks import check_choice, check_int

LossFn = Callable[[Tensor], Tensor]
BN_MODES = ("train", "eval")
PRECISIONS = ("fp32", "bf16")


def parse_eps(value: float | int | str, key: str = "attack.eps") -> float:
    """A float, or a string: a number ("0.03") or a fraction of two numbers ("8/255", "2.5/255",
    "8 / 255"), evaluated exactly and rounded once (what configs should say: 8/255 is not 0.0314).

    Raises a ValueError naming ``key`` for anything that is not a number in (0, 1]."""
    try:
        if isinstance(value, str):
            parts = value.split("/")  # Fraction() alone takes "8/255" but neither "2.5/255" nor "8 / 255"
            if len(parts) > 2:
                raise ValueError(value)
            eps = float(Fraction(parts[0]) / Fraction(parts[1])) if len(parts) == 2 else float(Fraction(value))
        else:
            eps = float(value)
    except (ValueError, ZeroDivisionError, TypeError) as err:
        raise ValueError(f"{key}={value!r} is not a number or a fraction like 8/255 or 2.5/255") from err
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"{key}={value!r} must be in (0, 1] (pixel range is [0, 1])")
    return eps


# the L-inf radii of the literature's tables, as k in k/255
PUBLISHED_RADII = (1, 2, 4, 8, 16)


def rounded_eps_warning(eps: float, key: str = "eps") -> str | None:
    """A warning when ``eps`` is a rounded k/255 (0.031 for 8/255): a slightly different ball from the one the
    published numbers use, reported under the same name; None for k/255 exactly or a value not near one."""
    k = round(eps * 255)
    if k not in PUBLISHED_RADII or abs(eps - k / 255) <= 1e-9 or abs(eps - k / 255) > 0.025 * k / 255:
        return None  # 0.03 (4 % off 8/255) or 0.1 are values of their own
    smaller = "smaller" if eps < k / 255 else "larger"
    return (
        f"{key}={eps:g} is a rounded {k}/255 = {k / 255:.6f} ({eps * 255:.3f}/255, a {smaller} threat model than the "
        f"published {k}/255 numbers): give it as the fraction {k}/255"
    )


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Projection onto the eps-ball around ``x`` intersected with the image box [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Per example: the true class's logit minus the largest other one (NaN for NaN logits)."""
    true = logits.gather(1, y.long().view(-1, 1)).squeeze(1)
    return true - logits.scatter(1, y.long().view(-1, 1), float("-inf")).amax(dim=1)


def correct_predictions(logits: Tensor, y: Tensor) -> Tensor:
    """Per example: the true class's logit strictly above every other one. Stricter than ``argmax == y``, which
    counts a tie as correct when the true class has the lower index (Square stops at a tie: margin <= 0 is its
    success) and takes NaN for the largest logit (NaN logits would be a prediction of that class)."""
    return margins(logits, y) > 0


def check_adversarial(x_adv: Tensor, x: Tensor, eps: float, tol: float = 1e-6) -> None:
    """Hard error when an adversarial batch leaves the threat model (never silently report it), NaN
    included: it passes every comparison, and argmax of NaN logits is a class (0), so NaN images from an
    attack (AutoAttack's, a custom one) would otherwise count as robust examples of that class."""
    dist = (x_adv - x).abs().amax().item() if x.numel() else 0.0
    finite = bool(torch.isfinite(x_adv).all())
    if not finite or dist > eps + tol or x_adv.min().item() < 0.0 or x_adv.max().item() > 1.0:
        raise RuntimeError(
            f"adversarial batch outside the threat model: max|x_adv - x| = {dist:.6g} (eps {eps:.6g}), "
            f"range [{x_adv.min().item():.4g}, {x_adv.max().item():.4g}]"
        )


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Batch statistics in forward, running statistics neither read nor written.

    ``track_running_stats=False`` in training mode is exactly that in ``_BatchNorm.forward``: the
    batch is normalised by its own statistics and no running buffer (nor ``num_batches_tracked``)
    is touched, so this forward may run on another CUDA stream alongside a training forward that
    does update them (``fast.streams=2``) without a write race."""
    saved = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in saved:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in saved:
            m.track_running_stats = True


def attack_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast for crafting an evaluation attack: ``bf16`` runs the attack's forwards/backwards in
    bfloat16 (x1.4 faster on an H100, PGD-50 agreeing with fp32 to 0.03 pts on 10k images,
    experiments/results/2026-11-27-eval-speed-h100.md); the accuracy forward stays outside, in fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model.train(training)`` inside, and every submodule's own mode back afterwards: ``model.train(flag)``
    alone would also flip submodules the caller had set apart (e.g. a frozen BatchNorm kept in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Eval mode inside, every submodule's own mode back afterwards (:func:`module_mode`)."""
    return module_mode(model, False)


class SignGradientAttack:
    """Iterated signed-gradient ascent on ``loss_fn(model(x_adv))`` inside the L-inf eps-ball.

    Args:
        eps: radius (float or a string fraction such as "8/255").
        steps: number of gradient steps (1 = FGSM).
        step_size: step per iteration (defaults to eps for one step, 2/255-style eps/4 otherwise).
        random_start: start from a uniform point of the ball (FGSM-RS / PGD) instead of x.
        momentum: MIM decay mu; ``None`` for plain sign steps.
        bn: BatchNorm handling when the model is in training mode, see the module docstring.
    """

    name = "sign"

    def __init__(
        self,
        eps: float | str = "8/255",
        steps: int = 1,
        step_size: float | str | None = None,
        random_start: bool = True,
        momentum: float | None = None,
        bn: str = "train",
    ) -> None:
        self.eps = parse_eps(eps)
        self.steps = steps = check_int("attack.steps", steps, 1)
        if step_size is None:
            self.step_size = self.eps if steps == 1 else self.eps / 4
        else:
            self.step_size = parse_eps(step_size, "attack.step_size")
        self.random_start = bool(random_start)
        if momentum is not None and momentum < 0:
            raise ValueError(f"attack.momentum={momentum!r} must be >= 0")
        self.momentum = momentum
        check_choice("attack.bn", bn, BN_MODES)
        self.bn = bn

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps:.6g}, steps={self.steps}, step_size={self.step_size:.6g}, "
            f"random_start={self.random_start}, momentum={self.momentum}, bn={self.bn!r})"
        )

    @contextmanager
    def _bn_context(self, model: nn.Module) -> Iterator[None]:
        if model.training and self.bn == "eval":
            with eval_mode(model):
                yield
        elif model.training:
            with frozen_bn_stats(model):
                yield
        else:
            yield

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        loss_fn: LossFn,
        generator: torch.Generator | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Adversarial version of ``x`` (detached, in the ball, in [0, 1]).

        ``labels`` (evaluation): an example stays at the first iterate that the model misclassifies; a later
        sign step can lead back to the right class, and the last iterate alone would then count it robust.
        The check reuses each step's forward (no extra cost); examples are independent in eval mode."""
        with torch.inference_mode(False), torch.enable_grad(), self._bn_context(model):
            x = x.detach().clone()
            if self.random_start:
                noise = torch.empty_like(x).uniform_(-self.eps, self.eps, generator=generator)
                x_adv = (x + noise).clamp_(0.0, 1.0)
            else:
                x_adv = x.clone()
            grad_acc = torch.zeros_like(x) if self.momentum is not None else None
            shape = (-1, *([1] * (x.dim() - 1)))  # per example, broadcast over the image
            fooled = None if labels is None else torch.zeros(len(x), dtype=torch.bool, device=x.device).view(shape)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                loss = loss_fn(logits)
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = x_adv.detach()
                if fooled is not None and labels is not None:  # strictly wrong: a bf16 tie may be fp32 correct
                    new = (margins(logits.detach().float(), labels) < 0) & ~fooled.view(-1)
                    if torch.is_autocast_enabled(x.device.type) and bool(new.any()):
                        # reduced precision (evaluation precision=bf16): a bf16 misclassification may be fp32
                        # correct, and the accuracy forward is fp32; freezing such an example would stop the
                        # attack on it. Confirm in fp32, once per newly fooled example.
                        idx = new.nonzero().flatten()
                        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                            new[idx] = margins(model(x_adv[idx]).float(), labels[idx]) < 0
                    fooled |= new.view(shape)
                if grad_acc is not None:
                    norm = grad.abs().flatten(1).sum(dim=1).clamp_min(1e-12).view(shape)
                    grad_acc = self.momentum * grad_acc + grad / norm
                    grad = grad_acc
                stepped = project(x_adv + self.step_size * grad.sign(), x, self.eps)
                x_adv = stepped if fooled is None else torch.where(fooled, x_adv, stepped)
        return x_adv.detach()


def FGSM(
    eps: float | str = "8/255", random_start: bool = True, step_size: float | str | None = None, bn: str = "train"
) -> SignGradientAttack:
    """FGSM with uniform random start and step eps (FReP's training attack, Alg. 1 lines 4-6)."""
    return SignGradientAttack(eps=eps, steps=1, step_size=step_size, random_start=random_start, bn=bn)


def PGD(
    eps: float | str = "8/255",
    steps: int = 10,
    step_size: float | str = "2/255",
    random_start: bool = True,
    bn: str = "train",
) -> SignGradientAttack:
    """Madry et al. PGD-k with random start."""
    return SignGradientAttack(eps=eps, steps=steps, step_size=step_size, random_start=random_start, bn=bn)


def MIM(eps: float | str = "8/255", steps: int = 50, step_size: float | str = "2/255", momentum: float = 1.0):
    """Dong et al. momentum iterative method (no random start)."""
    return SignGradientAttack(eps=eps, steps=steps, step_size=step_size, random_start=False, momentum=momentum)


def cross_entropy_loss(y: Tensor) -> LossFn:
    return lambda logits: nn.functional.cross_entropy(logits, y)
