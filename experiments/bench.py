#!/usr/bin/env python3
"""Step times of the training paths, eager against fast, and the paper recipe end to end. One process.

For each model x batch size x method (``natural``: cross-entropy on clean images; ``frep``: SRE +
FGSM with random start on W1*W2; ``pgd10``: Madry PGD-10 adversarial training), ms/step and
images/s of these modes (a mode that does not apply to a method is not run):

  eager         the plain path's step (what FReP.training_step + automatic optimization run:
                forward, attack, objective, backward, torch.optim.SGD), fp32, bare (no Lightning)
  fast-fp32     FastStep (frep_lightning.fast): the same step captured in one CUDA graph, fp32
  fast-bf16     captured, bf16 autocast + channels_last
  fast-bf16-cw  captured, bf16 + channels_last + fast.cache_weights (W1*W2 once per step)
  fast-bf16-cm  captured, bf16 + channels_last + fast.compile_model (inductor kernels inside the graph)
  fast-bf16-s2  captured, bf16 + channels_last + fast.streams=2 (clean forward on a second stream)
  fast-bf16-cw-s2, fast-bf16-cm-s2  two of those together
  compile-bf16  torch.compile(mode="reduce-overhead") instead of the manual capture
  pl-eager      FReP inside a Lightning Trainer (automatic optimization), GPU-resident batches
                (DeviceBatches), RobustPruning (99 %, at epoch 0) and TemporalEnsemble callbacks
  pl-fast-bf16  FastFReP inside the same Trainer, data and callbacks: the number the issue targets
  pl-fast-bf16-cw, -s2, -cw-s2, -cm, -cm-s2  the same with those options (the modes that compile run last,
                with --compile); the Lightning target takes the fastest pl-fast row

natural and pgd10 train the plain weights (with the pruning-mask parametrization, as "Ori" does).
Timing: CUDA events around the timed loop only (one synchronisation before and after), after
warm-up steps (which include the capture); steps are capped by --max-seconds per mode. A mode
that fails (capture error, OOM, compile error) prints the error and gets a line in the table.

--profile MODES: torch.profiler over a few steps of those bare fast modes (kernels per step, GPU time by
kernel and by kind: convolution, batch norm, the rest), to see where a step's time goes.

--check (on by default on CUDA): the captured step against the plain eager step from the same
weights and RNG state, through a pruning event and an LR drop (cuDNN deterministic): the weight
difference, and whether pruned weights stayed exactly zero; also the two-stream captured step
(fast.streams=2, with and without fast.cache_weights) against the one-stream eager step.

--e2e: ``experiment=paper_resnet18_c10`` end to end through ``frep_lightning.train.run`` (needs
hydra), with --epochs E (pruning epoch and LR milestones scaled from 30/70/85 of 100), split into
data, train, validation, pruning, ensemble, monitor, checkpoint, export and final evaluation;
--e2e-paths fast,plain runs both paths with the same seed (clean/PGD accuracy side by side).

Writes ``<out-dir>/bench-<device>-<date>.md`` (and ``.json``) after every row, so a run cut short
keeps what it measured. Without CUDA (or with --reduced) a reduced version runs: tiny widths, a
few steps, no compile; the e2e run on a toy model and data for 3 epochs (``REDUCED_E2E``; later
``--e2e-overrides`` win). tests/test_bench.py runs both.
"""

from __future__ import annotations

import time

