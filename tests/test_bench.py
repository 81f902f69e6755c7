"""experiments/bench.py in its reduced (CPU) form: every planned row is measured and written, the
targets table is filled, bad options fail naming the option, the GPU check's code runs (eagerly)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("frep_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["frep_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reduced_bench_measures_every_planned_row(bench: ModuleType, tmp_path: Path) -> None:
    start = time.perf_counter()
    result = bench.main(["--reduced", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert time.perf_counter() - start < 60  # ~6 s on an idle 2-core CPU

    expected = bench.plan(result.args)
    assert [(r.model, r.bs, r.method, r.mode) for r in result.rows] == expected
    assert {m for m, *_ in expected} == {"resnet18", "vgg16_bn"}
    assert {me for _, _, me, _ in expected} == {"natural", "frep", "pgd10"}
    for row in result.rows:
        assert row.ms is not None and row.ms > 0, row
        assert row.images_per_s == pytest.approx(row.bs / row.ms * 1000)
        assert "FAILED" not in row.note and row.steps >= 3, row
    # on CPU the fast modes run the same step eagerly, and say so
    fast = [r for r in result.rows if r.mode == "fast-fp32"]
    assert fast and all(r.note.startswith("eager, fp32") for r in fast)
    lightning = [r for r in result.rows if r.mode == "pl-fast-bf16"]
    assert lightning and all("DeviceBatches, pruning 99 %, ensemble" in r.note for r in lightning)

    name = f"bench-cpu-{datetime.date.today().isoformat()}"
    md = (tmp_path / f"{name}.md").read_text()
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert result.path == tmp_path / f"{name}.md"
    assert "| model | bs | method | mode | ms/step | images/s |" in md and "## Targets (issue 4)" in md
    assert md.count("\n| resnet18 | 8 |") + md.count("\n| vgg16_bn | 8 |") == len(expected)
    assert len(data["rows"]) == len(expected) and data["device"].startswith("cpu")
    ratios = {what.split(",")[0]: value for what, value, _ in data["ratios"]}
    assert ratios["FReP fast step in Lightning (pl-fast-bf16)"] > 0
    assert ratios["eager PGD-10 / fast FReP (pl-fast-bf16)"] > 0


def test_targets_divide_the_slower_step_by_the_faster(bench: ModuleType) -> None:
    """The targets table from known step times: FReP/natural and PGD-10/FReP are "x times as slow", eager/fast
    a speed-up, and the Lightning fast path a user would pick is the fastest pl-fast row that ran."""
    args = bench.parse_args(["--reduced", "--device", "cpu"])
    result = bench.Bench(device=torch.device("cpu"), args=args)
    model, bs = args.models[0], args.batch_sizes[0]
    times = {
        ("frep", "eager"): 40.0,
        ("frep", "fast-bf16"): 8.0,
        ("frep", "pl-fast-bf16"): 10.0,
        ("frep", "pl-fast-bf16-s2"): 9.0,
        ("frep", "pl-fast-bf16-cm"): None,  # failed
        ("natural", "fast-bf16"): 2.0,
        ("natural", "fast-fp32"): 3.0,
        ("pgd10", "eager"): 99.0,
    }
    result.rows = [bench.Row(model, bs, method, mode, ms=ms) for (method, mode), ms in times.items()]
    result.rows.append(bench.Row("vgg16_bn", bs, "frep", "pl-fast-bf16", ms=1.0))  # another model: not a target
    values = [value for _, value, _ in result.ratios()]
    assert values == pytest.approx([9.0, 8.0 / 2.0, 99.0 / 9.0, 40.0 / 9.0])
    assert "pl-fast-bf16-s2" in result.ratios()[0][0]
    assert "| 11.00 | >= 10 |" in result.markdown()
    assert "fast-bf16 / fast-bf16" in result.ratios()[1][0]
    result.rows = [r for r in result.rows if (r.method, r.mode) != ("natural", "fast-bf16")]
    label, value, _ = result.ratios()[1]  # no bf16 natural row: the fp32 one, and the label says so
    assert value == pytest.approx(8.0 / 3.0) and "fast-bf16 / fast-fp32" in label


def test_step_times_are_milliseconds_per_timed_step(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """time_loop and the Lightning StepTimer on a clock that only the steps advance (5 ms and 4 ms a step)."""
    clock = [100.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls: list[int] = []

    def step(i: int) -> None:
        calls.append(i)
        clock[0] += 0.005

    assert bench.time_loop(step, torch.device("cpu"), warmup=2, steps=4, max_seconds=10.0) == (
        pytest.approx(5.0),
        4,
    )
    assert calls == list(range(2 + 2 + 4))  # warm-up, the estimate's 2 steps, then the timed ones
    timer = bench.StepTimer(first=2, last=5, cuda=False)
    for i in range(8):
        timer.on_train_batch_start(None, None, None, i)
        clock[0] += 0.004
        timer.on_train_batch_end(None, None, None, None, i)
    assert timer.ms_per_step() == pytest.approx(4.0)


PHASES = ("data", "train", "validation", "monitor", "pruning", "ensemble", "checkpoint", "export", "final eval")


def test_reduced_e2e_runs_the_recipe_of_both_paths_phase_by_phase(
    bench: ModuleType, tmp_path: Path, pack_root: Path, cache_dir: Path
) -> None:
    """--e2e on CPU: the paper recipe's config, schedule scaled to 3 epochs, on a toy model and data, through
    train.run: every phase timed once (nested ones not counted twice), the 99 % sparse model.pt written."""
    start = time.perf_counter()
    data = f"data.root={pack_root} data.cache_dir={cache_dir}"
    argv = ["--e2e-only", "--e2e-paths", "fast,plain", "--device", "cpu", "--out-dir", str(tmp_path)]
    result = bench.main([*argv, "--e2e-run-dir", str(tmp_path / "runs"), "--e2e-overrides", data])
    assert time.perf_counter() - start < 120  # ~10 s on an idle 2-core CPU
    assert result.args.reduced and result.args.epochs == 3 and not result.rows
    assert [run["path"] for run in result.e2e] == ["fast", "plain"]
    for run in result.e2e:
        assert "result" not in run, run  # "FAILED: ..." when train.run raised
        assert run["epochs"] == 3 and run["global_steps"] == 3 * 128 // 32
        assert run["sparsity"] == pytest.approx(0.99, abs=1e-4) and Path(run["model_path"]).is_file()
        assert "pruning.epoch=1" in run["overrides"] and "model.width=4" in run["overrides"]
        assert run["overrides"].endswith(data)  # the caller's overrides come last
        phases = run["phases"]
        assert set(PHASES) <= set(phases) and all(phases[p] > 0 for p in PHASES), phases
        assert phases["other (config, model build, Lightning, loaders, summary)"] >= 0  # no phase counted twice
        assert sum(phases.values()) == pytest.approx(run["seconds, run() start to summary.json"], abs=0.1)
    fast, plain = result.e2e
    assert fast["train_step"].startswith("eager, bf16") and plain["train_step"].startswith("plain")
    md = result.path.read_text()
    assert "## End to end: fast path" in md and "## End to end: plain path" in md and "| final eval |" in md


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--models", "resnet7"], "--models"),
        (["--methods", "trades"], "--methods"),
        (["--modes", "turbo"], "--modes"),
        (["--e2e-paths", "fastest"], "--e2e-paths"),
        (["--check"], "--check"),
        (["--warmup", "1"], "--warmup"),
        (["--profile", "pl-fast-bf16"], "--profile"),
    ],
)
def test_bad_options_fail_naming_the_option(
    bench: ModuleType, argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", *argv])
    assert option in capsys.readouterr().err


def test_e2e_overrides_scale_the_recipe(bench: ModuleType, tmp_path: Path) -> None:
    full = bench.e2e_overrides(100, "fast", True, tmp_path, ["data.root=.pack"])
    assert "pruning.epoch=30" in full and "optim.milestones=[70,85]" in full and "trainer=gpu" in full
    assert "fast.enabled=true" in full and "eval.pgd_steps=50" in full and full[-1] == "data.root=.pack"
    assert "data.num_workers=0" in full
    short = bench.e2e_overrides(10, "plain", False, tmp_path, [])
    assert "pruning.epoch=3" in short and "optim.milestones=[7,8]" in short and "trainer=cpu" in short
    assert not any(o.startswith("fast.") for o in short)
    assert "val_attack_precision=bf16" in full and not any(o.startswith("val_attack_precision") for o in short)


def test_phase_timer_counts_nested_phases_once(bench: ModuleType) -> None:
    timer = bench.PhaseTimer(cuda=False)
    timer.push("train")
    time.sleep(0.05)
    with timer.phase("ensemble"):
        time.sleep(0.05)
    time.sleep(0.05)
    timer.pop("train")
    assert timer.totals["ensemble"] == pytest.approx(0.05, abs=0.04)
    assert timer.totals["train"] == pytest.approx(0.10, abs=0.06)
    assert timer.totals["train"] + timer.totals["ensemble"] == pytest.approx(0.15, abs=0.08)
    assert time.time() - 3600 * 24 < bench.process_start_time() <= time.time()


def test_capture_check_code_runs_eagerly_on_cpu(bench: ModuleType, one_thread: None) -> None:
    """Off CUDA both sides of the check run eagerly: it must run through pruning and the LR drop and
    agree (the device-LR arithmetic vs the float-LR one differ by rounding only)."""
    result = bench.capture_check(torch.device("cpu"), "resnet18", 4, 8, steps=8)
    assert result["result"] == "PASS", result
    assert result["without random start: pruned weights not zero after replays"] == 0
    assert result["RNG: replays reproduce the eager random starts"] is True


def test_compiling_modes_run_last_and_only_with_compile(bench: ModuleType) -> None:
    """The issue's numbers first: modes that compile (fast.compile_model, reduce-overhead) come after every
    other row, and not at all without --compile (the CPU run in CI)."""
    modes = "pl-fast-bf16-cm,fast-bf16,fast-bf16-cm,pl-fast-bf16"
    argv = ["--reduced", "--device", "cpu", "--methods", "frep", "--models", "resnet18", "--modes", modes]
    assert [m for *_, m in bench.plan(bench.parse_args(argv))] == ["fast-bf16", "pl-fast-bf16"]
    planned = bench.plan(bench.parse_args([*argv, "--batch-sizes", "8,16", "--compile"]))
    assert [(bs, m) for _, bs, _, m in planned] == [
        (8, "fast-bf16"),
        (8, "pl-fast-bf16"),
        (16, "fast-bf16"),
        (16, "pl-fast-bf16"),
        (8, "fast-bf16-cm"),
        (16, "fast-bf16-cm"),
        (8, "pl-fast-bf16-cm"),
        (16, "pl-fast-bf16-cm"),
    ]


def test_mode_names_spell_their_fast_options(bench: ModuleType) -> None:
    """Each fast mode runs the options its name says (a typo'd suffix would silently time the base mode)."""
    assert bench.fast_options("fast-fp32") == {
        "precision": "fp32",
        "cache_weights": False,
        "compile_model": False,
        "streams": 1,
    }
    assert bench.fast_options("pl-fast-bf16-cm-s2") == {
        "precision": "bf16",
        "cache_weights": False,
        "compile_model": True,
        "streams": 2,
    }
    assert bench.fast_options("fast-bf16-cw")["cache_weights"] is True
    for mode in bench.MODES:  # every suffix of every mode is one the parser knows
        assert set(mode.split("-")) <= {"pl", "fast", "eager", "compile", "fp32", "bf16", "cw", "cm", "s2"}, mode
    assert set(bench.COMPILED_MODEL) == {m for m in bench.MODES if "-cm" in m}


def test_plan_runs_frep_only_modes_for_frep_only(bench: ModuleType) -> None:
    """--modes given for several methods: natural and PGD-10 get only the bare modes (no Lightning row, no
    second stream), so a one-call GPU plan spends no budget on rows nobody reads."""
    argv = ["--reduced", "--device", "cpu", "--models", "resnet18", "--methods", "frep,natural,pgd10"]
    modes = "eager,fast-bf16,fast-bf16-s2,pl-fast-bf16,pl-fast-bf16-cw"
    planned = [(me, mo) for _, _, me, mo in bench.plan(bench.parse_args([*argv, "--modes", modes]))]
    assert planned == [
        ("frep", "eager"),
        ("frep", "fast-bf16"),
        ("frep", "fast-bf16-s2"),
        ("frep", "pl-fast-bf16"),
        ("frep", "pl-fast-bf16-cw"),
        ("natural", "eager"),
        ("natural", "fast-bf16"),
        ("pgd10", "eager"),
        ("pgd10", "fast-bf16"),
    ]


def test_fastest_variant_names_the_overrides_of_the_fastest_lightning_row(bench: ModuleType) -> None:
    """experiments/gpu/fast_path.sh runs the e2e recipe with what the step bench found fastest: the override
    list must be what each mode's name stands for in bench.fast_options (no drift between the two)."""
    path = Path(bench.__file__).parent / "gpu" / "fastest_variant.py"
    spec = importlib.util.spec_from_file_location("fastest_variant", path)
    assert spec is not None and spec.loader is not None
    fv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fv)
    rows = [
        {"method": "frep", "mode": "fast-bf16-s2", "ms": 7.0},  # bare: not what a user runs
        {"method": "frep", "mode": "pl-fast-bf16", "ms": 9.8},
        {"method": "frep", "mode": "pl-fast-bf16-s2", "ms": 8.9},
        {"method": "frep", "mode": "pl-fast-bf16-cm-s2", "ms": None},  # failed or skipped
        {"method": "natural", "mode": "pl-fast-bf16", "ms": 3.0},
    ]
    assert fv.fastest(rows) == ("pl-fast-bf16-s2", 8.9)
    assert fv.fastest(rows, {"result": "PASS"}) == ("pl-fast-bf16-s2", 8.9)
    assert fv.fastest(rows, {"result": "FAIL"}) == ("pl-fast-bf16", 9.8)  # replays not trusted: one stream only
    note = "eager, bf16; fallback: CUDA graph capture failed"
    fell_back = [{**r, "note": note} if r["ms"] == 8.9 else r for r in rows]
    assert fv.fastest(fell_back) == ("pl-fast-bf16", 9.8)
    assert fv.fastest(rows[:1]) is None
    defaults = bench.fast_options("pl-fast-bf16")
    for mode in (m for m in bench.MODES if m.startswith("pl-fast")):
        changed = {k: v for k, v in bench.fast_options(mode).items() if v != defaults[k]}
        expected = sorted(f"fast.{k}={str(v).lower()}" for k, v in changed.items())
        assert sorted(fv.overrides(mode)) == expected, mode


