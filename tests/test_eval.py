"""Robustness evaluation (evaluate.py, eval.py = frep-eval, compression.py): the numbers must survive
scrutiny. Tiny CPU models on synthetic images whose exact L-inf robustness is known in closed form
(linear models), reference PGD/MIM written here independently of ours, AutoAttack and Square from
the package, BatchNorm/eval-mode/threat-model guards, determinism, and frep-eval end to end on a
real tiny frep-train run (model.pt, Lightning checkpoint, refusals).

torchattacks is not used as the reference: installing it pins requests==2.25.1 and downgrades
idna/urllib3 in the shared environment, so ``reference_pgd`` / ``reference_mim`` below follow the
papers (Madry et al. 2018; Dong et al. 2018, as torchattacks implements them) instead.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from torch import Tensor, nn

from frep_lightning.attacks import MIM, PGD
from frep_lightning.compression import compression_report, layer_report
from frep_lightning.config import ConfigError
from frep_lightning.eval import load_model, run, validate_eval_config
from frep_lightning.evaluate import (
    AutoAttackEval,
    EvalAttack,
    SquareEval,
    WhiteBoxAttack,
    build_attacks,
    config_attacks,
    evaluate,
    run_attacks,
    trust_warnings,
)
from frep_lightning.train import config_dir
from frep_lightning.train import run as train_run
from helpers import tiny_run_overrides

REPO = Path(__file__).resolve().parents[1]
EPS = 8 / 255


# -- tiny data and models ----------------------------------------------------------------------
def blobs(n: int, seed: int, classes: int = 10, size: int = 8, noise: float = 0.08) -> tuple[Tensor, Tensor]:
    """Class templates in [0.3, 0.7] plus noise, clamped to [0.25, 0.75]: learnable, and an
    L-inf perturbation up to 0.25 never meets the [0, 1] box (so linear robustness is exact)."""
    templates = torch.rand(classes, 3, size, size, generator=torch.Generator().manual_seed(1234)) * 0.4 + 0.3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (templates[y] + noise * torch.randn(n, 3, size, size, generator=g)).clamp(0.25, 0.75)
    return x, y


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def linear_model(classes: int = 10, size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, classes))


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, Tensor, Tensor]:
    """A briefly trained tiny CNN with BatchNorm and 64 held-out images."""
    x, y = blobs(512, seed=0, noise=0.15)
    torch.manual_seed(0)
    model = train(TinyCNN(), x, y, steps=40, lr=0.05)
    xt, yt = blobs(64, seed=1, noise=0.15)
    return model, xt, yt


def certified_radius(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Exact minimal L-inf perturbation that changes a linear model's decision (box not binding):
    min_j (z_y - z_j) / ||w_y - w_j||_1; 0 for examples already misclassified."""
    lin = model[1]
    with torch.no_grad():
        z = model(x)
        w = lin.weight
        margin = z.gather(1, y[:, None]) - z
        dist = (w[y][:, None, :] - w[None]).abs().sum(-1)
        r = margin / dist
        r[torch.arange(len(y)), y] = float("inf")
        r = r.min(dim=1).values
        r[z.argmax(1) != y] = 0.0
    return r


# -- attacks against ground truth ------------------------------------------------------------------
def test_attacks_break_an_undefended_linear_model_completely_and_never_a_certified_example() -> None:
    x, y = blobs(512, seed=0)
    model = train(linear_model(), x, y, steps=30, lr=0.5)
    xt, yt = blobs(64, seed=1)
    r = certified_radius(model, xt, yt)
    assert (r > 0).all(), "the tiny linear model should classify its test blobs correctly"
    # ~100 % success: eps above every example's exact radius (0.25 keeps the box out of play)
    eps = float(r.max()) * 1.5
    assert eps < 0.25
    attacks = build_attacks(["fgsm", "pgd50", "mim50"], eps=eps, step_size=eps / 4)
    acc = evaluate(model, [(xt, yt)], attacks)
    assert acc["clean"] == 1.0
    assert acc["fgsm"] == acc["pgd50"] == acc["mim50"] == acc["worst_case"] == 0.0
    # soundness at the median radius: an example whose exact radius exceeds eps can never be broken
    eps = float(r.median())
    result = run_attacks(model, [(xt, yt)], build_attacks(["fgsm", "pgd50", "mim50"], eps=eps, step_size=eps / 4))
    certified = r > eps
    assert 0 < int(certified.sum()) < len(yt)
    for name in ("fgsm", "pgd50", "mim50"):
        assert result.correct[name][certified].all(), name
    assert result.worst_case[certified].all()


def test_pgd_is_exact_on_a_binary_linear_model() -> None:
    """Two classes: the optimal L-inf attack is one signed step, so PGD-50 must find it for every
    example whose exact radius is below eps and for no other."""
    x, y = blobs(512, seed=0, classes=2)
    model = train(linear_model(classes=2), x, y, steps=30, lr=0.5)
    xt, yt = blobs(200, seed=1, classes=2)
    r = certified_radius(model, xt, yt)
    eps = float(r[r > 0].median())
    result = run_attacks(model, [(xt, yt)], build_attacks(["pgd50", "fgsm"], eps=eps, step_size=eps / 4))
    expected = r > eps
    assert 0 < int(expected.sum()) < len(yt)
    assert torch.equal(result.correct["pgd50"], expected)
    assert torch.equal(result.correct["fgsm"], expected)  # one step is already optimal for a linear model


def test_pgd50_is_at_most_fgsm_on_a_trained_tiny_cnn(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, xt, yt = cnn
    acc = evaluate(model, [(xt[:32], yt[:32]), (xt[32:], yt[32:])], build_attacks(["fgsm", "pgd50"], eps=EPS))
    assert acc["clean"] >= 0.8
    assert 0.0 < acc["fgsm"] < acc["clean"]  # the eps is meaningful for this model
    assert acc["pgd50"] <= acc["fgsm"]
    assert acc["worst_case"] <= min(acc["pgd50"], acc["fgsm"])
    assert acc["n"] == 64


# -- independent reference implementations ------------------------------------------------------
def reference_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, seed: int) -> Tensor:
    """Madry et al. (as torchattacks.PGD): uniform start, ascend CE by alpha * sign, clip the delta
    to [-eps, eps] and the image to [0, 1]."""
    start = torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(seed))
    adv = (x + start).clamp(0, 1).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = nn.CrossEntropyLoss()(model(adv), y)
        grad = torch.autograd.grad(loss, adv)[0]
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - x, min=-eps, max=eps)
        adv = torch.clamp(x + delta, min=0, max=1).detach()
    return adv