T_IMPORT = time.time()  # before the heavy imports: the e2e wall clock falls back to this

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # runs from a bare checkout too (the GPU machine has no install)
    sys.path.insert(0, str(REPO / "src"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from frep_lightning.attacks import PGD, SignGradientAttack  # noqa: E402
from frep_lightning.data.device_data import DeviceBatches  # noqa: E402
from frep_lightning.ensemble import TemporalEnsemble  # noqa: E402
from frep_lightning.fast import FastFReP, FastStep  # noqa: E402
from frep_lightning.models import build_model, model_names  # noqa: E402
from frep_lightning.module import FReP  # noqa: E402
from frep_lightning.objectives import SRE, CrossEntropyAT  # noqa: E402
from frep_lightning.pruning import RobustPruning, apply_masks_, compute_masks  # noqa: E402
from frep_lightning.reparam import iter_masked  # noqa: E402

METHODS = ("natural", "frep", "pgd10")
MODES = (
    "eager",
    "fast-fp32",
    "fast-bf16",
    "fast-bf16-cw",
    "fast-bf16-s2",
    "fast-bf16-cw-s2",
    "fast-bf16-cm",
    "fast-bf16-cm-s2",
    "compile-bf16",
    "pl-eager",
    "pl-fast-bf16",
    "pl-fast-bf16-cw",
    "pl-fast-bf16-s2",
    "pl-fast-bf16-cw-s2",
    "pl-fast-bf16-cm",
    "pl-fast-bf16-cm-s2",
)
COMPILED_MODEL = tuple(m for m in MODES if "cm" in m.split("-"))  # fast.compile_model
COMPILING = ("compile-bf16", *COMPILED_MODEL)  # run last, only with --compile
DEFAULT_MODES = {
    "frep": (
        "eager",
        "fast-fp32",
        "fast-bf16",
        "pl-fast-bf16",
        "pl-eager",
        "fast-bf16-cw",
        "fast-bf16-s2",
        "pl-fast-bf16-s2",
        "pl-fast-bf16-cm",
    ),
    "natural": ("eager", "fast-fp32", "fast-bf16"),
    "pgd10": ("eager", "fast-fp32", "fast-bf16"),
}
# natural and PGD-10 are timed bare only (their rows are the ratios' denominators); the Lightning rows, the
# second stream (needs a clean forward beside the attack) and the cached product are FReP's
OTHER_METHODS_MODES = ("eager", "fast-fp32", "fast-bf16", "fast-bf16-cm", "compile-bf16")


def applies(method: str, mode: str) -> bool:
    return method == "frep" or mode in OTHER_METHODS_MODES


REDUCED_MODES = {"frep": ("eager", "fast-fp32", "pl-fast-bf16"), "natural": ("eager", "fast-fp32"), "pgd10": ("eager",)}
EPS = 8 / 255


def fast_options(mode: str) -> dict[str, Any]:
    """The FastStep options a fast mode's name spells: bf16 (with channels_last), -cw, -cm, -s2."""
    tokens = mode.split("-")
    return {
        "precision": "bf16" if "bf16" in tokens else "fp32",
        "cache_weights": "cw" in tokens,
        "compile_model": "cm" in tokens,
        "streams": 2 if "s2" in tokens else 1,
    }


# ---- methods ----------------------------------------------------------------------------------
class NoAttack:
    """Natural training: the "adversarial" input is the clean one (no forward is spent on an attack)."""

    eps = EPS
    steps = 0

    def __repr__(self) -> str:
        return "NoAttack()"

    def perturb(self, model: Any, x: Tensor, loss_fn: Any, generator: Any = None) -> Tensor:
        return x


def method_parts(method: str) -> tuple[Any, Any, str]:
    """(objective, attack, reparam kind) of a benchmarked method."""
    if method == "natural":
        return CrossEntropyAT(), NoAttack(), "none"
    if method == "frep":
        return SRE(lam=6.0), SignGradientAttack(eps="8/255", steps=1, random_start=True), "hadamard"
    if method == "pgd10":
        return CrossEntropyAT(), PGD(eps="8/255", steps=10, step_size="2/255"), "none"
    raise ValueError(f"--methods: {method!r} is not valid; allowed values: {', '.join(METHODS)}")


def make_module(
    method: str, model: str, width: int | None, device: torch.device, fast: dict[str, Any] | None = None
) -> FReP:
    torch.manual_seed(0)
    objective, attack, kind = method_parts(method)
    net = build_model(model, num_classes=10, width=width)
    kwargs: dict[str, Any] = {"objective": objective, "attack": attack, "reparam_kind": kind, "val_attack_steps": 0}
    module = FReP(net, **kwargs) if fast is None else FastFReP(net, **kwargs, **fast)
    return module.to(device)


def make_optimizer(module: FReP) -> torch.optim.SGD:
    return module.configure_optimizers()["optimizer"]  # the recipe's SGD (0.9, wd 2e-4, lr 0.1)


def make_fast_step(
    method: str, model: str, width: int | None, device: torch.device, mode: str, capture: str, warmup_steps: int
) -> FastStep:
    """The FastStep a bare fast mode names (bf16 modes: channels-last model and inputs)."""
    module = make_module(method, model, width, device)
    options = fast_options(mode)
    bf16 = options["precision"] == "bf16"
    if bf16:
        module.model.to(memory_format=torch.channels_last)
    return FastStep(
        module.model,
        module.objective,
        module.attack,
        make_optimizer(module),
        capture=capture,
        **options,
        warmup_steps=warmup_steps,
        memory_format=torch.channels_last if bf16 else torch.contiguous_format,
    )


def synthetic_batches(bs: int, n: int, device: torch.device, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (bs, 3, 32, 32), generator=g, dtype=torch.uint8).float().div_(255)
        out.append((x.to(device), torch.randint(0, 10, (bs,), generator=g).to(device)))
    return out


def eager_step(module: FReP, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """FReP.training_step under automatic optimization, without Lightning's logging."""
    optimizer.zero_grad(set_to_none=True)
    model, objective = module.model, module.objective
    logits_clean = model(x) if objective.uses_clean else None
    reference = None if logits_clean is None else logits_clean.detach()
    x_adv = module.attack.perturb(model, x, lambda out: objective.attack_loss(out, reference, y))
    objective(logits_clean, model(x_adv), y).backward()
    optimizer.step()


# ---- timing -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(
    step: Callable[[int], None], device: torch.device, warmup: int, steps: int, max_seconds: float, min_steps: int = 3
) -> tuple[float, int]:
    """(ms per step, steps timed): ``warmup`` untimed steps, an estimate from 2 steps, then at most
    ``steps`` steps and about ``max_seconds``, timed with CUDA events (one sync before, one after)."""
    for i in range(warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(2):
        step(warmup + i)
    sync(device)
    estimate = max((time.perf_counter() - t0) / 2, 1e-6)
    n = max(min_steps, min(steps, int(max_seconds / estimate)))
    base = warmup + 2
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(n):
            step(base + i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n, n
    t0 = time.perf_counter()
    for i in range(n):
        step(base + i)
    return (time.perf_counter() - t0) * 1000 / n, n


@dataclass
class Row:
    model: str
    bs: int
    method: str
    mode: str
    ms: float | None = None
    images_per_s: float | None = None
    steps: int = 0
    note: str = ""


@dataclass
class Bench:
    """Settings and results; ``write()`` renders them (called after every row)."""

    device: torch.device
    args: argparse.Namespace
    rows: list[Row] = field(default_factory=list)
    check: dict[str, Any] | None = None
    profiles: list[dict[str, Any]] = field(default_factory=list)
    e2e: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    path: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def width(self) -> int | None:
        return self.args.width

    def over_budget(self) -> bool:
        return self.args.budget is not None and time.perf_counter() - self.started > self.args.budget

    def find(self, model: str, bs: int, method: str, mode: str) -> Row | None:
        for r in self.rows:
            if (r.model, r.bs, r.method, r.mode) == (model, bs, method, mode) and r.ms is not None:
                return r
        return None

    # -- one mode ----------------------------------------------------------------------------
    def run_mode(self, model: str, bs: int, method: str, mode: str) -> Row:
        row = Row(model, bs, method, mode)
        if self.over_budget():
            row.note = f"skipped: --budget {self.args.budget:g} s spent"
            return row
        try:
            if mode.startswith("pl-"):
                row.ms, row.steps, row.note = self._lightning(model, bs, method, mode)
            else:
                row.ms, row.steps, row.note = self._bare(model, bs, method, mode)
            row.images_per_s = bs / row.ms * 1000
        except Exception as err:  # one failing mode must not end the bench
            row.note = f"FAILED: {type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err) else ''}"
            traceback.print_exc()
        finally:
            gc.collect()  # Trainer/module cycles hold graphs and their memory pools
            if self.cuda:
                torch.cuda.empty_cache()
        return row

    def _bare(self, model: str, bs: int, method: str, mode: str) -> tuple[float, int, str]:
        batches = synthetic_batches(bs, 4, self.device)
        warmup = self.args.warmup
        if mode == "eager":
            module = make_module(method, model, self.width(), self.device)
            optimizer = make_optimizer(module)
            ms, n = time_loop(
                lambda i: eager_step(module, optimizer, *batches[i % 4]),
                self.device,
                warmup,
                self.args.steps,
                self.args.max_seconds,
            )
            return ms, n, "fp32, torch.optim.SGD"
        capture = "compile" if mode.startswith("compile") else "cuda_graph"
        step = make_fast_step(method, model, self.width(), self.device, mode, capture, max(1, min(3, warmup - 1)))
        ms, n = time_loop(lambda i: step(*batches[i % 4]), self.device, warmup, self.args.steps, self.args.max_seconds)
        metrics = step.read_metrics()
        if metrics["nonfinite"]:
            raise FloatingPointError(f"{int(metrics['nonfinite'])} non-finite losses")
        return ms, n, step.describe()

    def _lightning(self, model: str, bs: int, method: str, mode: str) -> tuple[float, int, str]:
        fast = None if mode == "pl-eager" else {"capture": "cuda_graph", "channels_last": True, **fast_options(mode)}
        module = make_module(method, model, self.width(), torch.device("cpu"), fast)
        bare = self.find(model, bs, method, "fast-bf16" if fast else "eager")
        steps = bare.steps if bare is not None else self.args.steps
        warmup = self.args.warmup
        total = warmup + steps
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (bs * total, 3, 32, 32), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (bs * total,), generator=g)
        timer = StepTimer(first=warmup, last=total - 1, cuda=self.cuda)
        callbacks = [
            RobustPruning(sparsity=0.99, epoch=0),
            TemporalEnsemble(every_n_steps=min(100, total), bn_batches=2),
            timer,
        ]
        trainer = pl.Trainer(
            accelerator="gpu" if self.cuda else "cpu",
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            inference_mode=False,
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule=SyntheticData(images, labels, bs, self.device))
        note = "automatic optimization, fp32" if fast is None else module.fast_summary
        return timer.ms_per_step(), steps, f"{note}; DeviceBatches, pruning 99 %, ensemble"

    # -- output ------------------------------------------------------------------------------
    def write(self) -> None:
        out = Path(self.args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = f"bench-{device_slug(self.device)}-{datetime.date.today().isoformat()}{self.args.tag}"
        self.path = out / f"{name}.md"
        self.path.write_text(self.markdown())
        data = {
            "device": device_name(self.device),
            "command": command_line(),
            "versions": versions(),
            "rows": [asdict(r) for r in self.rows],
            "ratios": self.ratios(),
            "check": self.check,
            "profiles": self.profiles,
            "e2e": self.e2e,
        }
        (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")

    def ratios(self) -> list[tuple[str, float | None, str]]:
        """The issue's targets, from the rows measured (model/bs: the first of each list)."""
        model, bs = self.args.models[0], self.args.batch_sizes[0]
        # the faster Lightning fast path (with or without the compiled model) is the one a user would pick
        pl_candidates = [self.find(model, bs, "frep", m) for m in MODES if m.startswith("pl-fast")]
        pl_timed = [r for r in pl_candidates if r is not None and r.ms]
        pl_fast = min(pl_timed, key=lambda r: r.ms) if pl_timed else None
        fast = self.find(model, bs, "frep", "fast-bf16")
        nat = self.find(model, bs, "natural", "fast-bf16") or self.find(model, bs, "natural", "fast-fp32")
        pgd = self.find(model, bs, "pgd10", "eager")
        frep_fast = pl_fast or fast or self.find(model, bs, "frep", "fast-fp32")
        eager = self.find(model, bs, "frep", "eager")
        out: list[tuple[str, float | None, str]] = [
            (
                f"FReP fast step in Lightning ({pl_fast.mode if pl_fast else '-'}), {model} bs{bs} (ms)",
                pl_fast.ms if pl_fast else None,
                "<= 9",
            ),
            (
                f"FReP / natural step, fast-bf16 / {nat.mode if nat else '-'}, {model} bs{bs}",  # the natural row used
                fast.ms / nat.ms if fast and nat and fast.ms and nat.ms else None,
                "<= 3.5",
            ),
            (
                f"eager PGD-10 / fast FReP ({frep_fast.mode if frep_fast else '-'}), {model} bs{bs}",
                pgd.ms / frep_fast.ms if pgd and frep_fast and pgd.ms and frep_fast.ms else None,
                ">= 10",
            ),
            (
                f"eager FReP / fast FReP ({frep_fast.mode if frep_fast else '-'}), {model} bs{bs}",
                eager.ms / frep_fast.ms if eager and frep_fast and eager.ms and frep_fast.ms else None,
                "speed-up",
            ),
        ]
        return out

    def markdown(self) -> str:
        lines = [
            f"# Bench: {device_name(self.device)}, {datetime.date.today().isoformat()}",
            "",
            f"Command: `{command_line()}`  ",
            f"Versions: {versions()}  ",
            f"Bench wall clock so far: {time.perf_counter() - self.started:.0f} s"
            + (" (reduced: tiny widths, few steps; not a measurement of speed)" if self.args.reduced else ""),
            "",
            "## Step time",
            "",
            "| model | bs | method | mode | ms/step | images/s | steps timed | what ran |",
            "|---|---:|---|---|---:|---:|---:|---|",
        ]
        for r in self.rows:
            ms = f"{r.ms:.2f}" if r.ms is not None else "-"
            ips = f"{r.images_per_s:,.0f}" if r.images_per_s is not None else "-"
            lines.append(f"| {r.model} | {r.bs} | {r.method} | {r.mode} | {ms} | {ips} | {r.steps} | {r.note} |")
        lines += ["", "## Targets (issue 4)", "", "| quantity | value | target |", "|---|---:|---|"]
        for what, value, target in self.ratios():
            lines.append(f"| {what} | {'-' if value is None else f'{value:.2f}'} | {target} |")
        if self.check is not None:
            lines += ["", "## Captured step vs plain eager step (--check)", ""]
            lines += [f"- {k}: {v}" for k, v in self.check.items()]
        for prof in self.profiles:
            lines += profile_markdown(prof)
        for run in self.e2e:
            lines += ["", f"## End to end: {run.get('path')} path", ""]
            lines += [f"- {k}: {v}" for k, v in run.items() if k != "phases"]
            if "phases" in run:
                lines += ["", "| phase | seconds |", "|---|---:|"]
                lines += [f"| {k} | {v:.1f} |" for k, v in run["phases"].items()]
        return "\n".join(lines) + "\n"


class StepTimer(pl.Callback):
    """CUDA events at the start of batch ``first`` and the end of batch ``last`` (no sync in between)."""

    def __init__(self, first: int, last: int, cuda: bool) -> None:
        self.first, self.last, self.cuda = first, last, cuda
        self.start: Any = None
        self.end: Any = None

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first:
            self.start = self._mark()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.last:
            self.end = self._mark()

    def ms_per_step(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the timed batches did not run")
        n = self.last - self.first + 1
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / n
        return (self.end - self.start) * 1000 / n


class SyntheticData(pl.LightningDataModule):
    """Random uint8 images made into batches on the device (DeviceBatches), as data.on_device does."""

    def __init__(self, images: Tensor, labels: Tensor, bs: int, device: torch.device) -> None:
        super().__init__()
        self.images, self.labels, self.bs, self.device = images, labels, bs, device

    def train_dataloader(self) -> DeviceBatches:
        return DeviceBatches(self.images, self.labels, self.bs, device=self.device)

    def val_dataloader(self) -> list[Any]:
        return []


# ---- GPU check: captured == eager -------------------------------------------------------------
def capture_check(device: torch.device, model: str, width: int | None, bs: int, steps: int = 12) -> dict[str, Any]:
    """A captured FastStep against the same step run eagerly (same arithmetic, LR from the device
    tensor), from the same weights and CUDA RNG state, with pruning to 99 % (masks written in place)
    after step ``steps // 2`` and an LR drop after ``3 * steps // 4``; cuDNN deterministic, so the
    only difference left is the capture. Run without random start (must match) and with it (the
    graph's RNG offsets should reproduce the eager stream). FastStep eager == the plain path is
    tests/test_equivalence.py."""
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    prune_at, drop_at = steps // 2, (3 * steps) // 4
    out: dict[str, Any] = {
        "setup": f"frep {model} bs{bs} fp32, {steps} steps, prune 99 % before step {prune_at + 1}, "
        f"LR 0.1 -> 0.01 before step {drop_at + 1}, cuDNN deterministic, SGD foreach"
    }
    try:
        batches = synthetic_batches(bs, 4, device, seed=1)
        passed = True
        for random_start, streams, cache in ((False, 1, False), (True, 1, False), (False, 2, False), (False, 2, True)):
            ref = make_module("frep", model, width, device)
            ref.attack.random_start = random_start
            fast = copy.deepcopy(ref)
            opt_ref, opt_fast = make_optimizer(ref), make_optimizer(fast)
            kw: dict[str, Any] = {"sgd": "foreach", "warmup_steps": 3, "cache_weights": cache}
            ref_step = FastStep(ref.model, ref.objective, ref.attack, opt_ref, capture="none", **kw)
            step = FastStep(
                fast.model, fast.objective, fast.attack, opt_fast, capture="cuda_graph", streams=streams, **kw
            )
            for one_step, module, opt in ((ref_step.eager_reference, ref, opt_ref), (step, fast, opt_fast)):
                torch.manual_seed(123)  # every device's generator
                for i in range(steps):
                    if i == prune_at:
                        apply_masks_(module.model, compute_masks(module.model, 0.99), [opt])
                    if i == drop_at:
                        for group in opt.param_groups:
                            group["lr"] = 0.01
                    one_step(*batches[i % 4])
                sync(device)
            diffs = [
                (float((a - b).detach().abs().max()), float(b.detach().abs().max()))
                for a, b in zip(fast.model.parameters(), ref.model.parameters(), strict=True)
            ]
            rel = max(d / max(m, 1e-12) for d, m in diffs)
            nonzero = 0
            with torch.no_grad():
                for _, layer, p in iter_masked(fast.model):
                    nonzero += int((layer.weight[p.mask == 0] != 0).sum())
            sums_equal = torch.equal(step.sums, ref_step.sums)
            tag = ("with random start" if random_start else "without random start") + (
                ", 2 streams vs 1" if streams == 2 else ""
            )
            tag += ", both with cached weights" if cache else ""
            out[f"{tag}: max relative |W_replay - W_eager|"] = f"{rel:.3g} (max abs {max(d for d, _ in diffs):.3g})"
            out[f"{tag}: loss/accuracy sums identical"] = sums_equal
            out[f"{tag}: pruned weights not zero after replays"] = nonzero
            out[f"{tag}: captures (1: no re-capture for mask or LR)"] = step.captures
            out[f"{tag}: what ran"] = step.describe()
            if not random_start:
                captures = 1 if device.type == "cuda" else 0  # off CUDA both sides run eagerly (tests)
                ok = rel < 1e-4 and nonzero == 0 and step.captures == captures and step.fallback is None
                passed = passed and ok
            else:
                out["RNG: replays reproduce the eager random starts"] = rel < 1e-4
        out["result"] = "PASS" if passed else "FAIL"
        return out
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


# ---- kernel profile ---------------------------------------------------------------------------
# Kernel-name heuristics for the summary (cuDNN/CUTLASS names vary by version; the raw table is the truth)
KERNEL_KINDS = (
    ("convolution", ("conv", "implicit_gemm", "xmma", "fprop", "dgrad", "wgrad", "gemm", "cutlass")),
    ("batch norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in low for n in needles):
            return kind
    return "other (elementwise, reductions, copies, optimizer)"


def profile_step(bench: Bench, model: str, bs: int, mode: str, steps: int = 5) -> dict[str, Any]:
    """Where a FReP step's time goes: torch.profiler over ``steps`` steps of a bare fast mode after its
    warm-up (so a captured step is profiled as replays). On CUDA the table lists GPU kernels (calls and
    microseconds per step); kernel time summed over a step above the step's wall time means kernels ran
    concurrently (``-s2``). On CPU (tests) it lists CPU operators instead."""
    from torch.profiler import ProfilerActivity, profile

    device = bench.device
    activities = [ProfilerActivity.CUDA] if bench.cuda else [ProfilerActivity.CPU]
    batches = synthetic_batches(bs, 2, device)

    def run(capture: str) -> tuple[FastStep, list[dict[str, Any]], float]:
        step = make_fast_step("frep", model, bench.width(), device, mode, capture, warmup_steps=3)
        for i in range(5):  # warm-up and capture
            step(*batches[i % 2])
        sync(device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for i in range(steps):
                step(*batches[i % 2])
            sync(device)
        wall = (time.perf_counter() - t0) * 1000 / steps
        rows = []
        for ev in prof.key_averages():
            if bench.cuda:
                if str(getattr(ev, "device_type", "")).split(".")[-1] != "CUDA":
                    continue
                us = float(getattr(ev, "self_device_time_total", 0.0) or getattr(ev, "self_cuda_time_total", 0.0))
            else:
                us = float(ev.self_cpu_time_total)
            if us > 0:
                rows.append({"name": ev.key, "calls_per_step": ev.count / steps, "us_per_step": us / steps})
        return step, rows, wall

    step, rows, wall_ms = run("cuda_graph")
    if bench.cuda and not rows:  # the profiler saw no kernel inside the graph replays: profile the same step eagerly
        step, rows, wall_ms = run("none")
    rows.sort(key=lambda r: -r["us_per_step"])
    kinds: dict[str, float] = {}
    for r in rows:
        kind = kernel_kind(r["name"])
        kinds[kind] = kinds.get(kind, 0.0) + r["us_per_step"]
    return {
        "model": model,
        "bs": bs,
        "mode": mode,
        "what ran": step.describe(),
        "what": "GPU kernels" if bench.cuda else "CPU operators (no CUDA: not a GPU profile)",
        "steps profiled": steps,
        "wall ms per step (profiler on)": round(wall_ms, 3),
        "kernels per step": round(sum(r["calls_per_step"] for r in rows), 1),
        "summed kernel ms per step": round(sum(r["us_per_step"] for r in rows) / 1000, 3),
        "by kind (ms per step)": {k: round(v / 1000, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": rows[:25],
    }


def profile_markdown(prof: dict[str, Any]) -> list[str]:
    lines = ["", f"## Kernel profile: frep {prof['model']} bs{prof['bs']} {prof['mode']} ({prof['what']})", ""]
    lines += [f"- {k}: {prof[k]}" for k in prof if k not in ("top", "model", "bs", "mode", "what")]
    lines += ["", "| kernel | calls/step | µs/step |", "|---|---:|---:|"]
    for r in prof["top"]:
        name = r["name"].replace("|", "/")[:110]
        lines.append(f"| `{name}` | {r['calls_per_step']:.1f} | {r['us_per_step']:.1f} |")
    return lines


# ---- end to end ------------------------------------------------------------------------------
def process_start_time() -> float:
    """Wall-clock time this process started (Linux /proc; else the time of this module's import)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        btime = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return T_IMPORT


class PhaseTimer(pl.Callback):
    """Exclusive wall time per phase (a nested phase is not counted in its parent), synchronising
    the GPU at phase boundaries only."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.started = time.time()
        self.totals: dict[str, float] = {}
        self.stack: list[tuple[str, float]] = []
        self.marks: dict[str, float] = {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def push(self, name: str) -> None:
        now = self._now()
        if self.stack:
            parent, since = self.stack[-1]
            self.totals[parent] = self.totals.get(parent, 0.0) + now - since
        self.stack.append((name, now))

    def pop(self, name: str) -> None:
        now = self._now()
        self.marks[f"{name} end"] = time.time()
        while self.stack:
            top, since = self.stack.pop()
            self.totals[top] = self.totals.get(top, 0.0) + now - since
            if top == name:
                break
        if self.stack:
            parent, _ = self.stack[-1]
            self.stack[-1] = (parent, now)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop(name)

    def wrap(self, obj: Any, method: str, name: str) -> None:
        original = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(obj, method, timed)

    def instrument(self, callbacks: Sequence[Any]) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        from frep_lightning.export import MergeReparameterization
        from frep_lightning.monitor import RobustnessMonitor

        for cb in callbacks:
            if isinstance(cb, RobustPruning):
                self.wrap(cb, "prune", "pruning")
            elif isinstance(cb, TemporalEnsemble):
                self.wrap(cb, "update", "ensemble")
                self.wrap(cb, "recompute_bn", "ensemble")
            elif isinstance(cb, RobustnessMonitor):
                self.wrap(cb, "on_train_epoch_end", "monitor")
            elif isinstance(cb, MergeReparameterization):
                self.wrap(cb, "on_fit_end", "export")
            elif isinstance(cb, ModelCheckpoint):
                self.wrap(cb, "_save_checkpoint", "checkpoint")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.push("train")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.pop("train")
        # one line per epoch, so a run cut by a deadline still shows its pace (and the phases so far)
        so_far = ", ".join(f"{k} {v:.1f}" for k, v in self.totals.items())
        print(f"e2e epoch {trainer.current_epoch} done at {time.time() - self.started:.1f} s ({so_far})", flush=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self.push("validation")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self.pop("validation")


# The reduced e2e (CPU, CI): the same recipe, phases and files, on a toy-sized model and data
REDUCED_E2E = (
    "model.width=4",
    "data.n_train=128",
    "data.n_val=32",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "val_attack_steps=1",
    "monitor.n_images=16",
    "monitor.steps=1",
    "ensemble.every_n_steps=2",
    "ensemble.bn_batches=1",
    "eval.n_test=32",
    "eval.batch_size=32",
    "eval.pgd_steps=2",
)


def e2e_overrides(
    epochs: int, path: str, cuda: bool, run_dir: Path, extra: Sequence[str], reduced: bool = False
) -> list[str]:
    """Hydra overrides of the e2e run: the paper recipe with its schedule scaled to ``epochs``, the fast
    path's options for ``path=fast``, the toy sizes of ``REDUCED_E2E`` if ``reduced``, then ``extra``."""
    scale = epochs / 100
    milestones = sorted({max(1, min(epochs - 1, round(70 * scale))), max(1, min(epochs - 1, round(85 * scale)))})
    out = [
        "experiment=paper_resnet18_c10",
        "pruning.sparsity=0.99",
        f"trainer={'gpu' if cuda else 'cpu'}",
        f"trainer.max_epochs={epochs}",
        f"pruning.epoch={min(epochs - 1, round(30 * scale))}",
        f"optim.milestones=[{','.join(str(m) for m in milestones)}]",
        "eval.pgd_steps=50",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",  # in-memory data; 4 workers would respawn for every per-epoch subset loader
        f"+run_dir={run_dir}",
    ]
    if path == "fast":
        # the per-epoch validation/monitor attacks crafted in bf16 too (scored in fp32; the final eval stays fp32)
        out += ["fast.enabled=true", "fast.precision=bf16", "fast.channels_last=true", "val_attack_precision=bf16"]
    return out + (list(REDUCED_E2E) if reduced else []) + list(extra)


def run_e2e(bench: Bench, path: str) -> dict[str, Any]:
    """The recipe through frep_lightning.train.run, phases timed (hydra needed here only)."""
    from hydra import compose, initialize_config_dir

    from frep_lightning import train as train_mod
    from frep_lightning.data import datamodule as dm_mod

    args = bench.args
    start_wall = time.time()
    run_dir = Path(args.e2e_run_dir) / f"{path}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    overrides = e2e_overrides(args.epochs, path, bench.cuda, run_dir, shlex.split(args.e2e_overrides), args.reduced)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    timer = PhaseTimer(bench.cuda)
    originals = (train_mod.build_callbacks, train_mod.evaluate, dm_mod.ImageClassificationData.setup)
    build_callbacks, evaluate, setup = originals

    def timed_callbacks(*a: Any, **k: Any) -> Any:
        callbacks, export = build_callbacks(*a, **k)
        timer.instrument(callbacks)
        callbacks.append(timer)
        return callbacks, export

    def timed_evaluate(*a: Any, **k: Any) -> Any:
        with timer.phase("final eval"):
            return evaluate(*a, **k)

    def timed_setup(self: Any, *a: Any, **k: Any) -> Any:
        with timer.phase("data"):
            return setup(self, *a, **k)

    train_mod.build_callbacks, train_mod.evaluate = timed_callbacks, timed_evaluate
    dm_mod.ImageClassificationData.setup = timed_setup  # type: ignore[method-assign]
    try:
        summary = train_mod.run(cfg)
    finally:
        train_mod.build_callbacks, train_mod.evaluate = build_callbacks, evaluate
        dm_mod.ImageClassificationData.setup = setup  # type: ignore[method-assign]
    end_wall = time.time()
    phases = dict(timer.totals)
    phases["other (config, model build, Lightning, loaders, summary)"] = (end_wall - start_wall) - sum(phases.values())
    result: dict[str, Any] = {
        "path": path,
        "overrides": " ".join(overrides),
        "epochs": summary.get("epochs"),
        "global_steps": summary.get("global_steps"),
        "clean_acc": summary.get("clean_acc"),
        "pgd_acc": summary.get("pgd_acc"),
        "pgd_steps": summary.get("pgd_steps"),
        "sparsity": summary.get("sparsity"),
        "train_step": summary.get("train_step"),
        "seconds, run() start to summary.json": round(end_wall - start_wall, 1),
        "train_seconds (summary)": summary.get("train_seconds"),
        "eval_seconds (summary)": summary.get("eval_seconds"),
        "model_path": summary.get("model_path"),
        "phases": phases,
    }
    if not bench.e2e and not bench.rows and bench.check is None:  # nothing else ran in this process before
        started = process_start_time()
        if "export end" in timer.marks:
            result["seconds, process start to model.pt"] = round(timer.marks["export end"] - started, 1)
        result["seconds, process start to summary.json"] = round(end_wall - started, 1)
    return result


# ---- command line ----------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def versions() -> str:
    return f"torch {torch.__version__}, lightning {pl.__version__}, python {platform.python_version()}"


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=_csv(str), default=None, help="default resnet18,vgg16_bn")
    parser.add_argument("--batch-sizes", type=_csv(int), default=None, help="default 128,512")
    parser.add_argument("--methods", type=_csv(str), default=None, help=f"default {','.join(METHODS)}")
    parser.add_argument("--modes", type=_csv(str), default=None, help=f"any of {','.join(MODES)}; default per method")
    parser.add_argument("--steps", type=int, default=None, help="max timed steps per mode (default 200)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, capture included (default 5)")
    parser.add_argument("--max-seconds", type=float, default=None, help="timed seconds per mode, about (default 1)")
    parser.add_argument("--width", type=int, default=None, help="model base width (default: published size)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="compile-bf16 mode")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None, help="captured == eager")
    parser.add_argument("--budget", type=float, default=None, help="skip remaining modes after this many seconds")
    parser.add_argument("--reduced", action=argparse.BooleanOptionalAction, default=None, help="default: no CUDA")
    parser.add_argument(
        "--profile",
        type=_csv(str),
        default=[],
        help="bare fast modes to profile kernel by kernel (frep, first model and bs), e.g. fast-bf16,fast-bf16-s2",
    )
    parser.add_argument("--e2e", action="store_true", help="also run the paper recipe end to end")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end run(s)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the end-to-end run (100; reduced: 3)")
    parser.add_argument("--e2e-paths", type=_csv(str), default=["fast"], help="fast and/or plain")
    parser.add_argument("--e2e-overrides", default="", help="extra Hydra overrides, e.g. 'data.root=.pack'")
    parser.add_argument("--out-dir", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--e2e-run-dir", default=str(REPO / "outputs" / "bench-e2e"), help="e2e runs' own files")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    if args.reduced is None:
        args.reduced = not cuda
    if args.reduced:
        defaults = {"models": ["resnet18", "vgg16_bn"], "batch_sizes": [8], "steps": 3, "warmup": 2, "epochs": 3}
        defaults.update({"max_seconds": 0.2, "width": 4, "compile": False, "check": False})
    else:
        defaults = {"models": ["resnet18", "vgg16_bn"], "batch_sizes": [128, 512], "steps": 200, "warmup": 5}
        defaults.update({"max_seconds": 1.0, "width": None, "compile": cuda, "check": cuda, "epochs": 100})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = args.methods or ["frep", "natural", "pgd10"]
    for m in args.models:
        if m not in model_names():
            parser.error(f"--models: {m!r} is not valid; allowed values: {', '.join(model_names())}")
    for m in args.methods:
        if m not in METHODS:
            parser.error(f"--methods: {m!r} is not valid; allowed values: {', '.join(METHODS)}")
    for m in args.modes or []:
        if m not in MODES:
            parser.error(f"--modes: {m!r} is not valid; allowed values: {', '.join(MODES)}")
    for m in args.profile:
        if m not in MODES or m.startswith(("pl-", "compile")) or m == "eager":
            parser.error(f"--profile: {m!r} is not a bare fast mode (e.g. fast-bf16, fast-bf16-s2)")
    for p in args.e2e_paths:
        if p not in ("fast", "plain"):
            parser.error(f"--e2e-paths: {p!r} is not valid; allowed values: fast, plain")
    if any(b <= 0 for b in args.batch_sizes) or args.steps < 1 or args.warmup < 2 or args.epochs < 2:
        parser.error("--batch-sizes and --steps must be > 0, --warmup >= 2 (capture happens in it), --epochs >= 2")
    if args.check and not cuda:
        parser.error("--check compares a CUDA graph with eager steps: it needs CUDA")
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, int, str, str]]:
    """(model, bs, method, mode) in order of importance: the issue's targets first, compile last."""
    modes_for = REDUCED_MODES if args.reduced else DEFAULT_MODES
    out = []
    for model in args.models:
        for bs in args.batch_sizes:
            for method in args.methods:
                modes = args.modes or modes_for[method]
                out += [(model, bs, method, mode) for mode in modes if mode not in COMPILING and applies(method, mode)]
    if args.compile:  # compiling modes last: the numbers come first if the budget runs out
        for mode in COMPILED_MODEL:  # compile-bf16 (reduce-overhead) follows, by its own rule below
            out += [
                (model, bs, method, mode)
                for model in args.models
                for bs in args.batch_sizes
                for method in args.methods
                if mode in (args.modes or modes_for[method]) and applies(method, mode)
            ]
    if args.compile and (args.modes is None or "compile-bf16" in args.modes):
        if args.modes is None:
            out.append((args.models[0], args.batch_sizes[0], "frep", "compile-bf16"))
        else:
            out += [
                (mo, bs, me, "compile-bf16") for mo in args.models for bs in args.batch_sizes for me in args.methods
            ]
    return out


def main(argv: Sequence[str] | None = None) -> Bench:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.reduced and args.device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread, immune to oversubscribed CPUs (2 threads were 60x slower)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> Bench:
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every mode alike (the fast path turns it on by default)
    bench = Bench(device=device, args=args)
    print(f"bench on {device_name(device)}; {versions()}; reduced={args.reduced}", flush=True)
    if not args.e2e_only:
        if args.check:
            try:
                bench.check = capture_check(device, args.models[0], args.width, args.batch_sizes[0])
            except Exception as err:
                bench.check = {"result": f"FAILED to run: {type(err).__name__}: {err}"}
                traceback.print_exc()
            print(f"capture check: {bench.check}", flush=True)
            bench.write()
        for model, bs, method, mode in plan(args):
            row = bench.run_mode(model, bs, method, mode)
            bench.rows.append(row)
            ms = "-" if row.ms is None else f"{row.ms:8.2f} ms {row.images_per_s:9,.0f} img/s"
            print(f"{model:9s} bs{bs:<4d} {method:7s} {mode:13s} {ms}  {row.note}", flush=True)
            bench.write()
        for mode in args.profile:
            try:
                prof = profile_step(bench, args.models[0], args.batch_sizes[0], mode)
            except Exception as err:  # a profile is a diagnosis: it must not end the bench
                prof = {"model": args.models[0], "bs": args.batch_sizes[0], "mode": mode, "what": "FAILED",
                        "error": f"{type(err).__name__}: {err}", "top": []}  # fmt: skip
                traceback.print_exc()
            bench.profiles.append(prof)
            print(f"profile {mode}: { ({k: v for k, v in prof.items() if k != 'top'}) }", flush=True)
            bench.write()
    if args.e2e or args.e2e_only:
        for path in args.e2e_paths:
            try:
                result = run_e2e(bench, path)
            except Exception as err:
                result = {"path": path, "result": f"FAILED: {type(err).__name__}: {err}"}
                traceback.print_exc()
            bench.e2e.append(result)
            print(f"e2e {path}: {json.dumps(result, default=str)}", flush=True)
            bench.write()
    bench.write()
    print("\n" + bench.markdown(), flush=True)
    print(f"written: {bench.path} (+ .json)", flush=True)
    return bench


if __name__ == "__main__":
    main()