def test_profile_counts_what_a_step_runs(bench: ModuleType, tmp_path: Path, one_thread: None) -> None:
    """--profile (here CPU operators: the same code lists GPU kernels on CUDA): a FReP step runs its 20
    convolutions forward three times (clean, attack, adversarial) and backward three times (the attack's
    input gradient, both branches), and the report shows the table."""
    argv = ["--reduced", "--device", "cpu", "--models", "resnet18", "--methods", "frep", "--modes", "fast-fp32"]
    result = bench.main([*argv, "--profile", "fast-fp32", "--out-dir", str(tmp_path)])
    (prof,) = result.profiles
    calls = {r["name"]: r["calls_per_step"] for r in prof["top"]}
    convs = sum(1 for m in bench.build_model("resnet18", width=4).modules() if isinstance(m, torch.nn.Conv2d))
    assert calls["aten::convolution_backward"] == 3 * convs
    assert prof["what ran"].startswith("eager, fp32") and prof["summed kernel ms per step"] > 0
    assert set(prof["by kind (ms per step)"]) >= {"convolution", "batch norm"}
    md = result.path.read_text()
    assert "## Kernel profile: frep resnet18 bs8 fast-fp32" in md and "| `aten::convolution_backward` | 60.0 |" in md


def test_gpu_prepare_builds_the_carried_tree(pack_root: Path, tmp_path: Path) -> None:
    """experiments/gpu/prepare.sh: what a lent GPU machine lacks (hydra with its yaml, omegaconf, antlr4,
    pyautoattack's code without its 44 MB model) and the CIFAR-10 pack, under the 64 MiB carry limit;
    the copied packages import from .gpu/site alone."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "experiments" / "gpu" / "prepare.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(script), str(pack_root)], cwd=tmp_path, env=env, check=True, capture_output=True)
    site = tmp_path / ".gpu" / "site"
    assert (site / "hydra" / "conf" / "hydra" / "output" / "default.yaml").is_file()
    assert {p.suffix for p in (site / "pyautoattack").iterdir()} == {".py"}
    assert {p.name for p in (tmp_path / ".gpu" / "data" / "cifar10").iterdir()} >= {"train.npz", "test.npz"}
    size = sum(p.stat().st_size for p in (tmp_path / ".gpu").rglob("*") if p.is_file())
    assert size < 60 * 2**20  # the tracked tree (~2 MB) must fit beside it
    # PYTHONPATH goes before site-packages: each package then comes from .gpu/site (the GPU machine has
    # torch, lightning and PyYAML, which these import, but not the packages themselves)
    names = "hydra, omegaconf, antlr4, pyautoattack"
    probe = f"import {names}; print(*(m.__file__ for m in ({names})))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert all(path.startswith(str(site)) for path in out.stdout.split())