def reference_mim(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, decay: float) -> Tensor:
    """Dong et al. MI-FGSM (as torchattacks.MIFGSM): gradient / its mean |.|, accumulated with decay."""
    momentum = torch.zeros_like(x)
    adv = x.clone().detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = nn.CrossEntropyLoss()(model(adv), y)
        grad = torch.autograd.grad(loss, adv)[0]
        grad = grad / torch.mean(torch.abs(grad), dim=(1, 2, 3), keepdim=True)
        grad = grad + momentum * decay
        momentum = grad
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - x, min=-eps, max=eps)
        adv = torch.clamp(x + delta, min=0, max=1).detach()
    return adv


def test_pgd_and_mim_agree_with_reference_implementations(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, xt, yt = cnn
    alpha = 2 / 255
    ours_pgd = PGD(eps=EPS, steps=50, step_size=alpha).perturb(
        model, xt, lambda out: nn.functional.cross_entropy(out, yt), generator=torch.Generator().manual_seed(7)
    )
    ref_pgd = reference_pgd(model, xt, yt, EPS, alpha, 50, seed=7)
    ours_mim = MIM(eps=EPS, steps=50, step_size=alpha, momentum=1.0).perturb(
        model, xt, lambda out: nn.functional.cross_entropy(out, yt)
    )
    ref_mim = reference_mim(model, xt, yt, EPS, alpha, 50, decay=1.0)
    with torch.no_grad():
        for ours, ref in ((ours_pgd, ref_pgd), (ours_mim, ref_mim)):
            assert (ours - xt).abs().max() <= EPS + 1e-6
            pred_ours, pred_ref = model(ours).argmax(1), model(ref).argmax(1)
            assert int((pred_ours != pred_ref).sum()) <= 2  # "within a few examples"
            assert abs(int((pred_ours == yt).sum()) - int((pred_ref == yt).sum())) <= 2
            same = (ours - ref).flatten(1).abs().amax(1) < 1e-4
            assert int(same.sum()) >= 56  # identical perturbations for (nearly) every example
            assert (pred_ref != yt).sum() > 0  # the attacks do something on this model


# -- Square and AutoAttack from the package --------------------------------------------------------
def test_autoattack_standard_runs_on_16_images_on_cpu(
    cnn: tuple[nn.Module, Tensor, Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    model, xt, yt = cnn
    x16, y16 = xt[:16], yt[:16]
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="frep_lightning"):
        result = run_attacks(model, [(x16, y16)], build_attacks(["pgd50", "aa"], eps=EPS), seed=0)
    seconds = time.perf_counter() - start
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("AutoAttack: ")]
    assert any("robust accuracy after APGD-CE" in m for m in progress), progress  # long runs are not silent
    assert not [r for r in caplog.records if r.name == "auto-attack"]  # its own lines stay out of the report
    attack = AutoAttackEval(EPS)
    assert attack.version == "standard" and attack.components is None
    acc = result.accuracies()
    assert result.n == 16
    assert acc["aa"] <= acc["pgd50"] + 1 / 16  # AutoAttack (APGD-CE first) is at least as strong, up to one image
    assert acc["aa"] < acc["clean"]
    assert acc["worst_case"] <= acc["aa"]
    assert seconds < 60


def test_square_breaks_a_gradient_masked_model_and_the_report_says_so() -> None:
    """A linear model whose input gradient is zero (a detached input): white-box attacks see no
    gradient, black-box Square does not need one. The report must flag gradient masking."""

    class Masked(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x.detach()) + 0.0 * x.sum()

    x, y = blobs(512, seed=0)
    inner = train(linear_model(), x, y, steps=30, lr=0.5)
    xt, yt = blobs(32, seed=1)
    eps = float(certified_radius(inner, xt, yt).max()) * 2
    assert eps < 0.25
    attacks = build_attacks(["fgsm", "pgd20", "square"], eps=eps, step_size=eps / 4, queries=1000)
    result = run_attacks(Masked(inner), [(xt, yt)], attacks)
    acc = result.accuracies()
    assert acc["clean"] == 1.0 and acc["fgsm"] == 1.0  # no gradient, no FGSM step
    assert acc["square"] < acc["pgd20"] - 0.3
    assert any("gradient masking" in w and "Square" in w for w in result.warnings)
    # the same weights without the mask: Square is no longer ahead of PGD, no warning
    clean_result = run_attacks(inner, [(xt, yt)], attacks)
    assert clean_result.accuracies()["pgd20"] == 0.0
    assert not any("Square" in w for w in clean_result.warnings)


def test_trust_warnings_and_the_clean_bound() -> None:
    ok = {"clean": 0.8, "fgsm": 0.5, "pgd50": 0.45, "mim50": 0.46, "square": 0.55, "aa": 0.44, "worst_case": 0.43}
    assert trust_warnings(ok, 100) == []
    assert any("FGSM" in w for w in trust_warnings(ok | {"fgsm": 0.40}, 100))
    assert any("AutoAttack" in w for w in trust_warnings(ok | {"aa": 0.456}, 100))
    assert trust_warnings(ok | {"aa": 0.455}, 100) == []  # within 0.5 pts
    other_pgd = {k: v for k, v in ok.items() if k != "pgd50"} | {"pgd100": 0.44}
    assert any("above PGD-100 0.4400" in w for w in trust_warnings(other_pgd | {"aa": 0.446}, 100))
    assert any("Square" in w for w in trust_warnings(ok | {"square": 0.444}, 100))
    assert trust_warnings(ok | {"square": 0.446}, 100) == []
    with pytest.raises(RuntimeError, match="exceeds clean"):
        trust_warnings(ok | {"pgd50": 0.81}, 100)


# -- guards: eval mode, BatchNorm statistics, threat model, determinism ----------------------------
def test_attacks_run_in_eval_mode_and_leave_batchnorm_statistics_alone(
    cnn: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, xt, yt = cnn
    model.train()  # evaluation must switch it to eval mode itself
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes: list[bool] = []
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda m, i, o: modes.append(m.training)) for m in bns]
    try:
        names = ["fgsm", "pgd5", "mim5", "square", "aa"]
        attacks = build_attacks(names, eps=EPS, queries=20, aa_version="custom", aa_components=["apgd-ce"])
        run_attacks(model, [(xt[:16], yt[:16])], attacks)
        assert model.training  # handed back in the caller's mode
    finally:
        for h in hooks:
            h.remove()
        model.eval()  # the module-scoped fixture stays in eval mode for the other tests
    assert len(modes) > 100 and not any(modes)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the evaluation


