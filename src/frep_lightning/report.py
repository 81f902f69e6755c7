"""``frep-report <sweep dir>...``: the paper's tables and figures from finished runs.

Collects every run under the given directories (``summary.json`` from ``frep-train``,
``eval.json`` from ``frep-eval``, the resolved ``config.yaml``, Hydra's ``overrides.yaml``) and
writes ``report.md`` with

- tables in the paper's layout: one per (dataset, model), rows = method (x sparsity), columns =
  attacks (Clean, FGSM, PGD-50, MIM-50, Square, AA), plus measured sparsity and training time;
- PNG figures: robust accuracy vs sparsity per method (Fig. 8), weight-magnitude histograms of
  each method's ``model.pt`` (Fig. 7), ensemble-vs-live output distance and robust accuracy along
  training from the CSV logger's ``metrics.csv`` (Fig. 5), Square accuracy vs queries (Fig. 6);
- a "Missing" section: jobs a sweep's ``multirun.yaml`` asked for that have no run directory, runs
  without ``summary.json`` (failed or still running), and figures that lack their data. Nothing
  absent is skipped silently.

Numbers come from ``eval.json`` when present (the full ``frep-eval`` attacks), else from
``summary.json`` (clean and PGD-``eval.pgd_steps`` of the same exported file); each row says which.
Seeds of one configuration (runs that differ in no override but ``seed``) share a row as mean ± std;
a cell never averages numbers of different L-inf eps or test-image counts, and the eps of every
robust number is stated (once per table, or per row and cell where they differ).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import OmegaConf

# eval.json names (issue 3) -> column titles, in the paper's column order
ATTACKS: tuple[tuple[str, str], ...] = (
    ("clean", "Clean"),
    ("fgsm", "FGSM"),
    ("pgd50", "PGD-50"),
    ("mim50", "MIM-50"),
    ("square", "Square"),
    ("aa", "AA"),
    ("aa_custom", "AA (custom)"),  # aa.version=custom: a subset of AutoAttack, never under "AA"
    ("worst_case", "Worst case"),
)
ROBUST_PREFERENCE = ("aa", "pgd50", "worst_case", "mim50", "pgd20", "pgd10", "square", "fgsm")
METHOD_ORDER = ("dense_at", "ori", "sparse_init", "fgsm", "lwm", "frep_ch", "frep")
# overrides that place a run in its row already (dataset, model, method, target) or change no number: two runs
# that differ in any other override are two rows, never two seeds of one (e.g. experiment=table4 vs
# experiment=table4_structured at 70%, or two sweeps with different trainer.max_epochs)
ROW_KEYS = ("data", "model", "method", "pruning.sparsity")
# sweep keys that place a run in a table (group / row position) rather than naming a variant
PLACEMENT_KEYS = (*ROW_KEYS, "seed", "experiment")
NEUTRAL_KEYS = (
    "seed", "logger", "ckpt_path", "run_dir", "data.root", "data.cache_dir", "data.num_workers", "monitor",
    "checkpoint.every_n_train_steps", "checkpoint.background",
)  # fmt: skip
# and every key under these: where a run logs, and the overfitting watch (its own RNG: the run is unchanged)
NEUTRAL_PREFIXES = ("hydra", "logger.", "monitor.")
NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "svhn": "SVHN",
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50",
    "vgg16_bn": "VGG-16",
    "wrn28_10": "WRN-28-10",
}
SQUARE_Q = re.compile(r"^square_q(\d+)$")
SQUARE_STANDARD_QUERIES = 5000  # frep-eval's default budget (conf/eval.yaml queries)


# -- collecting --------------------------------------------------------------------------
def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except Exception:  # a half-written or foreign file: treated as absent
        return None


def _select(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    except Exception:
        return None
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


# overrides that a resume adds to a job (``ckpt_path=<dir>/checkpoints/last.ckpt hydra.run.dir=<dir>`` rewrites
# the job's .hydra/overrides.yaml with them): the run is still that job
RESUME_KEYS = ("ckpt_path",)


def job_key(overrides: Iterable[str]) -> frozenset[str]:
    """What identifies a sweep job among runs: its overrides, less those a resume in place adds."""
    return frozenset(o for o in overrides if _override_key(o) not in RESUME_KEYS)


class Number(NamedTuple):
    """One accuracy of a run and what it stands on: test images, the file it came from, the L-inf eps."""

    value: float
    n: int | None
    file: str
    eps: float | None


def _eps_of(data: dict[str, Any]) -> float | None:
    eps = data.get("eps")
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def eps_text(eps: float | None) -> str:
    """8/255 as ``8/255`` (what configs and the paper say), other radii as numbers, unknown as ``?``."""
    if eps is None or not math.isfinite(eps):
        return "?"
    k = eps * 255
    return f"{round(k, 1):g}/255" if abs(k - round(k, 1)) < 1e-6 else f"{eps:.4g}"


@dataclass
class Run:
    """One training run directory and what was found in it."""

    path: Path
    config: Any = None
    summary: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    # eval_*.json by file name (AutoAttack on a subset, Square at other budgets, ...)
    extra_evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    variant_keys: tuple[str, ...] = ()
    # frep-eval ckpt=<run>/checkpoints/last.ckpt writes its eval.json there: of a checkpoint, not of model.pt
    checkpoint_evals: list[Path] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.summary is not None or self.evaluation is not None

    def get(self, summary_key: str, config_key: str) -> Any:
        if self.summary is not None and self.summary.get(summary_key) is not None:
            return self.summary[summary_key]
        return _select(self.config, config_key)

    @property
    def method(self) -> str:
        return str(self.get("method", "method.name") or "?")

    @property
    def model(self) -> str:
        return str(self.get("model", "model.name") or "?")

    @property
    def dataset(self) -> str:
        return str(self.get("dataset", "data.name") or "?")

    @property
    def sparsity_target(self) -> float:
        if self.summary is not None and self.summary.get("sparsity_target") is not None:
            return float(self.summary["sparsity_target"])
        if _select(self.config, "pruning._target_") is None:
            return 0.0  # no pruning callback: dense
        return float(_select(self.config, "pruning.sparsity") or 0.0)

    @property
    def sparsity(self) -> float | None:
        for source in (self.evaluation, self.summary):
            if source is not None and isinstance(source.get("sparsity"), (int, float)):
                return float(source["sparsity"])
        return None

    @property
    def structured(self) -> bool:
        """Pruned by output channel (the target counts channels, not weights)."""
        mode = self.summary.get("pruning_mode") if self.summary is not None else None
        return (mode or _select(self.config, "pruning.mode")) == "structured" and self.sparsity_target > 0

    @property
    def channels_removed(self) -> float | None:
        """Fraction of the pruned layers' output channels that carry no weight (summary.json's counts)."""
        if self.summary is None:
            return None
        live, total = self.summary.get("live_channels"), self.summary.get("channels")
        if not isinstance(live, int) or not isinstance(total, int) or total <= 0:
            return None
        return 1.0 - live / total

    @property
    def macs_kept(self) -> float | None:
        """Multiply-adds per image left once the emptied channels are cut, over the dense model's
        (summary.json's ``slim``, structured runs)."""
        slimmed = self.summary.get("slim") if self.summary is not None else None
        macs = slimmed.get("macs") if isinstance(slimmed, dict) else None
        if not isinstance(macs, list) or len(macs) != 2 or not all(isinstance(m, int) for m in macs) or macs[0] <= 0:
            return None
        return macs[1] / macs[0]

    @property
    def seed(self) -> str | None:
        """The run's seed (summary.json, else the config, else a ``seed=`` override); ``None`` if unknown."""
        for value in (self.summary.get("seed") if self.summary else None, _select(self.config, "seed")):
            if value is not None:
                return str(value)
        given = {_override_key(o): _override_value(o) for o in self.overrides}
        return given.get("seed")

    @property
    def finished_at(self) -> float:
        """When the run's results were written (the newest of summary.json / eval.json), 0 without them."""
        times = [p.stat().st_mtime for p in (self.path / "summary.json", self.path / "eval.json") if p.is_file()]
        return max(times, default=0.0)

    @property
    def label(self) -> str:
        """Method name, plus the swept non-placement keys of its sweep (``objective=pgd``)."""
        given = {_override_key(o): _override_value(o) for o in self.overrides}
        extra = [f"{'.'.join(k.split('.')[-2:])}={given[k]}" for k in self.variant_keys if k in given]
        return " ".join([self.method, *extra])

    def summary_eps(self) -> float | None:
        """The radius of summary.json's attacks (older summaries lack ``eps``: the run config's ``eval.eps``)."""
        eps = None if self.summary is None else _eps_of(self.summary)
        if eps is not None:
            return eps
        from frep_lightning.attacks import parse_eps

        try:
            return parse_eps(_select(self.config, "eval.eps"), "eval.eps")
        except ValueError:
            return None

    def summary_square_queries(self) -> int | None:
        """Square's budget behind summary.json's ``square_acc``: the run config's ``eval.queries`` (summary.json
        does not record it, and ``eval.queries=500`` must not pass for the 5,000-query column)."""
        queries = _select(self.config, "eval.queries")
        return queries if isinstance(queries, int) and not isinstance(queries, bool) else None

    def summary_square_standard(self) -> bool:
        return self.summary_square_queries() in (None, SQUARE_STANDARD_QUERIES)

    def measured(self) -> dict[str, Number]:
        """Attack name -> :class:`Number` (accuracy in [0, 1], test images, file, eps): eval.json first, then
        summary.json, then attacks that only an extra ``eval_*.json`` has (e.g. AutoAttack on a subset)."""
        out: dict[str, Number] = {}
        if self.summary is not None:
            n = self.summary.get("n_test") if isinstance(self.summary.get("n_test"), int) else None
            eps = self.summary_eps()
            acc: dict[str, float] = {}
            if isinstance(self.summary.get("clean_acc"), (int, float)):
                acc["clean"] = float(self.summary["clean_acc"])
            if isinstance(self.summary.get("pgd_acc"), (int, float)):
                acc[f"pgd{int(self.summary.get('pgd_steps') or 10)}"] = float(self.summary["pgd_acc"])
            acc.update(_attack_numbers(self.summary))
            for key, value in self.summary.items():  # frep-train's eval.attacks: <name>_acc
                name = key[: -len("_acc")]
                if key.endswith("_acc") and name not in ("clean", "pgd") and isinstance(value, (int, float)):
                    acc[name] = float(value)
            if "aa" in acc and _select(self.config, "eval.aa.version") == "custom":  # after aa_acc, frep-train's key
                acc["aa_custom"] = acc.pop("aa")
            out.update(
                {name: Number(value, n, "summary.json", eps) for name, value in acc.items()
                 if _counts(self.summary, name) and (name != "square" or self.summary_square_standard())}
            )  # fmt: skip
        if self.evaluation is not None:
            n = self.evaluation.get("n") if isinstance(self.evaluation.get("n"), int) else None
            eps = _eps_of(self.evaluation)
            out.update(
                {_aa_name(self.evaluation, name): Number(value, n, "eval.json", eps)
                 for name, value in _attack_numbers(self.evaluation).items() if _counts(self.evaluation, name)}
            )  # fmt: skip
        for file, extra in self.extra_evals.items():
            n = extra.get("n") if isinstance(extra.get("n"), int) else None
            for name, value in _attack_numbers(extra).items():
                name = _aa_name(extra, name)
                if name not in out and _extra_attack_counts(extra, name):
                    out[name] = Number(value, n, file, _eps_of(extra))
        return out

    def accuracies(self) -> dict[str, float]:
        """Attack name -> accuracy in [0, 1] (see :meth:`measured`)."""
        return {name: number.value for name, number in self.measured().items()}

    def square_curve(self) -> dict[int, float]:
        """Square accuracy by query budget: ``square_q<N>`` keys, a ``square_queries`` mapping, or
        the ``square`` result of every ``eval*.json`` with its ``attack_settings.square.queries``."""
        curve: dict[int, float] = {}
        square_acc = None if self.summary is None else self.summary.get("square_acc")
        summary_queries = self.summary_square_queries()
        if isinstance(square_acc, (int, float)) and summary_queries is not None:
            curve[summary_queries] = float(square_acc)  # eval.attacks=[square] at eval.queries
        for source in (self.summary, self.evaluation, *self.extra_evals.values()):
            if source is None:
                continue
            queries_used = (source.get("attack_settings") or {}).get("square", {}).get("queries")
            if isinstance(source.get("square"), (int, float)) and isinstance(queries_used, int):
                curve[queries_used] = float(source["square"])
            for key, value in _flat_numbers(source).items():
                match = SQUARE_Q.match(key)
                if match:
                    curve[int(match.group(1))] = value
            queries = source.get("square_queries")
            if isinstance(queries, dict):
                curve.update({int(q): float(v) for q, v in queries.items() if isinstance(v, (int, float))})
        return dict(sorted(curve.items()))

    @property
    def source(self) -> str:
        return "eval.json" if self.evaluation is not None else "summary.json"

    def metrics_csvs(self) -> list[Path]:
        """The training run's CSVLogger files, oldest first: ``version_N`` in numeric order (a resume in the
        same run directory starts a new version), never frep-eval's own logs (``eval_logs/``)."""

        def order(path: Path) -> tuple[int, ...]:
            return tuple(int(m.group(1)) for part in path.parts if (m := re.fullmatch(r"version_(\d+)", part)))

        found = [p for p in self.path.glob("**/metrics.csv") if "eval_logs" not in p.relative_to(self.path).parts]
        return sorted(found, key=lambda p: (order(p), str(p)))


def _train_seconds(summary: dict[str, Any]) -> float | None:
    """Training time of a run, resumed segments included (``train_seconds_total``; older summaries:
    ``train_seconds``, the last process's fit only)."""
    value = summary.get("train_seconds_total") or summary.get("train_seconds")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _flat_numbers(data: dict[str, Any]) -> dict[str, float]:
    """Top-level numbers and those inside an accuracy container (``{"robust": {"pgd50": ...}}``)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, dict) and key in ("accuracy", "accuracies", "robust", "eval"):
            for k, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.setdefault(k, float(v))
    return out


def _attack_numbers(data: dict[str, Any]) -> dict[str, float]:
    flat = _flat_numbers(data)
    names = {a for a, _ in ATTACKS} | set(ROBUST_PREFERENCE)
    out = {k: v for k, v in flat.items() if k in names and 0.0 <= v <= 1.0}
    for k, v in flat.items():  # pgd<k> / mim<k> with other step counts
        if re.fullmatch(r"(pgd|mim)\d+", k) and 0.0 <= v <= 1.0:
            out[k] = v
    return out


def _aa_name(source: dict[str, Any], name: str) -> str:
    """``aa_custom`` for an AutoAttack run with ``aa.version=custom`` (some of its attacks only: weaker than
    standard AA, so never in the AA column), else ``name``."""
    settings = (source.get("attack_settings") or {}).get("aa") or {}
    return "aa_custom" if name == "aa" and settings.get("version") == "custom" else name


def _counts(source: dict[str, Any], name: str) -> bool:
    """Whether a file's number may stand in its table column: Square only at the standard budget, from any
    file (other budgets are points of the queries curve, Fig. 6, not "Square" beside standard results)."""
    if name == "square":
        queries = (source.get("attack_settings") or {}).get("square", {}).get("queries")
        return queries in (None, SQUARE_STANDARD_QUERIES)
    return True


def _extra_attack_counts(extra: dict[str, Any], name: str) -> bool:
    """Whether an extra ``eval_*.json`` number may stand in a table column: not ``clean`` or
    ``worst_case`` (they belong to that file's subset and attack list), and as :func:`_counts` says."""
    return name not in ("clean", "worst_case") and _counts(extra, name)


def is_run_dir(path: Path) -> bool:
    return (
        any((path / name).is_file() for name in ("summary.json", "eval.json", "config.yaml"))
        or (path / ".hydra" / "overrides.yaml").is_file()
    )


def load_run(path: Path) -> Run:
    config = _load_yaml(path / "config.yaml") or _load_yaml(path / ".hydra" / "config.yaml")
    overrides = _load_yaml(path / ".hydra" / "overrides.yaml")
    extra = {p.name: _load_json(p) for p in sorted(path.glob("eval?*.json"))}
    return Run(
        path=path,
        config=config,
        summary=_load_json(path / "summary.json"),
        evaluation=_load_json(path / "eval.json"),
        extra_evals={name: e for name, e in extra.items() if e is not None},
        overrides=[str(o) for o in (OmegaConf.to_container(overrides) if overrides is not None else [])],
        checkpoint_evals=sorted((path / "checkpoints").glob("eval*.json")),
    )


@dataclass
class Sweep:
    """A Hydra multirun directory: the jobs it asked for and the runs found in it."""

    path: Path
    expected: list[list[str]]
    varying: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)
    error: str | None = None  # why the job list could not be read (then only the runs found are known)

    def missing(self) -> list[tuple[list[str], str]]:
        """(overrides, reason) for every expected job without a finished run."""
        by_overrides: dict[Any, Run] = {}
        for r in self.runs:  # a job run twice (failed, then rerun elsewhere in the sweep): the finished one counts
            known = by_overrides.get(job_key(r.overrides))
            if known is None or (r.done and not known.done):
                by_overrides[job_key(r.overrides)] = r
        out = []
        for job in self.expected:
            run = by_overrides.get(job_key(job))
            if run is None:
                out.append((job, "no run directory (not started)"))
            elif not run.done:
                out.append((job, f"no summary.json in {run.path.name} (failed or still running)"))
        return out

    def not_started(self) -> int:
        """Expected jobs with no run directory (a started run without results is counted as a run)."""
        started = {job_key(r.overrides) for r in self.runs}
        return sum(job_key(job) not in started for job in self.expected)


def expected_jobs(multirun_yaml: Path) -> tuple[list[list[str]], tuple[str, ...]]:
    """The job override lists the basic sweeper makes from ``multirun.yaml`` (sweeper params +
    command-line overrides, as ``BasicSweeper.sweep`` combines them), and the swept keys."""
    from frep_lightning.sweep import basic_sweeper_jobs, sweep_overrides

    overrides = sweep_overrides(OmegaConf.load(multirun_yaml))
    jobs = basic_sweeper_jobs(overrides)
    varying = tuple(
        o.get_key_element().lstrip("+~")
        for o in overrides
        if o.is_sweep_override() and len(list(o.sweep_string_iterator())) > 1
    )
    return jobs, varying


def collect(paths: Iterable[str | Path], max_depth: int = 4) -> tuple[list[Run], list[Sweep]]:
    """Every run directory and every sweep under ``paths`` (each directory counted once)."""
    runs: dict[Path, Run] = {}
    sweeps: dict[Path, Sweep] = {}

    def walk(path: Path, depth: int) -> None:
        if (path / "multirun.yaml").is_file() and path not in sweeps:
            error = None
            try:
                jobs, varying = expected_jobs(path / "multirun.yaml")
            except Exception as err:  # a foreign/broken multirun.yaml: still report its runs
                error = f"cannot read the job list of {path / 'multirun.yaml'}: {str(err).splitlines()[0]}"
                print(f"frep-report: {error}", file=sys.stderr)
                jobs, varying = [], ()
            sweeps[path] = Sweep(path=path, expected=jobs, varying=varying, error=error)
        if is_run_dir(path) and path not in runs:
            runs[path] = load_run(path)
            return
        if depth >= max_depth:
            return
        for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if child.name in ("checkpoints", "csv", "wandb", "lightning_logs"):
                continue
            walk(child, depth + 1)

    for p in paths:
        path = Path(p).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"frep-report: {p} is not a directory")
        walk(path, 0)
    sweep_keys: dict[Path, tuple[str, ...]] = {}
    for sweep in sweeps.values():
        keys = tuple(k for k in sweep.varying if k not in PLACEMENT_KEYS)
        for run in runs.values():
            if sweep.path in run.path.parents:
                sweep_keys[run.path] = keys
                sweep.runs.append(run)
    everything = list(runs.values())
    for run in everything:
        own = sweep_keys.get(run.path, ())
        run.variant_keys = own + tuple(k for k in loose_variant_keys(run, everything) if k not in own)
    return everything, list(sweeps.values())


