"""Clean and robust accuracy of an exported model, with the checks that make the number believable.

Attacks, by the names configs and ``eval.json`` use (``ATTACKS``; ``pgd<k>`` / ``mim<k>`` for any
k work too):

- ``fgsm``: one signed step of size eps from x (no random start);
- ``pgd50``: PGD-50, step 2/255, uniform random start, ``restarts`` restarts (Madry et al.);
- ``mim50``: MIM-50, momentum 1.0, step 2/255, from x (Dong et al.);
- ``square``: Square Attack, ``queries`` queries (black-box), from ``pyautoattack``;
- ``aa``: AutoAttack ``standard`` (APGD-CE, APGD-T, FAB-T, Square), from ``pyautoattack``.

FGSM/PGD/MIM are :mod:`frep_lightning.attacks` (the training attacks' siblings); Square and
AutoAttack are the reference package, not rewritten.

What makes the numbers trustworthy (each is enforced here, not only tested):

- the model is in eval mode for every forward and no buffer (BatchNorm running statistics)
  may change during the evaluation: a change is an error;
- every adversarial batch is checked against the threat model (``check_adversarial``: max
  |x_adv - x| <= eps + 1e-6 and 0 <= x_adv <= 1): a violation is an error;
- an example is robust to an attack only if it is classified correctly both clean and under
  the attack, so every robust accuracy is <= clean accuracy by construction, and ``worst_case``
  counts an example only if every attack run failed on it; correct means the true logit strictly
  above every other (a tie or NaN logits are wrong), and FGSM/PGD/MIM keep an example at the first
  iterate that is misclassified (a later step must not count it robust again);
- consistency checks between attacks (:func:`trust_warnings`) and exactly-zero input gradients
  flag gradient masking;
- every attack has its own random generator derived from ``seed`` and its name, so the same
  seed gives the same numbers, and a number does not depend on which other attacks ran.

Precision: ``bf16`` runs the forward/backward of FGSM/PGD/MIM under bf16 autocast (faster on
GPUs); every prediction that decides correctness, Square and AutoAttack stay fp32. Reports
must say when bf16 was used.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from frep_lightning.attacks import (
    FGSM,
    MIM,
    PGD,
    PRECISIONS,
    SignGradientAttack,
    attack_precision,
    check_adversarial,
    correct_predictions,
    cross_entropy_loss,
    eval_mode,
    parse_eps,
    rounded_eps_warning,
)
from frep_lightning.checks import check_choice, check_int

log = logging.getLogger("frep_lightning")

ATTACKS = ("clean", "fgsm", "pgd50", "mim50", "square", "aa")
AA_VERSIONS = ("standard", "plus", "custom")
AA_COMPONENTS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
_ITERATIVE = re.compile(r"^(pgd|mim)([1-9][0-9]*)$")
# AutoAttack may be at most this far above PGD-50 (it runs APGD-CE, which subsumes PGD) ...
AA_PGD_TOLERANCE = 0.005
# ... and Square (black-box) this far below the best white-box attack before it means gradient masking
SQUARE_TOLERANCE = 0.005
# ... and the input gradient may be exactly zero for at most this fraction of the examples white-box attacks start from
ZERO_GRADIENT_TOLERANCE = 0.005


def check_attack_names(names: Sequence[str], key: str = "attacks") -> list[str]:
    """The attack names in a canonical order without duplicates; ``clean`` is implied.

    ``names`` must be a list: a plain string (``attacks=pgd50`` on the command line) is refused
    rather than read as one name, since iterating it would report its letters as unknown attacks
    and a typo of the list syntax should not silently change which attacks run."""
    if isinstance(names, str):
        raise ValueError(f"{key}={names!r} must be a list of attack names, e.g. {key}=[{names}]")
    if isinstance(names, Mapping) or not isinstance(names, Iterable):
        raise ValueError(f"{key}={names!r} must be a list of attack names, e.g. {key}=[clean,pgd50,aa]")
    bad = [n for n in names if n not in ATTACKS and not _ITERATIVE.match(str(n))]
    if bad:
        raise ValueError(
            f"{key}: unknown attack name(s) {', '.join(map(repr, bad))}; allowed: {', '.join(ATTACKS)} "
            "(pgd<k> / mim<k> for other step counts)"
        )
    return [n for n in dict.fromkeys(names) if n != "clean"]


def _attack_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """pyautoattack reseeds the global RNGs; keep that from leaking into the caller's stream."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        yield