def test_evaluation_hands_the_model_back_in_the_callers_mode(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    """run_attacks / evaluate switch to eval mode for the evaluation only: a model passed in training
    mode (frep-train's, a notebook's) comes back training, one in eval mode stays so, a mixed one (a
    BatchNorm kept in eval mode by its owner) gets every submodule's own mode back, and no running
    statistic moved."""
    trained, xt, yt = cnn
    model = copy.deepcopy(trained)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    seen: list[bool] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m.training)) for m in bns]
    attacks = build_attacks(["fgsm", "pgd3"], eps=EPS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(xt[:16], yt[:16])]

    model.train()
    run_attacks(model, batches, attacks)
    assert all(m.training for m in model.modules())
    evaluate(model, batches, attacks)
    assert all(m.training for m in model.modules())

    model.eval()
    run_attacks(model, batches, attacks)
    assert not any(m.training for m in model.modules())

    model.train()
    bns[0].eval()  # frozen by its owner: must not come back in training mode
    modes = {name: m.training for name, m in model.named_modules()}
    run_attacks(model, batches, attacks)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not bns[0].training and bns[1].training and model.training

    for h in hooks:
        h.remove()
    assert len(seen) > 20 and not any(seen)  # every forward of the evaluation ran in eval mode
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # running_mean / running_var / num_batches_tracked untouched
    with torch.no_grad():
        model(xt[:16])  # the caller's training forward: its BatchNorm in training mode updates, the frozen one not
    assert torch.equal(bns[0].running_mean, before["features.1.running_mean"])
    assert not torch.equal(bns[1].running_mean, before["features.4.running_mean"])


class _Cheater(EvalAttack):
    """Leaves the eps-ball: the evaluation must refuse the batch."""

    name = "cheat"
    eps = EPS

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        return (x + 2 * EPS).clamp(0, 1)


class _StatsThief(EvalAttack):
    """Runs a forward in training mode (updates BatchNorm running statistics)."""

    name = "thief"
    eps = EPS

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        model.train()
        with torch.no_grad():
            model(x)
        model.eval()
        return x


def test_threat_model_violation_and_statistics_change_are_errors(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, xt, yt = cnn
    with pytest.raises(RuntimeError, match="outside the threat model"):
        run_attacks(model, [(xt, yt)], {"cheat": _Cheater()})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="BatchNorm statistics"):
        run_attacks(model, [(xt, yt)], {"thief": _StatsThief()})
    model.load_state_dict(state)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run_attacks(model, [(xt * 3, yt)], {})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # NaN passes min/max comparisons
        run_attacks(model, [(xt.clone().index_fill_(0, torch.tensor([0]), torch.nan), yt)], {})


class _Helper(EvalAttack):
    """Descends the loss instead of ascending it (pulls misclassified examples to their label) and records
    how many images it was given."""

    name = "helper"
    eps = 0.25

    def __init__(self) -> None:
        self.given: list[int] = []

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        self.given.append(len(x))
        attack = PGD(eps=self.eps, steps=10, step_size=0.05)
        return attack.perturb(model, x, lambda out: -nn.functional.cross_entropy(out, y), generator=generator)


def test_an_example_is_robust_only_if_also_correct_clean_and_the_worst_case_of_no_attack_is_clean() -> None:
    """Only the examples classified correctly clean are attacked, and per attack an example counts only if
    it is correct both clean and attacked: an attack that would repair a misclassified example gains
    nothing. With no attack at all, worst_case is clean accuracy (an untrained model: ~10 %)."""
    model = linear_model().eval()
    xt, yt = blobs(64, seed=1)
    helper = _Helper()
    result = run_attacks(model, [(xt[:32], yt[:32]), (xt[32:], yt[32:])], {"helper": helper})
    clean = result.correct["clean"]
    assert 0 < int(clean.sum()) < 32  # the untrained model misclassifies most of them
    assert helper.given == [int(clean[:32].sum()), int(clean[32:].sum())]
    assert torch.equal(result.correct["helper"], clean)  # the helped ones stay correct; no other example counts
    alone = run_attacks(model, [(xt, yt)], {})
    assert alone.attacks == [] and torch.equal(alone.worst_case, alone.correct["clean"])
    acc = alone.accuracies()
    assert acc["worst_case"] == acc["clean"] == int(clean.sum()) / 64


class _NaNAttack(EvalAttack):
    """Returns NaN images (what a NaN in an external attack's arithmetic gives): every comparison with eps and
    the box is False for NaN, and argmax of NaN logits is class 0, so they would count as robust class-0 images."""

    name = "nan"
    eps = EPS

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        return torch.full_like(x, float("nan"))


def test_nan_adversarial_images_are_an_error_not_robust_examples() -> None:
    x, y = blobs(512, seed=0)
    model = train(linear_model(), x, y, steps=30, lr=0.5)
    xt, yt = blobs(32, seed=1)
    with pytest.raises(RuntimeError, match="outside the threat model"):
        run_attacks(model, [(xt, yt)], {"nan": _NaNAttack()})