def loose_variant_keys(run: Run, runs: list[Run]) -> tuple[str, ...]:
    """The override keys whose values differ between ``run`` and another run placed in the same table row
    (same dataset, model, method, sparsity target), in a sweep or not, so that e.g. two single runs with
    ``ensemble.average=factors`` and ``=product``, or the 70% runs of ``experiment=table4`` and
    ``experiment=table4_structured``, are two rows, not two seeds of one."""
    place = (run.dataset, run.model, run.method, run.sparsity_target)
    mine = {_override_key(o): _override_value(o) for o in run.overrides}
    keys: set[str] = set()
    for other in runs:
        if other is run or (other.dataset, other.model, other.method, other.sparsity_target) != place:
            continue
        theirs = {_override_key(o): _override_value(o) for o in other.overrides}
        keys |= {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
    return tuple(sorted(k for k in keys if k not in ROW_KEYS + NEUTRAL_KEYS and not k.startswith(NEUTRAL_PREFIXES)))


# -- tables ------------------------------------------------------------------------------
def _pretty(name: str) -> str:
    return NAMES.get(name, name)


def _method_rank(label: str) -> tuple[int, str]:
    method = label.split(" ")[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), label)


def _fmt(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f} (n={len(values)})"


def _rows(runs: Sequence[Run]) -> dict[tuple[str, str], dict[tuple[float, str], list[Run]]]:
    groups: dict[tuple[str, str], dict[tuple[float, str], list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.done:
            groups[(run.dataset, run.model)][(run.sparsity_target, run.label)].append(run)
    return groups


def _split_repeats(runs: Sequence[Run]) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """Runs of one row with the same seed are one run done twice (a sweep re-run after a kill, reported beside
    the first one), not seeds: the latest counts. Returns (the runs that count, [(repeat, the one that counts)])."""
    latest: dict[str, Run] = {}
    for run in runs:
        if run.seed is not None and (run.seed not in latest or run.finished_at > latest[run.seed].finished_at):
            latest[run.seed] = run
    kept = [r for r in runs if r.seed is None or latest[r.seed] is r]
    return kept, [(r, latest[r.seed]) for r in runs if r.seed is not None and latest[r.seed] is not r]


def grouped(runs: Sequence[Run]) -> dict[tuple[str, str], dict[tuple[float, str], list[Run]]]:
    """(dataset, model) -> (sparsity target, label) -> finished runs (several: seeds; a repeat of a seed counts
    once, see :func:`repeated_runs`)."""
    groups = _rows(runs)
    for rows in groups.values():
        for key, rs in rows.items():
            rows[key] = _split_repeats(rs)[0]
    return groups


def repeated_runs(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """(repeat, the run that counts instead) for every finished run left out of the tables as a repeat."""
    return [pair for rows in _rows(runs).values() for rs in rows.values() for pair in _split_repeats(rs)[1]]


def _cell(numbers: Sequence[Number], runs: int, tag_eps: bool) -> str:
    """The runs' numbers for one attack, averaged only over numbers of the same eps and test-image count
    (a mean over 4/255 and 8/255, or a tag-less mean over 500 and 10,000 images, would be a number nobody
    measured); ``[eps ...]`` when the row mixes radii, ``[N images]`` when the cell mixes counts, and
    ``(k of m runs)`` when not every run of the row has it."""
    if not numbers:
        return "–"
    groups: dict[tuple[float | None, int | None], list[float]] = defaultdict(list)
    for number in numbers:
        groups[(number.eps if tag_eps else None, number.n)].append(number.value)
    counts = {n for _, n in groups}
    parts = []
    for (eps, n), values in sorted(groups.items(), key=lambda g: (g[0][0] or -1.0, g[0][1] or -1)):
        tags = [f"ε {eps_text(eps)}"] if tag_eps else []
        tags += [f"{n:,} images" if n is not None else "? images"] if len(counts) > 1 else []
        parts.append(_fmt(values) + (f" [{', '.join(tags)}]" if tags else ""))
    coverage = f" ({len(numbers)} of {runs} runs)" if len(numbers) < runs else ""
    return "; ".join(parts) + coverage


def table_markdown(rows: dict[tuple[float, str], list[Run]]) -> str:
    """One paper-layout table: rows method x sparsity, columns the attacks that any row has; the L-inf eps
    of the robust numbers in a note when the whole table shares one, else in an ``ε`` column (and on every
    robust cell of a row whose numbers do not share one)."""
    numbers = {key: [r.measured() for r in runs] for key, runs in rows.items()}
    present = {k for ms in numbers.values() for m in ms for k in m}
    row_eps = {key: {n.eps for m in ms for name, n in m.items() if name != "clean"} for key, ms in numbers.items()}
    table_eps = {e for eps in row_eps.values() for e in eps}
    eps_column = len(table_eps) > 1
    columns = [(a, title) for a, title in ATTACKS if a in present]
    extra_pgd = sorted(k for k in present if re.fullmatch(r"(pgd|mim)\d+", k) and k not in dict(ATTACKS))
    columns += [(k, k.upper().replace("PGD", "PGD-").replace("MIM", "MIM-")) for k in extra_pgd]
    memory = any(r.summary and r.summary.get("peak_memory_gb") is not None for rs in rows.values() for r in rs)
    structured = any(r.structured for rs in rows.values() for r in rs)  # Table III: the target counts channels
    head = ["Method", "Target", *(["ε"] if eps_column else []), *[t for _, t in columns], "Sparsity"]
    head += ["Channels removed"] if structured else []
    macs = structured and any(r.macs_kept is not None for rs in rows.values() for r in rs)
    head += ["MACs kept"] if macs else []
    head += ["Train (min)"]
    head += ["Peak mem (GB)"] if memory else []
    head += ["Source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(rows, key=lambda k: (k[0], _method_rank(k[1]))):
        runs = rows[key]
        cells = [key[1], f"{key[0] * 100:g}%" + (" of channels" if any(r.structured for r in runs) else "")]
        if eps_column:
            cells.append(", ".join(eps_text(e) for e in sorted(row_eps[key], key=lambda e: e or -1.0)) or "–")
        for attack, _ in columns:
            tag_eps = attack != "clean" and len(row_eps[key]) > 1
            cells.append(_cell([m[attack] for m in numbers[key] if attack in m], len(runs), tag_eps))
        measured = [r.sparsity for r in runs if r.sparsity is not None]
        cells.append(_fmt(measured, digits=2))  # type: ignore[arg-type]
        if structured:
            removed = [r.channels_removed for r in runs if r.channels_removed is not None]
            cells.append(_fmt(removed, digits=2))  # type: ignore[arg-type]
        if macs:
            kept = [r.macs_kept for r in runs if r.macs_kept is not None]
            cells.append(_fmt(kept, digits=2))  # type: ignore[arg-type]
        minutes = [_train_seconds(r.summary) / 60 for r in runs if r.summary and _train_seconds(r.summary)]
        cells.append(_fmt(minutes, scale=1.0))
        if memory:
            gb = [r.summary["peak_memory_gb"] for r in runs if r.summary and r.summary.get("peak_memory_gb")]
            cells.append(_fmt(gb, scale=1.0, digits=2))
        cells.append(", ".join(sorted({r.source for r in runs})))
        lines.append("| " + " | ".join(cells) + " |")
    note = sample_size_note(rows, columns)
    if structured:
        note = (
            "Sparsity: the fraction of prunable weights that are zero; Channels removed: the fraction of the pruned "
            "layers' output channels with no weight left (structured targets count channels). " + note
        )
    if macs:
        note = (
            "MACs kept: multiply-adds per image of the network with the emptied channels cut out "
            "(frep_lightning.slimming; a residual sum keeps its channels), over the dense network's. " + note
        )
    if table_eps == {None}:
        note = "L-inf ε: not recorded in the run files. " + note
    elif len(table_eps) == 1:
        note = f"L-inf ε = {eps_text(next(iter(table_eps)))} for every robust number. " + note
    return "\n".join([*lines, *(["", note.strip()] if note.strip() else [])])


def sample_size_note(rows: dict[tuple[float, str], list[Run]], columns: Sequence[tuple[str, str]]) -> str:
    """Test images behind each column: one sentence when all agree, else per column (an AA column on
    500 images next to PGD-50 on 10,000 must say so)."""
    sizes: dict[str, set[int]] = defaultdict(set)
    separate: dict[str, set[str]] = defaultdict(set)  # column -> extra files it came from
    separate_rows: dict[str, set[tuple[float, str]]] = defaultdict(set)  # column -> rows where it is separate
    with_column: dict[str, set[tuple[float, str]]] = defaultdict(set)  # column -> rows that have it
    for key, runs in rows.items():
        for run in runs:
            measured = run.measured()
            worst_file = measured["worst_case"].file if "worst_case" in measured else None
            for name, (_, n, file, _) in measured.items():
                with_column[name].add(key)
                if n is not None:
                    sizes[name].add(n)
                if file not in ("summary.json", "eval.json") or (
                    worst_file is not None and file != worst_file and name not in ("clean", "worst_case")
                ):  # e.g. summary.json's PGD-10 beside eval.json's worst case over other attacks
                    separate[name].add(file)
                    separate_rows[name].add(key)
    notes = []
    present = [(name, title) for name, title in columns if sizes.get(name)]
    everything = {n for name, _ in present for n in sizes[name]}
    if len(everything) == 1:
        notes.append(f"Test images per number: {everything.pop():,}.")
    elif present:
        parts = [f"{title} {' / '.join(f'{n:,}' for n in sorted(sizes[name]))}" for name, title in present]
        notes.append("Test images per number: " + "; ".join(parts) + ".")
    for name, title in columns:
        if separate.get(name):
            where = ""
            if separate_rows[name] != with_column[name]:  # name the rows: elsewhere the column is inside Worst case
                keys = sorted(separate_rows[name], key=lambda k: (k[0], _method_rank(k[1])))
                where = f" in row{'s' * (len(keys) > 1)} " + ", ".join(f"{lab} {t * 100:g}%" for t, lab in keys)
            notes.append(
                f"{title} comes from a separate evaluation ({', '.join(sorted(separate[name]))}){where}, so it is not "
                "part of that row's Worst case: the lower of the two bounds the robust accuracy."
            )
    if any(name == "square" for name, _ in present):
        notes.append(f"Square: {SQUARE_STANDARD_QUERIES:,} queries (other budgets: Fig. 6).")
    if any(name == "aa_custom" for name, _ in columns):
        notes.append("AA (custom): AutoAttack with aa.version=custom, a subset of its attacks, weaker than AA.")
    return " ".join(notes)


# -- figures -----------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    """Lay out, write and close one figure; its file name, as report.md links it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path.name


def robust_metric(runs: Sequence[Run]) -> str | None:
    """The strongest attack measured for the most runs (AA > PGD-50 > ...)."""
    best, best_count = None, 0
    for name in ROBUST_PREFERENCE:
        count = sum(name in r.accuracies() for r in runs)
        if count > best_count:
            best, best_count = name, count
    return best


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def figure_robust_vs_sparsity(runs: Sequence[Run], out: Path) -> str | None:
    """Fig. 8: robust accuracy vs measured sparsity (the target only for a run without a measurement: a
    run whose pruning never happened must not be drawn at its target), one line per method label and eps,
    one panel per group."""
    groups = grouped(runs)
    metric = robust_metric([r for r in runs if r.done])
    if metric is None or not groups:
        return None
    measured = [r.measured() for rows in groups.values() for rs in rows.values() for r in rs]
    radii = {m[metric].eps for m in measured if metric in m}
    plt = _pyplot()
    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, gkey in zip(axes[0], keys, strict=True):
        by_line: dict[tuple[str, float | None], list[tuple[float, float]]] = defaultdict(list)
        for (target, label), rs in groups[gkey].items():
            by_eps: dict[float | None, list[Run]] = defaultdict(list)
            for r in rs:
                if metric in r.measured():
                    by_eps[r.measured()[metric].eps].append(r)
            for eps, with_metric in by_eps.items():
                x = [r.sparsity if _finite(r.sparsity) else target for r in with_metric]
                y = [r.measured()[metric].value for r in with_metric]
                by_line[(label, eps)].append((statistics.fmean(x) * 100, statistics.fmean(y) * 100))
        for label, eps in sorted(by_line, key=lambda k: (_method_rank(k[0]), k[1] or -1.0)):
            pts = sorted(by_line[(label, eps)])
            name = label if len(radii) == 1 else f"{label} (ε {eps_text(eps)})"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_title(f"{_pretty(gkey[1])} / {_pretty(gkey[0])}")
        ax.set_xlabel("measured sparsity (%)")
        ax.set_ylabel(f"{metric} accuracy (%)" + (f", ε {eps_text(next(iter(radii)))}" if len(radii) == 1 else ""))
        ax.grid(alpha=0.3)
        if by_line:
            ax.legend(fontsize=7)
    return _save(fig, out / "fig8_robust_vs_sparsity.png")


def weight_magnitudes(model_pt: Path) -> tuple[Any, float]:
    """|w| of the nonzero prunable weights (Conv/Linear ``.weight``) and the fraction of zeros."""
    import torch

    from frep_lightning.export import load_state_dict_file

    state = load_state_dict_file(model_pt)
    weights = [v.detach().flatten().float() for k, v in state.items() if k.endswith(".weight") and v.dim() in (2, 4)]
    if not weights:
        return torch.empty(0), math.nan
    flat = torch.cat(weights)
    zeros = int((flat == 0).sum())
    return flat[(flat != 0) & flat.isfinite()].abs(), zeros / max(flat.numel(), 1)


def figure_weight_histograms(runs: Sequence[Run], out: Path) -> tuple[list[str], list[str]]:
    """Fig. 7: log10 |w| histograms of each method's model.pt, one figure per (dataset, model,
    sparsity); returns (figure files, runs whose model.pt is missing)."""
    plt = _pyplot()
    files, missing = [], []
    groups = grouped(runs)
    for (dataset, model), rows in sorted(groups.items()):
        by_target: dict[float, list[tuple[str, Run]]] = defaultdict(list)
        for (target, label), rs in rows.items():  # one seed per label: the first that has its model.pt
            by_target[target].append((label, next((r for r in rs if (r.path / "model.pt").is_file()), rs[0])))
        for target, entries in sorted(by_target.items()):
            fig, ax = plt.subplots(figsize=(6, 3.6))
            drawn = 0
            for label, run in sorted(entries, key=lambda e: _method_rank(e[0])):
                pt = run.path / "model.pt"
                if not pt.is_file():
                    missing.append(f"{run.path} (model.pt)")
                    continue
                try:
                    mags, zeros = weight_magnitudes(pt)
                except Exception as err:  # a truncated or foreign file: listed, not a crash of the whole report
                    missing.append(f"{run.path} (model.pt unreadable: {str(err).splitlines()[0][:200]})")
                    continue
                if mags.numel() == 0:
                    missing.append(f"{run.path} (model.pt has no finite nonzero Conv/Linear weight)")
                    continue
                ax.hist(
                    mags.clamp_min(1e-12).log10().numpy(),
                    bins=120,
                    histtype="step",
                    density=True,
                    label=f"{label} ({zeros:.1%} zeros)",
                )
                drawn += 1
            if drawn:
                ax.set_xlabel("log10 |w| of nonzero weights")
                ax.set_ylabel("density")
                ax.set_title(f"{_pretty(model)} / {_pretty(dataset)}, target {target:.0%}")
                ax.legend(fontsize=7)
                files.append(_save(fig, out / f"fig7_weights_{dataset}_{model}_s{target:g}.png"))
            else:
                plt.close(fig)
    return files, missing


def read_metrics(paths: Path | Sequence[Path]) -> dict[str, list[tuple[float, float]]]:
    """Per-epoch series (epoch, value) of every column of Lightning CSVLogger ``metrics.csv`` files, read
    in order: a later file (the part after a resume) replaces the epochs it logs again."""
    series: dict[str, dict[float, float]] = defaultdict(dict)
    for path in [paths] if isinstance(paths, Path) else paths:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                epoch = row.get("epoch")
                if epoch in (None, ""):
                    continue
                for key, value in row.items():
                    if key in ("epoch", "step") or value in (None, ""):
                        continue
                    try:
                        series[key][float(epoch)] = float(value)
                    except ValueError:
                        continue
    return {k: sorted(v.items()) for k, v in series.items()}


def _curve_key(key: str) -> bool:
    """A metrics.csv column that Fig. 5 draws."""
    return bool(re.fullmatch(r"val(_live)?/pgd\d+", key)) or key in ("train/pgd_subset", "ensemble/delta")


def figure_training_curves(runs: Sequence[Run], out: Path) -> tuple[list[str], list[str]]:
    """Fig. 5: (a) robust accuracy along training (validation PGD of the kept model; of the live model on the
    same images with ``ensemble.validate_live``, dotted; ``train/pgd_subset`` of the live model on training
    images, dashed), (b) ensemble-vs-live output distance (Eq. 14)."""
    plt = _pyplot()
    files, missing = [], []
    by_group: dict[tuple[str, str, float], list[tuple[str, dict[str, list[tuple[float, float]]]]]] = defaultdict(list)
    repeats = {repeat.path for repeat, _ in repeated_runs(runs)}
    for run in runs:
        if not run.done or run.path in repeats:
            continue
        paths = run.metrics_csvs()
        if not paths:
            missing.append(f"{run.path} (metrics.csv)")
            continue
        series = read_metrics(paths)
        if not any(_curve_key(k) for k in series):
            missing.append(f"{run.path} (metrics.csv has no val/pgd<k>, train/pgd_subset or ensemble/delta column)")
            continue
        by_group[(run.dataset, run.model, run.sparsity_target)].append((run.label, series))
    for (dataset, model, target), entries in sorted(by_group.items()):
        fig, (ax_acc, ax_delta) = plt.subplots(1, 2, figsize=(10, 3.6))
        any_delta = False
        for i, (label, series) in enumerate(sorted(entries, key=lambda e: _method_rank(e[0]))):
            color = f"C{i % 10}"  # one colour per run: solid = validation, dotted = live on it, dashed = live on train
            for key in sorted(series):
                if re.fullmatch(r"val/pgd\d+", key):
                    style, name = "-", key
                elif re.fullmatch(r"val_live/pgd\d+", key):
                    style, name = ":", f"live {key.split('/')[1]} (val)"
                elif key == "train/pgd_subset":
                    style, name = "--", "live (train)"
                else:
                    continue
                pts = series[key]
                ax_acc.plot(
                    [p[0] for p in pts], [p[1] * 100 for p in pts], color=color, ls=style, label=f"{label} {name}"
                )
            if "ensemble/delta" in series:
                pts = series["ensemble/delta"]
                ax_delta.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=".", label=label)
                any_delta = True
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("PGD accuracy (%)")
        ax_acc.set_title("(a) robust accuracy")
        ax_acc.grid(alpha=0.3)
        if ax_acc.lines:
            ax_acc.legend(fontsize=6)
        ax_delta.set_xlabel("epoch")
        ax_delta.set_ylabel("Δ (Eq. 14)")
        ax_delta.set_title("(b) ensemble vs live output distance" + ("" if any_delta else ": no ensemble"))
        ax_delta.grid(alpha=0.3)
        if any_delta:
            ax_delta.legend(fontsize=6)
        fig.suptitle(f"{_pretty(model)} / {_pretty(dataset)}, target {target:.0%}")
        files.append(_save(fig, out / f"fig5_training_{dataset}_{model}_s{target:g}.png"))
    return files, missing


def figure_square_queries(runs: Sequence[Run], out: Path) -> str | None:
    """Fig. 6: Square accuracy vs number of queries, one line per run that has several budgets."""
    curves = [(r, r.square_curve()) for r in runs if r.done]
    curves = [(r, c) for r, c in curves if len(c) >= 2]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    datasets = {r.dataset for r, _ in curves}  # two datasets' runs of one model are two lines that must say which
    for run, curve in sorted(curves, key=lambda rc: (rc[0].dataset, rc[0].model, _method_rank(rc[0].label))):
        label = f"{run.label} {_pretty(run.model)} ({run.sparsity_target:.0%})"
        label += f" {_pretty(run.dataset)}" if len(datasets) > 1 else ""
        ax.plot(list(curve), [v * 100 for v in curve.values()], marker="o", label=label)
    ax.set_xlabel("queries")
    ax.set_ylabel("Square accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "fig6_square_queries.png")


# -- report ------------------------------------------------------------------------------
def write_report(paths: Sequence[str | Path], out: str | Path, title: str = "frep-lightning report") -> Path:
    """Collect, tabulate, plot; returns the path of ``report.md``."""
    runs, sweeps = collect(paths)
    if not runs and not any(s.expected for s in sweeps):
        raise FileNotFoundError(
            f"frep-report: no run directory (summary.json / eval.json / config.yaml) under {list(paths)}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    finished = [r for r in runs if r.done]
    lines = [f"# {title}", "", "Sources: " + ", ".join(f"`{Path(p)}`" for p in paths), ""]
    lines.append(
        f"{len(finished)} finished run(s), {len(runs) - len(finished)} without results, "
        f"{sum(s.not_started() for s in sweeps)} expected sweep job(s) not started. Accuracies in %; "
        '"Target" is the pruning target, "Sparsity" the measured fraction of exact zeros (%).'
    )
    devices = sorted({str(r.summary.get("device")) for r in finished if r.summary and r.summary.get("device")})
    if devices:
        lines.append("Device(s): " + "; ".join(devices) + ".")
    epochs = sorted({int(r.summary["epochs"]) for r in finished if r.summary and r.summary.get("epochs") is not None})
    if epochs:
        lines.append("Epochs trained: " + ", ".join(map(str, epochs)) + ".")
    lines.append("")

    lines.append("## Tables")
    for (dataset, model), rows in sorted(grouped(runs).items()):
        lines += ["", f"### {_pretty(model)} / {_pretty(dataset)}", "", table_markdown(rows)]
    repeats = repeated_runs(runs)
    if repeats:  # the same configuration and seed twice: averaging them would pass one run off as several seeds
        lines += ["", "### Repeated runs", ""] + [
            f"- `{repeat.path}` repeats `{kept.path}` (same table row, same seed {kept.seed}): only the latest, "
            f"`{kept.path.parent.name}/{kept.path.name}`, is in the tables"
            for repeat, kept in repeats
        ]
    warnings = [
        (f"{r.path.parent.name}/{r.path.name}", w if file == "eval.json" else f"{file}: {w}")
        for r in finished
        for file, data in ([("eval.json", r.evaluation)] if r.evaluation else []) + sorted(r.extra_evals.items())
        for w in (data.get("warnings") or [])
        if isinstance(w, str)
    ]
    if warnings:
        lines += ["", "### Evaluation warnings", ""] + [f"- `{name}`: {w}" for name, w in warnings]
    collapsed = [
        (f"{r.path.parent.name}/{r.path.name}", epochs)
        for r in finished
        if r.summary and isinstance(epochs := r.summary.get("overfitting_epochs"), list) and epochs
    ]
    if collapsed:  # the robustness monitor's verdict, from summary.json: a number beside it may not be robustness
        lines += ["", "### Catastrophic overfitting", ""] + [
            f"- `{name}`: PGD accuracy on the monitor's training images collapsed at epoch(s) "
            f"{', '.join(map(str, epochs))}"
            for name, epochs in collapsed
        ]

    lines += ["", "## Figures", ""]
    fig8 = figure_robust_vs_sparsity(runs, out)
    fig7, no_model = figure_weight_histograms(runs, out)
    fig5, no_metrics = figure_training_curves(runs, out)
    fig6 = figure_square_queries(runs, out)
    missing_files = no_model + no_metrics
    missing_figures: list[str] = []
    for number, caption, images, why_missing in (
        (
            "8",
            "robust accuracy vs sparsity per method.",
            [fig8] if fig8 else [],
            "Fig. 8 (robust accuracy vs sparsity): no finished run with a robust accuracy",
        ),
        (
            "7",
            "weight magnitudes of each method's exported model.",
            fig7,
            "Fig. 7 (weight histograms): no model.pt in any finished run",
        ),
        (
            "5",
            "robust accuracy and ensemble-vs-live output distance Δ (Eq. 14) along training.",
            fig5,
            "Fig. 5 (training curves): no metrics.csv (use logger=csv or logger=wandb)",
        ),
        (
            "6",
            "Square accuracy vs queries.",
            [fig6] if fig6 else [],
            "Fig. 6 (Square accuracy vs queries): no run with Square at several query budgets; per run: "
            "frep-eval ckpt=<run> attacks=[square] queries=<N> output=<run>/eval_square_q<N>.json",
        ),
    ):
        if images:
            lines += [f"Fig. {number}: {caption}", "", *[f"![Fig. {number}]({name})" for name in images], ""]
        else:
            missing_figures.append(why_missing)

    lines += ["## Missing", ""]
    any_missing = False
    for sweep in sweeps:
        for job, reason in sweep.missing():
            lines.append(f"- sweep `{sweep.path.name}`: `{' '.join(job)}`: {reason}")
            any_missing = True
    for sweep in sweeps:
        if sweep.error:
            lines.append(f"- sweep `{sweep.path.name}`: {sweep.error}; jobs that never started are not known")
            any_missing = True
    # runs a sweep's job list names are listed above; any other run without results here (outside a
    # sweep, in a sweep whose job list is unreadable, or whose overrides are not one of its jobs)
    listed = {r.path for s in sweeps for r in s.runs if job_key(r.overrides) in {job_key(j) for j in s.expected}}
    for run in runs:
        if not run.done and run.path not in listed:
            lines.append(f"- run `{run.path}`: no summary.json / eval.json (failed or still running)")
            any_missing = True
    for run in runs:  # not read: the tables are of model.pt, and a checkpoint may be from mid-training
        for path in run.checkpoint_evals:
            lines.append(
                f"- file: {path}: an evaluation of a checkpoint, not in the tables (to use it, evaluate the run "
                f"directory, or pass output={run.path}/eval_<name>.json)"
            )
            any_missing = True
    for item in missing_files:
        lines.append(f"- file: {item}")
        any_missing = True
    for item in missing_figures:
        lines.append(f"- figure: {item}")
        any_missing = True
    if not any_missing:
        lines.append("Nothing missing.")
    lines.append("")

    records = [
        {
            "path": str(r.path),
            "method": r.method,
            "label": r.label,
            "model": r.model,
            "dataset": r.dataset,
            "sparsity_target": r.sparsity_target,
            "sparsity": r.sparsity,
            "accuracies": r.accuracies(),
            "measured": {name: number._asdict() for name, number in r.measured().items()},  # n, file, eps
            "overfitting_epochs": r.summary.get("overfitting_epochs") if r.summary else None,
            "train_seconds": _train_seconds(r.summary) if r.summary else None,
            "source": r.source,
        }
        for r in finished
    ]
    (out / "report.json").write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="frep-report",
        description="Tables (paper layout) and figures (Figs. 5-8) from frep-train runs and sweeps.",
    )
    parser.add_argument("dirs", nargs="+", help="sweep directories (multirun/...) or run directories")
    parser.add_argument(
        "-o", "--out", default=None, help="output directory (default: the only dir given, else ./report)"
    )
    parser.add_argument("--title", default="frep-lightning report")
    args = parser.parse_args(argv)
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 else "report")
    try:
        path = write_report(args.dirs, out, title=args.title)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"frep-report: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