class EvalAttack:
    """One evaluation attack: ``run(model, x, y, generator)`` returns ``x_adv`` for images ``x`` the
    model classifies correctly (the model is in eval mode; the result is checked by the caller)."""

    name: str = "attack"
    eps: float
    white_box: bool = True

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"eps": self.eps}


class WhiteBoxAttack(EvalAttack):
    """FGSM / PGD / MIM from :mod:`frep_lightning.attacks` with per-example restarts.

    An example counts as broken as soon as one iterate of one restart fools the model; later restarts
    only attack the examples still standing. Attacks without random start are deterministic, so
    they run once whatever ``restarts`` says.
    """

    def __init__(self, attack: SignGradientAttack, name: str = "pgd", restarts: int = 1, precision: str = "fp32"):
        restarts = check_int("restarts", restarts, 1)
        check_choice("precision", precision, PRECISIONS)
        self.attack = attack
        self.name = name
        self.eps = attack.eps
        self.restarts = restarts if attack.random_start else 1
        self.precision = precision

    def describe(self) -> dict[str, Any]:
        a = self.attack
        return {
            "eps": a.eps,
            "steps": a.steps,
            "step_size": a.step_size,
            "random_start": a.random_start,
            "momentum": a.momentum,
            "restarts": self.restarts,
            "precision": self.precision,
        }

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        x_adv = x.clone()
        todo = torch.arange(len(x), device=x.device)
        for _ in range(self.restarts):
            with attack_precision(self.precision, x.device):
                cand = self.attack.perturb(
                    model, x[todo], cross_entropy_loss(y[todo]), generator=generator, labels=y[todo]
                )
            x_adv[todo] = cand
            with torch.no_grad():
                fooled = ~correct_predictions(model(cand), y[todo])
            todo = todo[~fooled]
            if len(todo) == 0:
                break
        return x_adv


class SquareEval(EvalAttack):
    """Square Attack (Andriushchenko et al.), L-inf, margin loss, from ``pyautoattack`` with
    AutoAttack's settings (p_init 0.8, one restart, schedule not rescaled)."""

    white_box = False

    def __init__(self, eps: float | str = "8/255", queries: int = 5000, seed: int = 0, p_init: float = 0.8) -> None:
        self.name = "square"
        self.eps = parse_eps(eps, "eps")
        self.queries = check_int("queries", queries, 1)
        self.seed = int(seed)
        self.p_init = float(p_init)

    def describe(self) -> dict[str, Any]:
        return {"eps": self.eps, "queries": self.queries, "p_init": self.p_init, "seed": self.seed}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        from pyautoattack.square import SquareAttack

        attack = SquareAttack(
            model,
            norm="Linf",
            n_queries=self.queries,
            eps=self.eps,
            p_init=self.p_init,
            n_restarts=1,
            seed=self.seed,
            verbose=False,
            device=x.device,
            resc_schedule=False,
        )
        with _forked_rng(x.device), torch.no_grad():
            return attack.perturb(x, y).detach()


class _CaptureWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _Progress(logging.Handler):
    """Forwards AutoAttack's per-component lines (DEBUG in the package) to our log at INFO: a
    standard run takes minutes and would otherwise be silent."""

    PREFIXES = ("running ", "robust accuracy after ")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.PREFIXES):
            log.info("AutoAttack: %s", message)