class _Constant(nn.Module):
    """The same logits for every image: all tied (``value`` 0) or all NaN."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return torch.full((len(x), 10), self.value) + 0.0 * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_tied_or_nan_logits_are_not_a_correct_prediction(value: float) -> None:
    """argmax picks the lowest tied index (and NaN as the largest logit): class-0 images of a model whose logits
    tie or are NaN would count as correct and robust, and Square stops at a tie (margin <= 0 is its success)."""
    xt, yt = blobs(20, seed=1)
    assert int((yt == 0).sum()) == 2
    acc = evaluate(_Constant(value), [(xt, yt)], build_attacks(["pgd2"], eps=EPS))
    assert acc["clean"] == acc["pgd2"] == acc["worst_case"] == 0.0


class _Band(nn.Module):
    """Two classes; the wrong one (1) wins only while the mean perturbation from 0.5 lies in (0.3, 0.6) x eps, and
    the input gradient always raises every pixel: a PGD/MIM path crosses the band and leaves it on the far side."""

    def forward(self, x: Tensor) -> Tensor:
        t = (x - 0.5).flatten(1).mean(1) / EPS
        wrong = 4.0 * ((t > 0.3) & (t < 0.6)).float() - 2.0 + (t - t.detach())
        return torch.stack([torch.zeros_like(t), wrong], dim=1)


def test_an_example_that_a_later_step_leads_back_to_its_class_counts_as_broken() -> None:
    """Robustness is the worst case over the iterates too: an example misclassified at some PGD/MIM step is broken,
    even if the last step (which alone used to be judged) is classified correctly again."""
    x, y = torch.full((8, 3, 8, 8), 0.5), torch.zeros(8, dtype=torch.long)
    result = run_attacks(_Band(), [(x, y)], build_attacks(["pgd10", "mim10"], eps=EPS))
    assert result.accuracies() == {"clean": 1.0, "pgd10": 0.0, "mim10": 0.0, "worst_case": 0.0}
    last = PGD(eps=EPS, steps=10).perturb(_Band(), x, lambda out: nn.functional.cross_entropy(out, y))
    assert bool((_Band()(last).argmax(1) == y).all())  # without labels (training): the plain last iterate


class _ReducedPrecisionFooled(nn.Module):
    """Two classes; in fp32 the true class (0) wins at the clean image and loses once every pixel is eps lower,
    under autocast (a bf16 attack's forwards) it loses everywhere: a reduced-precision misclassification that
    the fp32 accuracy forward does not see."""

    def forward(self, x: Tensor) -> Tensor:
        z = (x.flatten(1).mean(1) - 0.5) / EPS + 0.5
        if torch.is_autocast_enabled(x.device.type):
            z = z - 1.0
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_a_bf16_misclassification_does_not_freeze_an_example_that_fp32_classifies_correctly() -> None:
    """precision=bf16: the iterate check runs on the attack's bf16 logits, the accuracy on fp32 ones. An example
    frozen at an iterate that only bf16 misclassifies is never attacked further and counts as robust (fp32),
    although the next steps break it: robust accuracy above the last-iterate number of before."""
    x, y = torch.full((8, 3, 8, 8), 0.5), torch.zeros(8, dtype=torch.long)
    model = _ReducedPrecisionFooled()
    for precision in ("fp32", "bf16"):
        acc = run_attacks(model, [(x, y)], build_attacks(["pgd10"], eps=EPS, precision=precision)).accuracies()
        assert acc == {"clean": 1.0, "pgd10": 0.0, "worst_case": 0.0}, precision


def test_zero_input_gradients_are_reported_as_gradient_masking(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    """Logits x 1e4 saturate the softmax: the cross-entropy gradient is exactly 0, FGSM/PGD cannot move any image
    and report clean accuracy as robust; without Square/AutoAttack nothing else would say so."""
    model, xt, yt = cnn

    class Scaled(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return model(x) * 1e4

    attacks = build_attacks(["fgsm", "pgd5"], eps=EPS)
    masked = run_attacks(Scaled(), [(xt[:32], yt[:32]), (xt[32:], yt[32:])], attacks)
    acc = masked.accuracies()
    assert acc["pgd5"] == acc["clean"]
    assert any("input gradient of the cross-entropy is exactly zero" in w for w in masked.warnings)
    assert not any("exactly zero" in w for w in run_attacks(model, [(xt, yt)], attacks).warnings)


def test_a_rounded_eps_is_warned_about(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    """eps 0.031 is a smaller ball than the 8/255 its numbers get compared with: said in the report."""
    from frep_lightning.attacks import rounded_eps_warning

    model, xt, yt = cnn
    warned = run_attacks(model, [(xt[:16], yt[:16])], build_attacks(["fgsm"], eps=0.031)).warnings
    assert [w for w in warned if "a rounded 8/255" in w and "7.905/255, a smaller threat model" in w]
    assert not run_attacks(model, [(xt[:16], yt[:16])], build_attacks(["fgsm"], eps="8/255")).warnings
    assert "a larger threat model" in str(rounded_eps_warning(0.0314)) and "4/255" in str(rounded_eps_warning(0.0157))
    for eps in (8 / 255, 2 / 255, 0.03, 0.1, 0.3, 0.5, 1.0):  # exact fractions, and values of their own
        assert rounded_eps_warning(eps) is None, eps


def test_same_seed_same_numbers(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, xt, yt = cnn
    names = ["pgd10", "square"]

    def once(seed: int) -> dict[str, Tensor]:
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        attacks = build_attacks(names, eps=EPS, queries=30, seed=seed, restarts=2)
        return run_attacks(model, [(xt, yt)], attacks, seed=seed).correct

    a, b = once(0), once(0)
    for name in ["clean", *names]:
        assert torch.equal(a[name], b[name]), name
    # a number does not depend on which other attacks ran alongside
    alone = run_attacks(model, [(xt, yt)], build_attacks(["pgd10"], eps=EPS, restarts=2), seed=0).correct
    assert torch.equal(alone["pgd10"], a["pgd10"])


def test_restarts_only_lower_pgd_accuracy(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, xt, yt = cnn
    one = run_attacks(model, [(xt, yt)], build_attacks(["pgd5"], eps=EPS, restarts=1), seed=3).correct["pgd5"]
    three = run_attacks(model, [(xt, yt)], build_attacks(["pgd5"], eps=EPS, restarts=3), seed=3).correct["pgd5"]
    assert not (three & ~one).any()  # restart 1 is the same draw; later restarts can only break more


def test_each_restart_attacks_the_examples_no_earlier_restart_broke(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    """restarts=k: k random starts, each on the examples still standing (the first on every example
    classified correctly clean); an example counts as robust only if no restart broke it."""
    model, xt, yt = cnn
    for restarts in (1, 3):
        attack = build_attacks(["pgd2"], eps=EPS, restarts=restarts)["pgd2"]
        assert isinstance(attack, WhiteBoxAttack) and attack.describe()["restarts"] == restarts
        given: list[int] = []
        perturb = attack.attack.perturb

        def spy(
            net: nn.Module, x: Tensor, *args: Any, perturb: Any = perturb, given: list[int] = given, **kwargs: Any
        ) -> Tensor:
            given.append(len(x))
            return perturb(net, x, *args, **kwargs)

        attack.attack.perturb = spy  # type: ignore[method-assign]
        result = run_attacks(model, [(xt, yt)], {"pgd2": attack}, seed=1)
        standing = int(result.correct["pgd2"].sum())
        assert 0 < standing < int(result.correct["clean"].sum())  # PGD-2 breaks some, not all
        assert len(given) == restarts and given[0] == int(result.correct["clean"].sum())
        assert given == sorted(given, reverse=True) and standing <= given[-1]


def test_square_eval_is_the_packages_square_attack() -> None:
    x, y = blobs(512, seed=0)
    model = train(linear_model(), x, y, steps=30, lr=0.5)
    xt, yt = blobs(32, seed=1)
    eps = float(certified_radius(model, xt, yt).max()) * 1.5
    attack = SquareEval(eps, queries=1000, seed=0)
    x_adv = attack.run(model, xt, yt, torch.Generator())
    assert (x_adv - xt).abs().max() <= eps + 1e-6
    with torch.no_grad():  # some, not all, broken: the comparison below is of real searches (p_init matters)
        assert 0 < int((model(x_adv).argmax(1) != yt).sum()) < len(yt)
    from pyautoattack.square import SquareAttack

    torch.manual_seed(0)
    ref = SquareAttack(model, norm="Linf", n_queries=1000, eps=eps, p_init=0.8, seed=0, resc_schedule=False)
    with torch.no_grad():
        assert torch.equal(ref.perturb(xt, yt), x_adv)


def test_attack_names_and_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        build_attacks(["pgd50", "cw"])
    with pytest.raises(ValueError, match="restarts"):
        build_attacks(["pgd50"], restarts=0)
    with pytest.raises(ValueError, match="queries"):
        build_attacks(["square"], queries=0)
    with pytest.raises(ValueError, match="aa.components"):
        build_attacks(["aa"], aa_version="custom")
    with pytest.raises(ValueError, match=r"eval\.attacks"):
        config_attacks({"attacks": ["pgd50", "nope"]})
    pgd = build_attacks(["clean", "pgd50", "pgd50"], eps="8/255")
    assert list(pgd) == ["pgd50"]
    d = pgd["pgd50"].describe()
    assert d["steps"] == 50 and d["step_size"] == pytest.approx(2 / 255) and d["random_start"]
    mim = build_attacks(["mim50"])["mim50"].describe()
    assert mim["momentum"] == 1.0 and not mim["random_start"] and mim["steps"] == 50
    fgsm = build_attacks(["fgsm"])["fgsm"].describe()
    assert fgsm["steps"] == 1 and fgsm["step_size"] == pytest.approx(EPS) and not fgsm["random_start"]


def test_bf16_attack_matches_fp32_on_a_tiny_cnn(cnn: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, xt, yt = cnn
    fp32 = run_attacks(model, [(xt, yt)], build_attacks(["pgd10"], eps=EPS, precision="fp32"))
    bf16 = run_attacks(model, [(xt, yt)], build_attacks(["pgd10"], eps=EPS, precision="bf16"))
    assert torch.equal(fp32.correct["clean"], bf16.correct["clean"])  # predictions are fp32 either way
    assert abs(int(fp32.correct["pgd10"].sum()) - int(bf16.correct["pgd10"].sum())) <= 3


# -- sparsity / size report ------------------------------------------------------------------------
def test_compression_report_exact_counts_and_sizes() -> None:
    conv = torch.arange(1.0, 4 * 3 * 3 * 3 + 1).view(4, 3, 3, 3)
    conv[1] = 0.0  # one whole output channel pruned (structured)
    conv[0, 0, 0, :] = 0.0  # three more zeros
    fc = torch.zeros(10, 8)
    fc[0, 0] = 1.0
    state = {
        "conv.weight": conv,
        "bn.weight": torch.ones(4),
        "bn.running_mean": torch.zeros(4),
        "fc.weight": fc,
        "fc.bias": torch.zeros(10),
    }
    rep = compression_report(state)
    c = rep["layers"]["conv"]
    assert c["numel"] == 108 and c["zeros"] == 27 + 3 and c["nonzero"] == 78
    assert c["live_channels"] == 3 and c["channels"] == 4
    assert c["dense_bytes"] == 108 * 4
    assert c["csr_bytes"] == 78 * (4 + 4) + 5 * 4  # values + int32 column indices + row pointers
    assert c["bitmask_bytes"] == 14 + 78 * 4  # ceil(108 / 8) bytes of mask + values
    f = rep["layers"]["fc"]
    assert f["nonzero"] == 1 and f["live_channels"] == 1 and f["sparsity"] == 79 / 80
    assert rep["sparsity"] == (30 + 79) / (108 + 80)
    assert rep["nonzero"] == 79
    sizes = rep["sizes"]
    assert sizes["other_bytes"] == (4 + 4 + 10) * 4
    assert sizes["model_dense_bytes"] == (108 + 80 + 18) * 4
    sparse_fc = min(1 * 8 + 11 * 4, 10 + 4)
    assert sizes["model_sparse_bytes"] == min(c["csr_bytes"], c["bitmask_bytes"]) + sparse_fc + 72
    assert sizes["live_channels"] == 4 and sizes["channels"] == 14
    # only the layers pruning selected count towards the global sparsity
    only_conv = compression_report(state, prunable=["conv"])
    assert only_conv["sparsity"] == 30 / 108 and not only_conv["layers"]["fc"]["prunable"]
    assert only_conv["sizes"]["other_bytes"] == (4 + 4 + 10 + 80) * 4
    assert only_conv["sizes"]["other_numel"] == 4 + 4 + 10 + 80  # the unselected fc weight counts as "other"
    assert (only_conv["sizes"]["live_channels"], only_conv["sizes"]["channels"]) == (3, 4)  # selected layers only
    with pytest.raises(KeyError, match="nope"):
        compression_report(state, prunable=["nope"])
    assert layer_report(torch.zeros(3, 5))["live_channels"] == 0


# -- frep-eval end to end on a real tiny run ---------------------------------------------------------
def _train_cfg(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _eval_cfg(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_run(pack_root: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """frep-train on 32 real images for 2 epochs (pruned to 90 % after the first), with the final
    evaluation asked for two extra attacks (eval.attacks)."""
    run_dir = tmp_path_factory.mktemp("tiny-run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = _train_cfg(
        *tiny_run_overrides(pack_root, cache_dir),
        "val_attack_steps=1",
        "logger=csv",
        "eval.n_test=20",
        "eval.pgd_steps=3",
        "eval.attacks=[fgsm,mim5]",
    )
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    try:
        summary = train_run(cfg)
    finally:
        torch.set_num_threads(threads)
    return run_dir, summary


def test_train_eval_attacks_add_numbers_to_the_summary(tiny_run: tuple[Path, dict]) -> None:
    run_dir, summary = tiny_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    for key in ("clean_acc", "pgd_acc", "fgsm_acc", "mim5_acc", "worst_case_acc"):
        assert key in on_disk
    assert on_disk["worst_case_acc"] <= min(on_disk["pgd_acc"], on_disk["fgsm_acc"], on_disk["mim5_acc"])
    assert on_disk["pgd_acc"] <= on_disk["clean_acc"]
    with pytest.raises(ValueError, match=r"eval\.attacks"):
        train_run(_train_cfg("eval.attacks=[pgd50,bogus]"))


ALL = "attacks=[clean,fgsm,pgd50,mim50,square,aa]"
FAST = ("n_test=20", "queries=50", "aa.version=custom", "aa.components=[apgd-ce,square]", "batch_size=8", "restarts=2")


def test_frep_eval_end_to_end_on_a_run_dir(tiny_run: tuple[Path, dict], pack_root: Path, cache_dir: Path) -> None:
    run_dir, summary = tiny_run
    cfg = _eval_cfg(f"ckpt={run_dir}", ALL, *FAST, "logger=csv", f"data.cache_dir={cache_dir}")
    report = run(cfg)
    written = json.loads((run_dir / "eval.json").read_text())
    assert written == json.loads(json.dumps(report))
    for name in ("clean", "fgsm", "pgd50", "mim50", "square", "aa", "worst_case"):
        assert 0.0 <= written[name] <= written["clean"] <= 1.0
    assert written["worst_case"] <= min(written[k] for k in ("fgsm", "pgd50", "mim50", "square", "aa"))
    assert written["correct"]["worst_case"] == round(written["worst_case"] * 20)
    assert written["n"] == 20 and written["seed"] == 0 and written["eps"] == pytest.approx(EPS)
    assert written["attacks"] == ["fgsm", "pgd50", "mim50", "square", "aa"]
    # the file describes the same model.pt and test subset as the training summary
    assert written["clean"] == pytest.approx(summary["clean_acc"])
    assert written["sparsity"] == pytest.approx(summary["sparsity"])
    assert len(written["layers"]) == 21 and all(r["prunable"] for r in written["layers"].values())
    assert written["sizes"]["model_sparse_bytes"] < written["sizes"]["model_dense_bytes"]
    assert written["attack_settings"]["aa"]["components"] == ["apgd-ce", "square"]
    # what ran is what was asked: every attack at eps (not the step size), PGD with its restarts
    settings = written["attack_settings"]
    assert all(settings[name]["eps"] == pytest.approx(EPS, rel=1e-9) for name in written["attacks"])
    assert (settings["pgd50"]["steps"], settings["pgd50"]["restarts"]) == (50, 2)
    assert settings["pgd50"]["step_size"] == pytest.approx(2 / 255, rel=1e-9) and settings["pgd50"]["random_start"]
    assert settings["square"]["queries"] == 50
    metrics = next((run_dir / "eval_logs").rglob("metrics.csv")).read_text()
    assert "eval/pgd50" in metrics and "eval/worst_case" in metrics
    # same seed, same numbers
    again = run(_eval_cfg(f"ckpt={run_dir}", ALL, *FAST, "logger=none", f"output={run_dir / 'again.json'}"))
    for name in ("clean", "fgsm", "pgd50", "mim50", "square", "aa", "worst_case"):
        assert again[name] == report[name]


def test_frep_eval_says_when_it_reads_another_kind_of_data_than_the_run(
    tiny_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """A run trained on the offline JPEG pack and evaluated where data.root holds torchvision's files (the
    original pixels) gets other numbers for the same model: eval.json records the format and warns."""
    import shutil

    run_dir, summary = tiny_run
    assert summary["data_format"] == "pack"
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.yaml", "model.pt"):
        shutil.copy(run_dir / name, copy / name)
    args = (f"ckpt={copy}", "attacks=[clean]", "n_test=20", "logger=none")
    (copy / "summary.json").write_text(json.dumps({**summary, "data_format": "pack"}))
    same = run(_eval_cfg(*args))
    assert same["data_format"] == "pack" and not [w for w in same["warnings"] if "format" in w]
    (copy / "summary.json").write_text(json.dumps({**summary, "data_format": "torchvision"}))
    other = run(_eval_cfg(*args))
    assert [w for w in other["warnings"] if "trained on cifar10 in torchvision format, this evaluation reads" in w]
    assert other["clean"] == same["clean"]  # a warning only: the numbers are what they are


def test_frep_eval_slim_evaluates_and_writes_the_cut_network(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    """``slim=true``: the report says what was cut, the numbers are the cut network's (equal to the full
    one's: only zero channels go), and model_slim.pt2 runs without the package's classes."""
    run_dir, _ = tiny_run
    args = (f"ckpt={run_dir}", "attacks=[clean,fgsm]", "n_test=20", "logger=none")
    full = run(_eval_cfg(*args, f"output={tmp_path / 'full.json'}"))
    cut = run(_eval_cfg(*args, "slim=true", f"output={tmp_path / 'slim.json'}"))
    assert full["slim"] is None
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    model = load_model(run_dir / "model.pt", run_cfg, run_cfg.model)
    before, after = cut["slim"]["parameters"]
    assert before == sum(p.numel() for p in model.parameters()) and after <= before
    assert 0 < cut["slim"]["macs"][1] <= cut["slim"]["macs"][0]
    assert cut["clean"] == full["clean"] and cut["fgsm"] == full["fgsm"]
    assert Path(cut["slim"]["program"]) == tmp_path / "slim_model_slim.pt2"  # named after output=slim.json
    program = torch.export.load(cut["slim"]["program"]).module()
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(program(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"slim='yes' must be true or false"):
        run(_eval_cfg(*args, "slim=yes"))


def test_frep_eval_on_the_lightning_checkpoint_matches_model_pt(tiny_run: tuple[Path, dict]) -> None:
    run_dir, _ = tiny_run
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    plain = load_model(run_dir / "model.pt", run_cfg, run_cfg.model).state_dict()
    notes: list[str] = []
    merged = load_model(run_dir / "checkpoints" / "last.ckpt", run_cfg, run_cfg.model, notes).state_dict()
    assert notes == []  # saved at the last epoch end: pruned, ensemble BN re-estimated
    assert plain.keys() == merged.keys()
    for k in plain:
        assert torch.equal(plain[k], merged[k]), k
    report = run(_eval_cfg(f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "attacks=[pgd10]", "n_test=20"))
    assert (run_dir / "checkpoints" / "eval.json").is_file()
    assert report["model_path"].endswith("last.ckpt") and report["n"] == 20


def test_frep_eval_refuses_files_that_are_not_ours(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = tiny_run
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    pickled = tmp_path / "pickled.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a whole pickled module: code, not a state_dict
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    for path, why in ((pickled, "weights_only"), (garbage, "weights_only"), (other, "do not fit")):
        with pytest.raises(ValueError, match=f"not a model of ours.*{why}"):
            run(_eval_cfg(f"ckpt={path}", "attacks=[clean]"))
    with pytest.raises(ConfigError, match="ckpt="):
        validate_eval_config(_eval_cfg())
    with pytest.raises(ConfigError, match="attacks"):
        validate_eval_config(_eval_cfg(f"ckpt={run_dir}", "attacks=[pgd50,cw]"))
    with pytest.raises(ConfigError, match="precision"):
        validate_eval_config(_eval_cfg(f"ckpt={run_dir}", "precision=fp8"))
    with pytest.raises(ConfigError, match="n_test"):
        validate_eval_config(_eval_cfg(f"ckpt={run_dir}", "n_test=0"))
    with pytest.raises(  # and which width it is: the run's own
        ValueError, match=r"do not fit model 'resnet18' \(width 16\): size mismatch.*; it fits model\.width=4: pass"
    ):
        run(_eval_cfg(f"ckpt={run_dir}", "attacks=[clean]", "model.width=16"))
    over = run(_eval_cfg(f"ckpt={run_dir}", "attacks=[clean]", "n_test=20000", f"output={tmp_path / 'over.json'}"))
    assert over["warnings"][0] == f"n_test=20000 asked, but the test split has {over['n']} images: all evaluated"
    with pytest.raises(ConfigError, match=r"foo is not a config key of eval.*aa\.versio is not a key of aa"):
        validate_eval_config(_eval_cfg(f"ckpt={run_dir}", "+foo=1", "+aa.versio=plus"))
    lone = tmp_path / "elsewhere" / "lone"  # no config.yaml in it or one level up
    lone.mkdir(parents=True)
    (lone / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())
    with pytest.raises(ConfigError, match="model.name"):
        run(_eval_cfg(f"ckpt={lone}", "attacks=[clean]"))
    # a bare model.pt evaluates once model and data are named on the command line
    report = run(
        _eval_cfg(
            f"ckpt={lone}",
            "attacks=[clean]",
            "n_test=10",
            "model.name=resnet18",
            "model.width=4",
            "data.name=cifar10",
            "logger=none",
        )
    )
    assert report["n"] == 10 and report["config_path"] is None


def test_a_single_attack_name_is_refused_naming_the_key(tmp_path: Path) -> None:
    """``attacks=pgd50`` (no brackets) is a string: refused as such, not read letter by letter as
    five unknown attacks; frep-train names its key eval.attacks."""
    from frep_lightning.config import validate_train_config

    missing = tmp_path / "nothing-here"
    msg = r"^attacks='pgd50' must be a list of attack names, e\.g\. attacks=\[pgd50\]$"
    with pytest.raises(ConfigError, match=msg):
        validate_eval_config(_eval_cfg(f"ckpt={missing}", "attacks=pgd50"))
    with pytest.raises(ConfigError, match=msg):
        run(_eval_cfg(f"ckpt={missing}", "attacks=pgd50"))  # before the (missing) file is looked for
    with pytest.raises(
        ValueError, match=r"^eval\.attacks='aa' must be a list of attack names, e\.g\. eval\.attacks=\[aa\]$"
    ):
        config_attacks({"attacks": "aa"})
    with pytest.raises(ConfigError, match=r"eval\.attacks='pgd50' must be a list of attack names"):
        validate_train_config(_train_cfg("eval.attacks=pgd50"))
    with pytest.raises(ConfigError, match=r"^attacks=7 must be a list of attack names"):
        validate_eval_config(_eval_cfg(f"ckpt={missing}", "attacks=7"))
    assert config_attacks({"attacks": None}) == {} and config_attacks({"attacks": []}) == {}
    assert list(config_attacks({"attacks": ["pgd5", "fgsm"]})) == ["pgd5", "fgsm"]
    validate_eval_config(_eval_cfg(f"ckpt={missing}", "attacks=[pgd50]"))


def test_device_cuda_without_cuda_is_a_config_error_before_any_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(tmp_path / "nothing-here")  # reading it would be a FileNotFoundError, not a ConfigError
    if not torch.cuda.is_available():  # this machine as it is
        with pytest.raises(
            ConfigError, match=r"^device='cuda' but CUDA is not available on this machine; use device=cpu"
        ):
            run(_eval_cfg(f"ckpt={missing}", "device=cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(ConfigError, match=f"^device='{device}' but CUDA is not available on this machine"):
            run(_eval_cfg(f"ckpt={missing}", f"device={device}"))
    with pytest.raises(ConfigError, match=r"device='gpu' is not a torch device"):
        validate_eval_config(_eval_cfg(f"ckpt={missing}", "device=gpu"))
    for device in ("cpu", "auto"):
        validate_eval_config(_eval_cfg(f"ckpt={missing}", f"device={device}"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("cuda", "cuda:0", "cuda:1"):
        validate_eval_config(_eval_cfg(f"ckpt={missing}", f"device={device}"))
    with pytest.raises(ConfigError, match=r"^device='cuda:2' but this machine has 2 CUDA device\(s\): cuda:0, cuda:1$"):
        run(_eval_cfg(f"ckpt={missing}", "device=cuda:2"))


def _evaluated_images(monkeypatch: pytest.MonkeyPatch, cfg) -> tuple[dict, Tensor, Tensor]:
    """frep-eval's report and the test images (with labels) it actually evaluated."""
    import frep_lightning.eval as eval_app

    seen: list[tuple[Tensor, Tensor]] = []

    def spy(model, batches, attacks, **kwargs):
        batches = list(batches)
        seen.extend(batches)
        return run_attacks(model, batches, attacks, **kwargs)

    monkeypatch.setattr(eval_app, "run_attacks", spy)
    report = run(cfg)
    return report, torch.cat([x for x, _ in seen]), torch.cat([y for _, y in seen])