class AutoAttackEval(EvalAttack):
    """AutoAttack (Croce & Hein) from ``pyautoattack``: ``version=standard`` (APGD-CE, APGD-T,
    FAB-T, Square 5000) by default; ``components`` with ``version=custom`` runs a subset. The
    package's own sanity checks (randomised/dynamic defence, ...) are collected as warnings."""

    def __init__(
        self,
        eps: float | str = "8/255",
        version: str = "standard",
        components: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.name = "aa"
        self.eps = parse_eps(eps, "eps")
        check_choice("aa.version", version, AA_VERSIONS)
        if (version == "custom") != (components is not None):
            raise ValueError(
                "aa.components must be given exactly when aa.version=custom (a list of AutoAttack attacks)"
            )
        if components is not None:
            bad = [c for c in components if c not in AA_COMPONENTS]
            if bad or not components:
                raise ValueError(f"aa.components={list(components)!r}: allowed {', '.join(AA_COMPONENTS)}")
        self.version = version
        self.components = list(components) if components is not None else None
        self.seed = int(seed)
        self.messages: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {"eps": self.eps, "version": self.version, "components": self.components, "seed": self.seed}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        from pyautoattack import AutoAttack

        kwargs: dict[str, Any] = {"attacks": self.components} if self.components is not None else {}
        aa_log = logging.getLogger("auto-attack")
        level, propagate = aa_log.level, aa_log.propagate
        handler, progress = _CaptureWarnings(), _Progress()
        aa_log.setLevel(logging.DEBUG)  # read here, not printed: its own lines would drown the report
        aa_log.propagate = False
        aa_log.addHandler(handler)
        aa_log.addHandler(progress)
        try:
            aa = AutoAttack(
                model, norm="Linf", eps=self.eps, version=self.version, device=x.device, seed=self.seed, **kwargs
            )
            with _forked_rng(x.device):
                x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        finally:
            aa_log.removeHandler(handler)
            aa_log.removeHandler(progress)
            aa_log.setLevel(level)
            aa_log.propagate = propagate
        self.messages.extend(m for m in handler.messages if m not in self.messages)
        return x_adv.detach().to(x.device)


def build_attacks(
    names: Sequence[str],
    eps: float | str = "8/255",
    step_size: float | str = "2/255",
    restarts: int = 1,
    momentum: float = 1.0,
    queries: int = 5000,
    seed: int = 0,
    precision: str = "fp32",
    aa_version: str = "standard",
    aa_components: Sequence[str] | None = None,
) -> dict[str, EvalAttack]:
    """Evaluation attacks by name (see the module docstring); ``clean`` needs no attack object."""
    eps_value = parse_eps(eps, "eps")
    attacks: dict[str, EvalAttack] = {}
    for name in check_attack_names(names):
        if name == "fgsm":
            attacks[name] = WhiteBoxAttack(FGSM(eps=eps_value, random_start=False), name, precision=precision)
        elif name == "square":
            attacks[name] = SquareEval(eps_value, queries=queries, seed=seed)
        elif name == "aa":
            attacks[name] = AutoAttackEval(eps_value, version=aa_version, components=aa_components, seed=seed)
        else:
            match = _ITERATIVE.match(name)
            assert match is not None
            kind, steps = match.group(1), int(match.group(2))
            if kind == "pgd":
                attack = PGD(eps=eps_value, steps=steps, step_size=step_size, random_start=True)
                attacks[name] = WhiteBoxAttack(attack, name, restarts=restarts, precision=precision)
            else:
                attack = MIM(eps=eps_value, steps=steps, step_size=step_size, momentum=momentum)
                attacks[name] = WhiteBoxAttack(attack, name, precision=precision)
    return attacks


def config_attacks(eval_cfg: Mapping[str, Any], seed: int = 0) -> dict[str, EvalAttack]:
    """The attacks named by ``eval.attacks`` of a training config (frep-train's final evaluation),
    with the same keys and defaults as ``conf/eval.yaml``; raises ValueError naming the key
    (``eval.attacks`` must be a list, null = none: see :func:`check_attack_names`)."""
    aa = eval_cfg.get("aa") or {}
    names = eval_cfg.get("attacks")
    names = check_attack_names([] if names is None else names, "eval.attacks")  # before list(): "pgd50" is no list
    try:
        return build_attacks(
            names,
            eps=eval_cfg.get("eps", "8/255"),
            step_size=eval_cfg.get("step_size", "2/255"),
            restarts=eval_cfg.get("restarts", 1),
            momentum=float(eval_cfg.get("momentum", 1.0)),
            queries=eval_cfg.get("queries", 5000),
            seed=seed,
            precision=eval_cfg.get("precision", "fp32"),
            aa_version=aa.get("version", "standard"),
            aa_components=None if aa.get("components") is None else list(aa.get("components")),
        )
    except ValueError as err:
        raise ValueError(f"eval.{err}") from err


@dataclass
class EvalResult:
    """Per-example outcomes: ``correct[name][i]`` is True when example i is classified correctly
    clean and (for an attack) under that attack."""

    n: int
    correct: dict[str, Tensor]
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    @property
    def attacks(self) -> list[str]:
        return [k for k in self.correct if k != "clean"]

    @property
    def worst_case(self) -> Tensor:
        robust = self.correct["clean"].clone()
        for name in self.attacks:
            robust &= self.correct[name]
        return robust

    def accuracies(self) -> dict[str, float]:
        acc = {k: int(v.sum()) / self.n for k, v in self.correct.items()}  # exact ratios, not float32 means
        acc["worst_case"] = int(self.worst_case.sum()) / self.n
        return acc


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def _check_buffers(before: Mapping[str, Tensor], model: nn.Module) -> None:
    after = dict(model.named_buffers())
    changed = [k for k, v in before.items() if k not in after or not torch.equal(v, after[k])]
    if changed:
        raise RuntimeError(
            f"evaluation changed model buffers ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}): "
            "BatchNorm statistics must never move during an evaluation"
        )


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No weight gradients: attacks only need d loss / d x (saves the weight-gradient kernels)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _no_cudnn_autotune() -> Iterator[None]:
    """cuDNN's autotuner off while attacking: the attacked subset (the examples classified correctly clean) has a
    new size in almost every batch, and ``cudnn.benchmark`` re-times every convolution for each new shape. With it on
    (left so by the bench process), the final PGD-50 of a 100-epoch run took 55 s on an H100, while CLI runs with it
    off evaluated three attacks on the same 10k images in 15-22 s
    (experiments/results/bench-nvidia-h100-80gb-hbm3-2026-11-28.md)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_gradients(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Examples whose cross-entropy gradient with respect to the input is exactly zero: sign-gradient attacks
    cannot move them (a saturated softmax, a non-differentiable layer), so they would count as robust.
    fp32 and a summed loss, so that neither bf16 nor the batch mean underflows a real gradient to zero."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return int((grad.flatten(1) == 0).all(dim=1).sum())


def run_attacks(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attacks: Mapping[str, EvalAttack | SignGradientAttack],
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> EvalResult:
    """Clean and per-attack correctness of every example (see the module docstring for the checks).

    Only examples classified correctly clean are attacked (the others are not robust anyway).
    The model runs in eval mode and is handed back in the mode(s) it came in: a caller that is
    training (frep-train's model, a notebook) must not find its model silently left in eval mode.
    """
    device = torch.device(device)
    wrapped = {name: WhiteBoxAttack(a, name) if isinstance(a, SignGradientAttack) else a for name, a in attacks.items()}
    if "clean" in wrapped or "worst_case" in wrapped:
        raise ValueError("attack names 'clean' and 'worst_case' are reserved")
    model = model.to(device)
    generators = {name: torch.Generator(device=device).manual_seed(_attack_seed(seed, name)) for name in wrapped}
    before = _buffers(model)
    correct: dict[str, list[Tensor]] = {"clean": [], **{name: [] for name in wrapped}}
    seconds = dict.fromkeys(["clean", *wrapped], 0.0)
    total = len(batches) if hasattr(batches, "__len__") else None
    begin = time.perf_counter()
    probe = any(isinstance(a, WhiteBoxAttack) for a in wrapped.values())
    zero_grad = probed = 0
    with eval_mode(model), _frozen_parameters(model), _no_cudnn_autotune():
        for b, (x, y) in enumerate(batches):
            if b:  # progress: long evaluations (AutoAttack, Square) otherwise print nothing for minutes
                done = sum(len(c) for c in correct["clean"])
                so_far = ", ".join(f"{k} {int(sum(int(t.sum()) for t in v))}/{done}" for k, v in correct.items())
                log.info("eval: batch %d/%s done, %.0f s: %s", b, total or "?", time.perf_counter() - begin, so_far)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if x.numel() and (x.min() < 0 or x.max() > 1 or not bool(torch.isfinite(x).all())):
                raise ValueError("evaluation inputs must be images in [0, 1]; normalisation belongs inside the model")
            start = time.perf_counter()
            with torch.no_grad():
                clean = correct_predictions(model(x), y)
            _sync(device)
            seconds["clean"] += time.perf_counter() - start
            correct["clean"].append(clean.cpu())
            idx = clean.nonzero().flatten()
            if probe and len(idx):
                zero_grad += _zero_gradients(model, x[idx], y[idx])
                probed += len(idx)
            for name, attack in wrapped.items():
                ok = torch.zeros_like(clean)
                if len(idx):
                    start = time.perf_counter()
                    x_sub, y_sub = x[idx], y[idx]
                    x_adv = attack.run(model, x_sub, y_sub, generators[name])
                    if model.training:
                        raise RuntimeError(f"attack {name!r} switched the model to training mode")
                    check_adversarial(x_adv, x_sub, attack.eps)
                    with torch.no_grad():
                        ok[idx] = correct_predictions(model(x_adv), y_sub)
                    _sync(device)
                    seconds[name] += time.perf_counter() - start
                correct[name].append(ok.cpu())
    _check_buffers(before, model)
    n = sum(len(c) for c in correct["clean"])
    if n == 0:
        raise ValueError("evaluate(): no examples")
    result = EvalResult(
        n=n,
        correct={k: torch.cat(v) for k, v in correct.items()},
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
    for attack in wrapped.values():
        result.warnings.extend(f"AutoAttack: {m}" for m in getattr(attack, "messages", []))
    result.warnings.extend(trust_warnings(result.accuracies(), n, {k: a.white_box for k, a in wrapped.items()}))
    for eps in sorted({a.eps for a in wrapped.values()}):
        if (message := rounded_eps_warning(eps)) is not None:
            result.warnings.append(message)
    if zero_grad > ZERO_GRADIENT_TOLERANCE * probed:
        result.warnings.append(
            f"gradient masking suspected: the input gradient of the cross-entropy is exactly zero for {zero_grad} of "
            f"{probed} correctly classified examples; FGSM/PGD/MIM cannot move them, so their accuracies overstate "
            "robustness (run square and aa)"
        )
    return result


def trust_warnings(acc: Mapping[str, float], n: int, white_box: Mapping[str, bool] | None = None) -> list[str]:
    """Consistency checks between attacks; raises when a robust accuracy exceeds clean accuracy.

    Warnings (strings, printed into the report): FGSM accuracy below PGD's (a one-step attack
    beating a 50-step one means the gradients lie: gradient masking); AutoAttack more than
    0.5 pts above PGD-50; Square (black-box, no gradients) more than 0.5 pts below the best
    white-box attack (gradient masking again).
    """
    warnings: list[str] = []
    clean = acc["clean"]
    names = [k for k in acc if k not in ("clean", "worst_case")]
    for name in [*names, "worst_case"] if "worst_case" in acc else names:
        if acc[name] > clean + 1e-12:
            raise RuntimeError(f"robust accuracy {name}={acc[name]:.4f} exceeds clean accuracy {clean:.4f}: a bug")
    pgd = [k for k in names if k.startswith("pgd")]
    if "fgsm" in acc:
        for k in pgd:
            if acc["fgsm"] < acc[k]:
                warnings.append(
                    f"gradient masking suspected: FGSM accuracy {acc['fgsm']:.4f} is below {k.upper()} "
                    f"{acc[k]:.4f} (a one-step attack should never beat an iterated one)"
                )
    iterated = [k for k in names if re.fullmatch(r"pgd\d+", k)]  # any PGD-k, not only the default PGD-50
    if "aa" in acc and iterated:
        strongest = min(iterated, key=lambda k: acc[k])
        if acc["aa"] > acc[strongest] + AA_PGD_TOLERANCE:
            warnings.append(
                f"AutoAttack accuracy {acc['aa']:.4f} is more than {AA_PGD_TOLERANCE * 100:.1f} pts above "
                f"{strongest.upper().replace('PGD', 'PGD-')} {acc[strongest]:.4f}: AutoAttack should be the "
                "stronger evaluation; check the setup"
            )
    if "square" in acc:
        wb = [k for k in names if (white_box or {}).get(k, k not in ("square", "aa")) and k != "aa"]
        if wb:
            best = min(wb, key=lambda k: acc[k])
            if acc["square"] < acc[best] - SQUARE_TOLERANCE:
                warnings.append(
                    f"gradient masking suspected: black-box Square accuracy {acc['square']:.4f} is more than "
                    f"{SQUARE_TOLERANCE * 100:.1f} pts below the strongest white-box attack "
                    f"({best} {acc[best]:.4f})"
                )
    return warnings


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attacks: Mapping[str, EvalAttack | SignGradientAttack],
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy for ``clean``, each attack, and ``worst_case`` over all attacks run, plus ``n``."""
    result = run_attacks(model, batches, attacks, device=device, seed=seed)
    for w in result.warnings:
        log.warning(w)
    return result.accuracies() | {"n": result.n}