def _subset(data_cfg, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """The test images the datamodule (as frep-train's fit-end evaluation builds it) gives for ``seed``."""
    from hydra.utils import instantiate

    node = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    node.n_test, node.seed, node.augment = n, seed, False
    datamodule = instantiate(node)
    datamodule.setup("test")
    batches = list(datamodule.test_dataloader())
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_frep_eval_tests_the_runs_own_subset(
    tiny_run: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n_test=N picks the class-balanced subset with the run's data.seed, the one its summary.json was
    evaluated on; ``seed`` (attacks) does not move it. Without a run config, ``seed`` picks it."""
    run_dir, _ = tiny_run
    seeded = tmp_path / "run-seed-1"
    seeded.mkdir()
    (seeded / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    run_cfg.seed, run_cfg.data.seed = 1, 1  # what frep-train seed=1 saves (data.seed: ${seed}, resolved)
    OmegaConf.save(run_cfg, seeded / "config.yaml")
    x1, y1 = _subset(run_cfg.data, 20, seed=1)
    x0, _ = _subset(run_cfg.data, 20, seed=0)
    assert not torch.equal(x0, x1)  # the seeds pick different images here, so the check below means something

    report, x, y = _evaluated_images(monkeypatch, _eval_cfg(f"ckpt={seeded}", "attacks=[clean]", "n_test=20"))
    assert torch.equal(x, x1) and torch.equal(y, y1)
    assert report["subset_seed"] == 1 and report["seed"] == 0
    assert json.loads((seeded / "eval.json").read_text())["subset_seed"] == 1
    report, x, _ = _evaluated_images(
        monkeypatch, _eval_cfg(f"ckpt={seeded}", "attacks=[clean]", "n_test=20", "seed=5", "logger=none")
    )
    assert torch.equal(x, x1) and report["subset_seed"] == 1 and report["seed"] == 5

    lone = tmp_path / "lone"  # no config.yaml here or one level up: seed picks the subset
    lone.mkdir()
    (lone / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())
    bare = [f"ckpt={lone}", "attacks=[clean]", "n_test=20", "model.name=resnet18", "model.width=4", "logger=none"]
    data = [f"data.{k}={run_cfg.data[k]}" for k in ("name", "root", "cache_dir")]
    report, x, _ = _evaluated_images(monkeypatch, _eval_cfg(*bare, *data, "seed=1"))
    assert torch.equal(x, x1) and report["subset_seed"] == 1 and report["config_path"] is None


def test_frep_eval_evaluates_the_whole_test_split_by_default(
    tiny_run: tuple[Path, dict], pack_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n_test=null (the default): every image of the test split, each once, in the split's order (the
    robust accuracy of a paper table is over the full test set, not a subset)."""
    import numpy as np

    import frep_lightning.eval as eval_app

    run_dir, _ = tiny_run
    seen: list[Tensor] = []

    def spy(model, batches, attacks, **kwargs):
        batches = list(batches)
        seen.extend(y for _, y in batches)
        return run_attacks(model, batches[:1], attacks, **kwargs)  # the count is the point, not the numbers

    monkeypatch.setattr(eval_app, "run_attacks", spy)
    cfg = _eval_cfg(f"ckpt={run_dir}", "attacks=[clean]", "logger=none", f"output={tmp_path / 'all.json'}")
    assert cfg.n_test is None and cfg.eps == "8/255"
    run(cfg)
    with np.load(pack_root / "cifar10" / "test.npz") as split:
        labels = torch.from_numpy(split["labels"])
    assert len(labels) == 10000 and torch.equal(torch.cat(seen), labels)


def test_python_m_frep_lightning_eval(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = tiny_run
    out = tmp_path / "cli.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "frep_lightning.eval",
            f"ckpt={run_dir}",
            "attacks=[clean,fgsm]",
            "n_test=10",
            f"output={out}",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "worst_case" in proc.stdout and "sparsity per layer" in proc.stdout
    assert set(json.loads(out.read_text())) >= {"clean", "fgsm", "worst_case", "sparsity", "eps", "n", "seed", "layers"}


# -- the GPU timing script runs on CPU ----------------------------------------------------------------
def test_eval_speed_script_runs_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("eval_speed", REPO / "experiments" / "eval_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--n", "8", "--width", "4", "--device", "cpu", "--batch-size", "8", "--steps", "3"])
    text = capsys.readouterr().out
    assert "| fp32 | 8 |" in text and "| bf16 | 8 |" in text
    assert out["fp32_seconds"] > 0 and out["bf16_seconds"] > 0 and out["flips"] <= 8


def test_a_checkpoint_unlike_the_export_is_flagged() -> None:
    from frep_lightning.eval import checkpoint_notes

    run_cfg = OmegaConf.create(
        {"pruning": {"_target_": "frep_lightning.pruning.RobustPruning", "sparsity": 0.9, "epoch": 30}}
    )
    early = {
        "global_step": 7,
        "callbacks": {"RobustPruning": {"pruned": False}, "TemporalEnsemble": {"bn_fresh": False}},
    }
    notes = checkpoint_notes(early, run_cfg)
    assert len(notes) == 2
    assert (
        "step 7) was saved before the run pruned (pruning.epoch=30, target 0.9): the model evaluated is dense"
        in notes[0]
    )
    assert "BatchNorm statistics in this checkpoint (saved mid-epoch) predate its latest weights" in notes[1]
    late = {"callbacks": {"RobustPruning{'sparsity': 0.9}": {"pruned": True}, "TemporalEnsemble": {"bn_fresh": True}}}
    assert checkpoint_notes(late, run_cfg) == []
    assert checkpoint_notes(early, OmegaConf.create({"pruning": None}))[0].startswith("the ensemble's BatchNorm")


def test_width_hint_names_the_class_count_when_the_config_has_another(tmp_path: Path) -> None:
    """A CIFAR-10 width-4 model.pt evaluated as a CIFAR-100 width-16 model: ``model.width=4`` alone would
    still not fit (the classifier has 10 rows, the config 100), so the hint names the 10 classes too."""
    from frep_lightning.models import build_model

    torch.save(build_model("resnet18", num_classes=10, width=4).state_dict(), tmp_path / "model.pt")
    model_cfg = OmegaConf.create(
        {"_target_": "frep_lightning.models.build_model", "name": "resnet18", "width": 16, "num_classes": 100}
    )
    with pytest.raises(ValueError, match=r"it fits model\.width=4 with 10 classes \(data\.name\): pass"):
        load_model(tmp_path / "model.pt", None, model_cfg)


def test_a_model_that_does_not_fit_its_file_is_a_config_error_without_traceback(
    tiny_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """``frep-eval ckpt=<run> model.width=8`` on a width-4 run: the message (it names model.width) is the whole
    output, as for every other bad ckpt=/key, not the end of a Hydra traceback."""
    from frep_lightning.config import exit_on_config_error

    run_dir, _ = tiny_run
    cfg = _eval_cfg(f"ckpt={run_dir}", "attacks=[clean]", "model.width=8", f"output={tmp_path / 'eval.json'}")
    with pytest.raises(SystemExit, match=r"^frep-eval: ckpt=.* is not a model of ours \(its tensor shapes do not fit"):
        exit_on_config_error("frep-eval", lambda: run(cfg), (ConfigError, FileNotFoundError))  # as eval.main does


def test_attacks_run_without_cudnn_autotuning_and_restore_the_flag() -> None:
    """The attacked subset changes size from batch to batch; cudnn.benchmark would re-time every convolution for
    each new size (55 s instead of seconds for PGD-50 on 10k images on an H100). Off while attacking, restored after."""
    seen: list[bool] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = linear_model()

        def forward(self, x: Tensor) -> Tensor:
            seen.append(torch.backends.cudnn.benchmark)
            return self.inner(x)

    x, y = blobs(32, seed=0)
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        run_attacks(Spy(), [(x, y)], build_attacks(["pgd50"], eps=0.05, step_size=0.01))
        assert seen and not any(seen), "cuDNN autotuning must be off during the evaluation"
        assert torch.backends.cudnn.benchmark is True, "the caller's setting must come back"
    finally:
        torch.backends.cudnn.benchmark = before
