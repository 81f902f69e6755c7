"""frep-report on a fake sweep: paper-layout tables with the right numbers, the four figures as
PNGs, and every missing run / file / figure listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from frep_lightning.report import Run, collect, expected_jobs, main, read_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(
    path: Path,
    overrides: list[str],
    method: str,
    sparsity: float | None,
    summary: dict | None = None,
    evaluation: dict | None = None,
    model: bool = False,
    metrics: str | None = None,
) -> None:
    """A run directory as frep-train / frep-eval leave it (only the files given)."""
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), path / ".hydra" / "overrides.yaml")
    pruning = None if sparsity is None else {"_target_": "frep_lightning.pruning.RobustPruning", "sparsity": sparsity}
    config = {
        "method": {"name": method},
        "model": {"name": "resnet18"},
        "data": {"name": "cifar10"},
        "pruning": pruning,
        "eval": {"eps": "8/255"},
    }
    OmegaConf.save(OmegaConf.create(config), path / "config.yaml")
    base = {"method": method, "model": "resnet18", "dataset": "cifar10", "sparsity_target": sparsity or 0.0}
    if summary is not None:
        (path / "summary.json").write_text(json.dumps({**base, **summary}))
    if evaluation is not None:
        (path / "eval.json").write_text(json.dumps(evaluation))
    if model:
        g = torch.Generator().manual_seed(0)
        conv = torch.randn(8, 3, 3, 3, generator=g)
        conv.view(-1)[: int(0.9 * conv.numel())] = 0.0
        state = {
            "net.conv1.weight": conv,
            "net.bn1.weight": torch.ones(8),
            "net.fc.weight": torch.randn(10, 8, generator=g),
        }
        torch.save(state, path / "model.pt")
    if metrics is not None:
        (path / "csv" / "version_0").mkdir(parents=True)
        (path / "csv" / "version_0" / "metrics.csv").write_text(metrics)


METRICS = """epoch,step,ensemble/delta,train/loss_step,train/pgd_subset,val/acc,val/pgd10
0,9,0.010,,,0.30,0.20
0,9,,,0.25,,
1,19,,1.5,,,
1,19,0.020,,,0.40,0.30
1,19,,,0.33,,
2,29,0.005,,,0.45,0.35
"""
# with ensemble.validate_live: the live model on the validation images too
METRICS_LIVE = """epoch,step,ensemble/delta,val/acc,val/pgd10,val_live/acc,val_live/pgd10
0,9,0.010,0.30,0.20,0.28,0.18
1,19,0.020,0.40,0.30,0.41,0.27
"""


@pytest.fixture
def fake_sweep(tmp_path: Path) -> tuple[Path, Path]:
    """6 jobs asked (3 methods x 2 sparsities); 4 run dirs, one of them without results; plus a
    separate single dense_at run."""
    sweep = tmp_path / "multirun" / "table-x"
    sweep.mkdir(parents=True)
    multirun = {
        "hydra": {
            "sweeper": {"params": {"method": "frep,lwm,ori", "++pruning.sparsity": "0.9,0.99"}},
            "overrides": {"task": ["data=cifar10"]},
        }
    }
    OmegaConf.save(OmegaConf.create(multirun), sweep / "multirun.yaml")
    job = lambda m, s: [f"method={m}", f"++pruning.sparsity={s}", "data=cifar10"]  # noqa: E731
    write_run(
        sweep / "0-frep",
        job("frep", 0.9),
        "frep",
        0.9,
        summary={"clean_acc": 0.81, "pgd_acc": 0.50, "pgd_steps": 10, "sparsity": 0.9, "train_seconds": 600.0},
        evaluation={
            "clean": 0.80,
            "fgsm": 0.55,
            "pgd50": 0.48,
            "mim50": 0.485,
            "square": 0.50,
            "aa": 0.44,
            "worst_case": 0.44,
            "square_q100": 0.70,
            "square_q1000": 0.55,
            "sparsity": 0.9,
            "eps": 8 / 255,
            "n": 1000,
            "seed": 0,
            "layers": {"net.conv1": {"sparsity": 0.9}},
            "warnings": ["gradient masking suspected: FGSM below PGD-50"],
        },
        model=True,
        metrics=METRICS,
    )
    write_run(
        sweep / "1-lwm",
        job("lwm", 0.9),
        "lwm",
        0.9,
        summary={"clean_acc": 0.78, "pgd_acc": 0.452, "pgd_steps": 10, "sparsity": 0.9, "train_seconds": 3000.0},
        model=True,
    )
    write_run(
        sweep / "2-frep",
        job("frep", 0.99),
        "frep",
        0.99,
        summary={"clean_acc": 0.79, "pgd_acc": 0.47, "pgd_steps": 10, "sparsity": 0.99, "train_seconds": 620.0},
        evaluation={"clean": 0.79, "pgd50": 0.47, "aa": 0.411, "sparsity": 0.99, "eps": 8 / 255},
    )
    for q, acc in ((100, 0.6), (1000, 0.5)):  # frep-eval attacks=[square] queries=q output=eval_square_q<q>.json
        report = {"square": acc, "attack_settings": {"square": {"queries": q}}, "seconds": {"square": 99.0}}
        (sweep / "2-frep" / f"eval_square_q{q}.json").write_text(json.dumps(report))
    write_run(sweep / "3-lwm", job("lwm", 0.99), "lwm", 0.99)  # crashed: config but no results
    single = tmp_path / "outputs" / "dense"
    write_run(
        single,
        ["method=dense_at"],
        "dense_at",
        None,
        summary={"clean_acc": 0.82, "pgd_acc": 0.52, "pgd_steps": 10, "sparsity": 0.0, "train_seconds": 3300.0},
    )
    return sweep, single


def test_expected_jobs_follow_the_basic_sweeper(fake_sweep: tuple[Path, Path]) -> None:
    sweep, _ = fake_sweep
    jobs, varying = expected_jobs(sweep / "multirun.yaml")
    assert len(jobs) == 6 and set(varying) == {"method", "pruning.sparsity"}
    assert ["method=ori", "++pruning.sparsity=0.99", "data=cifar10"] in jobs


def test_report_tables_figures_and_missing(fake_sweep: tuple[Path, Path], tmp_path: Path) -> None:
    sweep, single = fake_sweep
    out = tmp_path / "report"
    report = write_report([sweep, single], out).read_text()

    assert "### ResNet-18 / CIFAR-10" in report
    header = (
        "| Method | Target | Clean | FGSM | PGD-50 | MIM-50 | Square | AA | Worst case | PGD-10 | Sparsity | "
        "Train (min) | Source |"
    )
    assert header in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "Method" not in line]
    assert rows == [
        "| dense_at | 0% | 82.0 | – | – | – | – | – | – | 52.0 | 0.00 | 55.0 | summary.json |",
        "| lwm | 90% | 78.0 | – | – | – | – | – | – | 45.2 | 90.00 | 50.0 | summary.json |",
        "| frep | 90% | 80.0 | 55.0 | 48.0 | 48.5 | 50.0 | 44.0 | 44.0 | 50.0 | 90.00 | 10.0 | eval.json |",
        "| frep | 99% | 79.0 | – | 47.0 | – | – | 41.1 | – | 47.0 | 99.00 | 10.3 | eval.json |",
    ]
    assert "gradient masking suspected" in report  # eval.json warnings are carried into the report

    for name in (
        "fig8_robust_vs_sparsity.png",
        "fig7_weights_cifar10_resnet18_s0.9.png",
        "fig5_training_cifar10_resnet18_s0.9.png",
        "fig6_square_queries.png",
    ):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in report

    missing = report.split("## Missing", 1)[1]
    assert "`method=ori ++pruning.sparsity=0.9 data=cifar10`: no run directory (not started)" in missing
    assert "`method=ori ++pruning.sparsity=0.99 data=cifar10`: no run directory (not started)" in missing
    assert "`method=lwm ++pruning.sparsity=0.99 data=cifar10`: no summary.json in 3-lwm" in missing
    assert f"{sweep / '2-frep'} (model.pt)" in missing  # no weights for Fig. 7
    assert f"{single} (metrics.csv)" in missing  # no curve for Fig. 5
    assert "Fig. 6" not in missing
    assert "4 finished run(s), 1 without results, 2 expected sweep job(s) not started" in report  # 4+1+2 = 6 jobs + 1

    curves = {r.path.name: r.square_curve() for r in collect([sweep])[0]}
    assert curves["0-frep"] == {100: 0.70, 1000: 0.55} and curves["2-frep"] == {100: 0.6, 1000: 0.5}

    records = json.loads((out / "report.json").read_text())
    assert {(r["label"], r["sparsity_target"]) for r in records} == {
        ("dense_at", 0.0),
        ("lwm", 0.9),
        ("frep", 0.9),
        ("frep", 0.99),
    }


def test_seeds_average_and_variants_label_rows(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    sweep.mkdir()
    params = {"objective": "sre,pgd", "seed": "0,1"}
    OmegaConf.save(
        OmegaConf.create({"hydra": {"sweeper": {"params": params}, "overrides": {"task": []}}}), sweep / "multirun.yaml"
    )
    for i, (obj, seed, pgd) in enumerate([("sre", 0, 0.40), ("sre", 1, 0.44), ("pgd", 0, 0.45), ("pgd", 1, 0.47)]):
        write_run(
            sweep / str(i),
            [f"objective={obj}", f"seed={seed}"],
            "frep",
            0.9,
            summary={"clean_acc": 0.8, "pgd_acc": pgd},
        )
    runs, _ = collect([sweep])
    assert sorted({r.label for r in runs}) == ["frep objective=pgd", "frep objective=sre"]
    report = write_report([sweep], tmp_path / "out").read_text()
    assert "| frep objective=pgd | 90% | 80.0 ± 0.0 (n=2) | 46.0 ± 1.4 (n=2) |" in report
    assert "| frep objective=sre | 90% | 80.0 ± 0.0 (n=2) | 42.0 ± 2.8 (n=2) |" in report
    assert "Nothing missing" not in report  # no model.pt / metrics.csv / Square curve: listed
    assert "Fig. 6 (Square accuracy vs queries)" in report


def test_read_metrics_per_epoch(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS)
    series = read_metrics(path)
    assert series["ensemble/delta"] == [(0.0, 0.010), (1.0, 0.020), (2.0, 0.005)]
    assert series["train/pgd_subset"] == [(0.0, 0.25), (1.0, 0.33)]


def test_training_curves_join_resumed_versions_and_skip_frep_eval_logs(tmp_path: Path) -> None:
    """A resume in the same run directory writes csv/version_1 (..._10 sorts after _9 as a number, not as
    text); frep-eval logs into eval_logs/ (only eval/* columns): the curves are the training run's, whole."""
    run_dir = tmp_path / "run"
    write_run(run_dir, [], "frep", 0.9, summary={"clean_acc": 0.7, "pgd_acc": 0.4})
    header = "epoch,step,val/pgd10,train/pgd_subset\n"
    files = {
        "csv/version_0/metrics.csv": header + "0,10,0.20,0.25\n1,20,0.22,0.26\n2,30,0.99,0.99\n",  # epoch 2: cut
        "csv/version_2/metrics.csv": header + "3,40,0.26,0.29\n",
        "csv/version_10/metrics.csv": header + "4,50,0.28,0.31\n",
        "csv/version_1/metrics.csv": header + "2,30,0.24,0.27\n",  # the resume re-ran epoch 2
        "eval_logs/csv/version_0/metrics.csv": "epoch,step,eval/pgd50\n0,0,0.21\n",
    }
    for name, text in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    run = collect([run_dir])[0][0]
    paths = [p.relative_to(run_dir).as_posix() for p in run.metrics_csvs()]
    assert paths == [f"csv/version_{v}/metrics.csv" for v in (0, 1, 2, 10)]
    series = read_metrics(run.metrics_csvs())
    assert series["val/pgd10"] == [(0.0, 0.20), (1.0, 0.22), (2.0, 0.24), (3.0, 0.26), (4.0, 0.28)]
    assert "eval/pgd50" not in series


def test_run_accuracies_prefer_eval_json(tmp_path: Path) -> None:
    write_run(
        tmp_path / "r",
        [],
        "frep",
        0.9,
        summary={"clean_acc": 0.7, "pgd_acc": 0.4, "pgd_steps": 20, "pgd50_acc": 0.39, "worst_case_acc": 0.37},
        evaluation={"clean": 0.71, "robust": {"aa": 0.38}},
    )
    run = collect([tmp_path / "r"])[0][0]
    assert isinstance(run, Run) and run.accuracies() == {
        "clean": 0.71,
        "pgd20": 0.4,
        "pgd50": 0.39,
        "worst_case": 0.37,
        "aa": 0.38,
    }


def test_square_column_holds_the_standard_budget_only_and_notes_say_what_mixes(tmp_path: Path) -> None:
    """Square at 200 queries (in eval.json or an extra file) is a Fig. 6 point, not the table's Square; a
    summary.json PGD-10 next to eval.json's worst case (over other attacks) is flagged as outside it."""
    settings = {"attack_settings": {"square": {"queries": 200}}}
    evaluation = {"clean": 0.5, "n": 100, "pgd20": 0.2, "square": 0.18, "worst_case": 0.18, **settings}
    write_run(tmp_path / "a", [], "ori", 0.9, summary={"clean_acc": 0.5, "pgd_acc": 0.165, "n_test": 200},
              evaluation=evaluation)  # fmt: skip
    write_run(tmp_path / "b", [], "frep", 0.9, summary={"clean_acc": 0.6, "pgd_acc": 0.2, "n_test": 200})
    (tmp_path / "b" / "eval_square_q200.json").write_text(json.dumps({"n": 100, "square": 0.04, **settings}))
    (tmp_path / "b" / "eval_square_q5000.json").write_text(
        json.dumps({"n": 100, "square": 0.03, "attack_settings": {"square": {"queries": 5000}}})
    )
    runs = {r.method: r for r in collect([tmp_path / "a", tmp_path / "b"])[0]}
    assert "square" not in runs["ori"].accuracies() and runs["ori"].square_curve() == {200: 0.18}
    assert runs["frep"].accuracies()["square"] == 0.03 and runs["frep"].square_curve() == {200: 0.04, 5000: 0.03}
    report = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out").read_text()
    assert "Square: 5,000 queries (other budgets: Fig. 6)." in report
    # only ori's worst case comes from eval.json: frep's PGD-10 is inside its own (summary.json) worst case
    assert (
        "PGD-10 comes from a separate evaluation (summary.json) in row ori 90%, so it is not part of that row" in report
    )


def test_cli(fake_sweep: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep, _ = fake_sweep
    assert main([str(sweep)]) == 0
    assert (sweep / "report.md").is_file()  # one directory: the report goes beside its runs
    assert "wrote" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "-o", str(tmp_path / "o")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_single_runs_that_differ_in_an_override_are_separate_rows(tmp_path: Path) -> None:
    """Loose run dirs (no sweep): two FReP runs differing only in ensemble.average are two rows, a
    third with a different seed only is a seed of its row, and another method keeps its plain name."""
    common = ["experiment=paper_resnet18_c10", "pruning.sparsity=0.99"]
    write_run(tmp_path / "a", [*common, "method=frep", "ensemble.average=factors"], "frep", 0.99, {"pgd_acc": 0.24})
    write_run(tmp_path / "b", [*common, "method=frep", "ensemble.average=product"], "frep", 0.99, {"pgd_acc": 0.23})
    write_run(
        tmp_path / "c", [*common, "method=frep", "ensemble.average=product", "seed=1"], "frep", 0.99, {"pgd_acc": 0.21}
    )
    write_run(tmp_path / "d", [*common, "method=ori"], "ori", 0.99, {"pgd_acc": 0.22})
    runs, sweeps = collect([tmp_path])
    assert not sweeps
    labels = {r.path.name: r.label for r in runs}
    assert labels == {
        "a": "frep ensemble.average=factors",
        "b": "frep ensemble.average=product",
        "c": "frep ensemble.average=product",
        "d": "ori",
    }


def test_autoattack_from_a_separate_subset_eval_gets_its_column_and_its_sample_size(tmp_path: Path) -> None:
    """AutoAttack run apart (eval_aa.json, 500 images) next to eval.json (FGSM/PGD-50, 10k): the AA column
    shows it, the note gives each column's image count and says AA is not in Worst case; a Square number
    at a non-standard budget (a queries-curve point) and the subset's clean/worst_case stay out of the table."""
    evaluation = {
        "n": 10000,
        "clean": 0.50,
        "fgsm": 0.25,
        "pgd50": 0.21,
        "worst_case": 0.208,
        "attacks": ["fgsm", "pgd50"],
        "eps": 8 / 255,
    }
    write_run(
        tmp_path / "r", ["method=frep"], "frep", 0.99, {"clean_acc": 0.50, "pgd_acc": 0.22, "n_test": 10000}, evaluation
    )
    aa = {"n": 500, "clean": 0.9, "aa": 0.156, "worst_case": 0.01, "attacks": ["aa"], "eps": 8 / 255}
    (tmp_path / "r" / "eval_aa.json").write_text(json.dumps(aa))
    square = {"n": 500, "square": 0.4, "attacks": ["square"], "attack_settings": {"square": {"queries": 100}}}
    (tmp_path / "r" / "eval_square_q100.json").write_text(json.dumps(square))
    runs, _ = collect([tmp_path])
    (run,) = runs
    assert run.accuracies() == {
        "clean": 0.50,
        "pgd10": 0.22,
        "fgsm": 0.25,
        "pgd50": 0.21,
        "worst_case": 0.208,
        "aa": 0.156,
    }
    assert run.measured()["aa"] == (0.156, 500, "eval_aa.json", 8 / 255)
    assert run.measured()["pgd10"] == (0.22, 10000, "summary.json", 8 / 255)  # the run config's eval.eps
    assert run.square_curve() == {100: 0.4}
    report = write_report([tmp_path], tmp_path / "out").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| frep"))
    head = next(line for line in report.splitlines() if line.startswith("| Method"))
    cells = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in row.split("|")], strict=True))
    assert (cells["Clean"], cells["AA"], cells["Worst case"], cells["PGD-50"]) == ("50.0", "15.6", "20.8", "21.0")
    assert "Square" not in cells
    assert "AA 500" in report and "PGD-50 10,000" in report
    assert "AA comes from a separate evaluation (eval_aa.json)" in report


def _row(report: str, start: str) -> dict[str, str]:
    """The cells of the first table row that starts with ``| <start>``, by column title."""
    lines = report.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {start}"))
    head = next(lines[j] for j in range(i, -1, -1) if lines[j].startswith("| Method"))
    cells = [c.strip() for c in lines[i].split("|")]
    return dict(zip([c.strip() for c in head.split("|")], cells, strict=True))


def test_cells_never_average_over_eps_or_test_image_counts_and_eps_is_shown(tmp_path: Path) -> None:
    """Two seeds of one config, one evaluated at 4/255 on 500 images: AA 44 (8/255) and 60 (4/255) are
    not one "52.0 ± 11.3"; each number says its eps. A table of one eps says it once."""
    summary = {"clean_acc": 0.8, "pgd_acc": 0.5, "n_test": 10000, "eps": 8 / 255}
    aa8 = {"clean": 0.8, "aa": 0.44, "worst_case": 0.44, "n": 10000, "eps": 8 / 255}
    aa4 = {"clean": 0.8, "aa": 0.60, "worst_case": 0.60, "n": 500, "eps": 4 / 255}
    write_run(tmp_path / "mixed" / "a", ["seed=0"], "frep", 0.9, summary=summary, evaluation=aa8)
    write_run(tmp_path / "mixed" / "b", ["seed=1"], "frep", 0.9, summary=summary, evaluation=aa4)
    report = write_report([tmp_path / "mixed"], tmp_path / "out").read_text()
    row = _row(report, "frep")
    assert row["ε"] == "4/255, 8/255"
    assert row["AA"] == "60.0 [ε 4/255, 500 images]; 44.0 [ε 8/255, 10,000 images]"
    assert row["PGD-10"] == "50.0 ± 0.0 (n=2) [ε 8/255]"
    assert "52.0" not in report

    write_run(tmp_path / "one" / "a", ["seed=0"], "frep", 0.9, summary=summary, evaluation=aa8)
    report = write_report([tmp_path / "one"], tmp_path / "out1").read_text()
    assert "ε" not in _row(report, "frep") and "L-inf ε = 8/255 for every robust number." in report


def test_runs_of_sweeps_that_differ_in_a_fixed_override_are_not_seeds_of_one_row(tmp_path: Path) -> None:
    """table4 (unstructured) and table4_structured share the 70% target: their runs must not be averaged
    as seeds, nor two sweeps run for 100 and 6 epochs; two seeds within a sweep still are."""
    for name, task, pgd in (
        ("t4", "experiment=table4", (0.30, 0.32)),
        ("t4s", "experiment=table4_structured", (0.20,)),
    ):
        sweep = tmp_path / name
        sweep.mkdir()
        params = {"hydra": {"sweeper": {"params": {"seed": "0,1"}}, "overrides": {"task": [task, "method=frep"]}}}
        OmegaConf.save(OmegaConf.create(params), sweep / "multirun.yaml")
        for seed, acc in enumerate(pgd):
            write_run(sweep / str(seed), [task, "method=frep", f"seed={seed}"], "frep", 0.7, {"pgd_acc": acc})
    report = write_report([tmp_path / "t4", tmp_path / "t4s"], tmp_path / "out").read_text()
    assert _row(report, "frep experiment=table4 ")["PGD-10"] == "31.0 ± 1.4 (n=2)"
    assert _row(report, "frep experiment=table4_structured")["PGD-10"] == "20.0"
    missing = report.split("## Missing", 1)[1]  # t4s seed=1 was asked for and never ran: said so
    assert "- sweep `t4s`: `seed=1 experiment=table4_structured method=frep`: no run directory" in missing


def test_unfinished_runs_are_listed_when_the_sweep_job_list_is_unreadable(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: [broken\n")
    write_run(sweep / "0-frep", ["method=frep"], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.4})
    write_run(sweep / "1-lwm", ["method=lwm"], "lwm", 0.9)  # crashed
    report = write_report([sweep], tmp_path / "out").read_text()
    missing = report.split("## Missing", 1)[1]
    assert f"run `{sweep / '1-lwm'}`: no summary.json / eval.json" in missing
    assert "sweep `sw`: cannot read the job list" in missing


def test_figures_survive_an_unreadable_model_and_a_metrics_csv_without_curves(tmp_path: Path) -> None:
    """A truncated model.pt and a metrics.csv with no curve column are listed under Missing: no crash, no
    empty Fig. 5 (and no matplotlib warning, an error under this suite's filterwarnings)."""
    write_run(
        tmp_path / "r", [], "frep", 0.9, {"clean_acc": 0.8, "pgd_acc": 0.4}, metrics="epoch,step,train/loss\n0,1,2\n"
    )
    (tmp_path / "r" / "model.pt").write_bytes(b"\x80\x02 truncated")
    out = tmp_path / "out"
    missing = write_report([tmp_path / "r"], out).read_text().split("## Missing", 1)[1]
    assert f"{tmp_path / 'r'} (model.pt unreadable: " in missing
    assert f"{tmp_path / 'r'} (metrics.csv has no val/pgd<k>" in missing
    assert not list(out.glob("fig5_*.png")) and not list(out.glob("fig7_*.png"))


def test_fig8_puts_a_run_at_its_measured_sparsity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 99%-target run whose pruning never happened (measured 0%) is drawn at 0%, not at 99%."""
    import frep_lightning.report as report_module

    write_run(tmp_path / "a", [], "frep", 0.99, summary={"clean_acc": 0.8, "pgd_acc": 0.5, "sparsity": 0.0})
    write_run(tmp_path / "b", [], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.45, "sparsity": 0.9004})
    figures = {}
    save = report_module._save
    monkeypatch.setattr(
        report_module, "_save", lambda fig, path: figures.setdefault(path.name, fig) and save(fig, path)
    )
    write_report([tmp_path], tmp_path / "out")
    (ax,) = figures["fig8_robust_vs_sparsity.png"].axes
    (line,) = ax.lines
    assert [round(x, 2) for x in line.get_xdata()] == [0.0, 90.04]
    assert ax.get_xlabel() == "measured sparsity (%)" and ax.get_ylabel() == "pgd10 accuracy (%), ε 8/255"


def test_a_cell_says_when_only_some_seeds_have_it(tmp_path: Path) -> None:
    """AA on one seed of two: the row's other cells average two runs, this one stands on one and says so."""
    summary = {"clean_acc": 0.8, "pgd_acc": 0.5, "n_test": 10000, "eps": 8 / 255}
    write_run(
        tmp_path / "a", ["seed=0"], "frep", 0.9, summary=summary, evaluation={"aa": 0.44, "n": 10000, "eps": 8 / 255}
    )
    write_run(tmp_path / "b", ["seed=1"], "frep", 0.9, summary=summary)
    row = _row(write_report([tmp_path], tmp_path / "out").read_text(), "frep")
    assert row["AA"] == "44.0 (1 of 2 runs)" and row["PGD-10"] == "50.0 ± 0.0 (n=2)"


def test_report_carries_catastrophic_overfitting_and_every_eval_files_warnings(tmp_path: Path) -> None:
    """The monitor's verdict (summary.json overfitting_epochs) and an eval_*.json warning reach report.md."""
    write_run(
        tmp_path / "r", [], "fgsm", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.02, "overfitting_epochs": [3, 4]}
    )
    aa = {"n": 500, "aa": 0.01, "eps": 8 / 255, "warnings": ["gradient masking suspected: AA far below PGD"]}
    (tmp_path / "r" / "eval_aa.json").write_text(json.dumps(aa))
    report = write_report([tmp_path / "r"], tmp_path / "out").read_text()
    assert "### Catastrophic overfitting" in report and "collapsed at epoch(s) 3, 4" in report
    assert "eval_aa.json: gradient masking suspected: AA far below PGD" in report
    assert json.loads((tmp_path / "out" / "report.json").read_text())[0]["overfitting_epochs"] == [3, 4]


def test_fig6_lines_of_two_datasets_say_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import frep_lightning.report as report_module

    for dataset in ("cifar10", "svhn"):
        run = tmp_path / dataset
        write_run(run, [f"data={dataset}"], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.5, "dataset": dataset})
        for q, acc in ((100, 0.6), (1000, 0.5)):
            square = {"square": acc, "eps": 8 / 255, "attack_settings": {"square": {"queries": q}}}
            (run / f"eval_square_q{q}.json").write_text(json.dumps(square))
    figures = {}
    save = report_module._save
    monkeypatch.setattr(
        report_module, "_save", lambda fig, path: figures.setdefault(path.name, fig) and save(fig, path)
    )
    write_report([tmp_path], tmp_path / "out")
    labels = [line.get_label() for line in figures["fig6_square_queries.png"].axes[0].lines]
    assert labels == ["frep ResNet-18 (90%) CIFAR-10", "frep ResNet-18 (90%) SVHN"]


def test_summary_square_at_a_smaller_budget_is_a_curve_point_not_the_square_column(tmp_path: Path) -> None:
    """eval.attacks=[square] with eval.queries=500: summary.json's square_acc is a 500-query number (it does not
    record the budget; the run config does); it must not stand under "Square: 5,000 queries"."""
    write_run(tmp_path / "r", [], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.4, "square_acc": 0.6})
    config = OmegaConf.load(tmp_path / "r" / "config.yaml")
    config.eval.queries = 500
    OmegaConf.save(config, tmp_path / "r" / "config.yaml")
    (run,) = collect([tmp_path / "r"])[0]
    assert "square" not in run.accuracies() and run.square_curve() == {500: 0.6}
    config.eval.queries = 5000
    OmegaConf.save(config, tmp_path / "r" / "config.yaml")
    (run,) = collect([tmp_path / "r"])[0]
    assert run.accuracies()["square"] == 0.6


def test_a_custom_autoattack_subset_never_stands_in_the_aa_column(tmp_path: Path) -> None:
    """frep-eval aa.version=custom aa.components=[apgd-ce]: weaker than AutoAttack, so its own column."""
    settings = {"aa": {"eps": 8 / 255, "version": "custom", "components": ["apgd-ce"], "seed": 0}}
    evaluation = {"clean": 0.8, "aa": 0.47, "worst_case": 0.47, "n": 1000, "eps": 8 / 255, "attack_settings": settings}
    write_run(tmp_path / "r", [], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.5}, evaluation=evaluation)
    (run,) = collect([tmp_path / "r"])[0]
    assert "aa" not in run.accuracies() and run.accuracies()["aa_custom"] == 0.47
    report = write_report([tmp_path / "r"], tmp_path / "out").read_text()
    row = _row(report, "frep")
    assert "AA" not in row and row["AA (custom)"] == "47.0"
    assert "AA (custom): AutoAttack with aa.version=custom" in report


def test_structured_rows_say_their_target_counts_channels_and_show_the_channels_removed(tmp_path: Path) -> None:
    """Table III: a 70% structured target removes 70% of the filters, which is more than 70% of the
    weights; the table shows both, and an unstructured-only table has no channel column."""
    base = {"clean_acc": 0.6, "pgd_acc": 0.3, "n_test": 1000, "eps": 8 / 255}
    structured = {**base, "pruning_mode": "structured", "sparsity": 0.8123, "live_channels": 150, "channels": 500,
                  "slim": {"parameters": [1000, 400], "macs": [2000, 700]}}  # fmt: skip
    write_run(tmp_path / "t3" / "ch", ["pruning=structured"], "frep_ch", 0.7, summary=structured)
    write_run(tmp_path / "t3" / "un", [], "frep", 0.9, summary={**base, "sparsity": 0.9, "live_channels": 500,
                                                                 "channels": 500})  # fmt: skip
    report = write_report([tmp_path / "t3"], tmp_path / "out").read_text()
    row = _row(report, "frep_ch")
    assert row["Target"] == "70% of channels" and row["Channels removed"] == "70.00" and row["Sparsity"] == "81.23"
    assert _row(report, "frep ")["Target"] == "90%" and _row(report, "frep ")["Channels removed"] == "0.00"
    assert "Channels removed: the fraction of the pruned layers' output channels" in report
    assert row["MACs kept"] == "35.00" and _row(report, "frep ")["MACs kept"] == "–"  # "–": not measured
    assert "MACs kept: multiply-adds per image of the network with the emptied channels cut out" in report
    only = write_report([tmp_path / "t3" / "un"], tmp_path / "out2").read_text()
    assert "Channels removed" not in only and "MACs kept" not in only


def test_a_sweep_job_resumed_in_place_is_still_its_job(tmp_path: Path) -> None:
    """slurm.yaml / README: a cut job resumes with ``ckpt_path=<dir>/checkpoints/last.ckpt hydra.run.dir=<dir>``,
    which rewrites the job's overrides.yaml with ``ckpt_path`` added; the finished run is that job, not a
    job that "never started"."""
    sweep = tmp_path / "sw"
    sweep.mkdir()
    params = {"hydra": {"sweeper": {"params": {"seed": "0,1"}}, "overrides": {"task": ["method=frep"]}}}
    OmegaConf.save(OmegaConf.create(params), sweep / "multirun.yaml")
    summary = {"clean_acc": 0.8, "pgd_acc": 0.4}
    write_run(sweep / "0", ["method=frep", "seed=0"], "frep", 0.9, summary)
    resumed = ["method=frep", "seed=1", f"ckpt_path={sweep / '1' / 'checkpoints' / 'last.ckpt'}"]
    write_run(sweep / "1", resumed, "frep", 0.9, summary)
    report = write_report([sweep], tmp_path / "out").read_text()
    assert "0 expected sweep job(s) not started" in report
    assert "not started)" not in report and "40.0 ± 0.0 (n=2)" in _row(report, "frep")["PGD-10"]


def test_a_job_that_failed_once_and_finished_in_another_directory_is_not_missing(tmp_path: Path) -> None:
    """A failed job rerun into a new directory of the same sweep (``hydra.run.dir``): the finished run counts,
    whichever directory sorts last."""
    sweep = tmp_path / "sw"
    sweep.mkdir()
    params = {"hydra": {"sweeper": {"params": {"seed": "0"}}, "overrides": {"task": ["method=frep"]}}}
    OmegaConf.save(OmegaConf.create(params), sweep / "multirun.yaml")
    write_run(sweep / "0", ["method=frep", "seed=0"], "frep", 0.9, {"clean_acc": 0.8, "pgd_acc": 0.4})
    write_run(sweep / "0_failed_rerun", ["method=frep", "seed=0"], "frep", 0.9)  # sorts after, no summary.json
    (only,) = collect([sweep])[1]
    assert only.missing() == []
    report = write_report([sweep], tmp_path / "out").read_text()
    assert "failed or still running" not in report


def test_seeds_that_differ_only_in_checkpointing_or_the_monitor_share_a_row(tmp_path: Path) -> None:
    """Preemptible seeds (checkpoint.every_n_train_steps) and a seed without the overfitting watch train the
    same network: they are seeds of one row, not rows of their own; another lambda still is a row."""
    summary = {"clean_acc": 0.5, "pgd_acc": 0.3, "n_test": 1000, "eps": 8 / 255}
    write_run(tmp_path / "s" / "a", ["seed=0"], "frep", 0.9, summary=summary)
    write_run(tmp_path / "s" / "b", ["seed=1", "checkpoint.every_n_train_steps=500"], "frep", 0.9, summary=summary)
    write_run(tmp_path / "s" / "c", ["seed=2", "monitor=null"], "frep", 0.9, summary=summary)
    write_run(tmp_path / "s" / "d", ["seed=3", "method.objective.lam=2"], "frep", 0.9, summary=summary)
    report = write_report([tmp_path / "s"], tmp_path / "out").read_text()
    assert _row(report, "frep ")["PGD-10"] == "30.0 ± 0.0 (n=3)"
    assert _row(report, "frep objective.lam=2")["PGD-10"] == "30.0"


def _capture_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """File name -> matplotlib Figure of every figure write_report saves (still saved as PNG)."""
    import frep_lightning.report as report_module

    figures: dict[str, object] = {}
    save = report_module._save
    monkeypatch.setattr(
        report_module, "_save", lambda fig, path: figures.setdefault(path.name, fig) and save(fig, path)
    )
    return figures


def test_a_custom_autoattack_from_frep_train_summary_never_stands_in_the_aa_column(tmp_path: Path) -> None:
    """frep-train eval.attacks=[aa] eval.aa.version=custom writes ``aa_acc`` to summary.json: a subset of
    AutoAttack, so it is "AA (custom)", never the AA column (as for frep-eval's eval.json)."""
    write_run(tmp_path / "r", [], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.5, "aa_acc": 0.47})
    config = OmegaConf.load(tmp_path / "r" / "config.yaml")
    config.eval.aa = {"version": "custom", "components": ["apgd-ce"]}
    OmegaConf.save(config, tmp_path / "r" / "config.yaml")
    (run,) = collect([tmp_path / "r"])[0]
    assert "aa" not in run.accuracies() and run.accuracies()["aa_custom"] == 0.47
    row = _row(write_report([tmp_path / "r"], tmp_path / "out").read_text(), "frep")
    assert "AA" not in row and row["AA (custom)"] == "47.0"


def test_train_time_of_a_resumed_run_counts_every_segment(tmp_path: Path) -> None:
    """Table V's Train column: train_seconds_total (segments before a resume included), not the last
    process's train_seconds."""
    summary = {"clean_acc": 0.8, "pgd_acc": 0.5, "train_seconds": 600.0, "train_seconds_total": 4200.0}
    write_run(tmp_path / "r", [], "frep", 0.9, summary=summary)
    row = _row(write_report([tmp_path / "r"], tmp_path / "out").read_text(), "frep")
    assert row["Train (min)"] == "70.0"


def test_a_cell_never_averages_seeds_evaluated_on_different_test_image_counts(tmp_path: Path) -> None:
    """Same eps, AA on 500 images for one seed and 10,000 for the other: two numbers with their counts."""
    summary = {"clean_acc": 0.8, "pgd_acc": 0.5, "n_test": 10000, "eps": 8 / 255}
    for seed, (aa, n) in enumerate(((0.60, 500), (0.44, 10000))):
        evaluation = {"aa": aa, "n": n, "eps": 8 / 255}
        write_run(tmp_path / str(seed), [f"seed={seed}"], "frep", 0.9, summary=summary, evaluation=evaluation)
    row = _row(write_report([tmp_path], tmp_path / "out").read_text(), "frep")
    assert row["AA"] == "60.0 [500 images]; 44.0 [10,000 images]"


def test_an_extra_eval_file_never_replaces_eval_json_nor_brings_its_subset_worst_case(tmp_path: Path) -> None:
    """eval_*.json adds only attacks the run lacks: eval.json's PGD-50 stands, and the subset file's
    worst case (over its own attacks, on its own images) is not the run's Worst case."""
    write_run(tmp_path / "a", [], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.5},
              evaluation={"clean": 0.8, "pgd50": 0.45, "n": 10000, "eps": 8 / 255})  # fmt: skip
    extra = {"n": 500, "clean": 0.9, "pgd50": 0.30, "aa": 0.41, "worst_case": 0.01, "eps": 8 / 255}
    (tmp_path / "a" / "eval_aa.json").write_text(json.dumps(extra))
    write_run(tmp_path / "b", [], "ori", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.5})  # no eval.json
    (tmp_path / "b" / "eval_aa.json").write_text(json.dumps(extra))
    runs = {r.method: r.accuracies() for r in collect([tmp_path])[0]}
    assert runs["frep"] == {"clean": 0.8, "pgd10": 0.5, "pgd50": 0.45, "aa": 0.41}
    assert runs["ori"] == {"clean": 0.8, "pgd10": 0.5, "pgd50": 0.30, "aa": 0.41}


def test_fig8_draws_the_strongest_attack_and_the_mean_over_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every run has FGSM, PGD-50 and AA: Fig. 8 draws AA (not the weakest attack of a tie), one point per
    row at the seeds' mean sparsity and mean accuracy."""
    figures = _capture_figures(monkeypatch)
    for seed, (aa, sparsity) in enumerate(((0.40, 0.90), (0.44, 0.92))):
        evaluation = {"fgsm": 0.6, "pgd50": 0.5, "aa": aa, "sparsity": sparsity, "n": 1000, "eps": 8 / 255}
        write_run(tmp_path / str(seed), [f"seed={seed}"], "frep", 0.9, summary={"clean_acc": 0.8},
                  evaluation=evaluation)  # fmt: skip
    write_report([tmp_path], tmp_path / "out")
    (ax,) = figures["fig8_robust_vs_sparsity.png"].axes
    (line,) = ax.lines
    assert ax.get_ylabel() == "aa accuracy (%), ε 8/255"
    assert [round(v, 6) for v in line.get_xdata()] == [91.0] and [round(v, 6) for v in line.get_ydata()] == [42.0]


def test_fig7_histograms_the_nonzero_conv_and_linear_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_run's model.pt: a conv with 194 of 216 weights zero, a dense 10x8 fc, a BatchNorm weight (not a
    prunable weight): 194 / 296 zeros, and the histogram is of the 102 nonzero weights only."""
    from frep_lightning.report import weight_magnitudes

    figures = _capture_figures(monkeypatch)
    write_run(tmp_path / "r", [], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.5}, model=True)
    state = torch.load(tmp_path / "r" / "model.pt")
    state["net.conv1.weight"].view(-1)[-1] = 1e-6  # tiny, not zero: a zero is exactly 0.0
    torch.save(state, tmp_path / "r" / "model.pt")
    mags, zeros = weight_magnitudes(tmp_path / "r" / "model.pt")
    assert mags.numel() == 102 and bool((mags > 0).all()) and zeros == pytest.approx(194 / 296)
    write_report([tmp_path / "r"], tmp_path / "out")
    (ax,) = figures["fig7_weights_cifar10_resnet18_s0.9.png"].axes
    assert ax.get_legend_handles_labels()[1] == ["frep (65.5% zeros)"]


def test_fig5_draws_validation_and_live_pgd_and_the_ensemble_distance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """METRICS: val/pgd10 at epochs 0-2, train/pgd_subset at 0-1 (dashed), ensemble/delta at 0-2, in %."""
    figures = _capture_figures(monkeypatch)
    write_run(tmp_path / "r", [], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.5}, metrics=METRICS)
    write_report([tmp_path / "r"], tmp_path / "out")
    ax_acc, ax_delta = figures["fig5_training_cifar10_resnet18_s0.9.png"].axes[:2]
    curves = {
        line.get_label(): (list(line.get_xdata()), [round(y, 6) for y in line.get_ydata()]) for line in ax_acc.lines
    }
    assert curves == {
        "frep val/pgd10": ([0.0, 1.0, 2.0], [20.0, 30.0, 35.0]),
        "frep live (train)": ([0.0, 1.0], [25.0, 33.0]),
    }
    (delta,) = ax_delta.lines
    assert list(delta.get_ydata()) == [0.010, 0.020, 0.005]


def test_eps_text() -> None:
    from frep_lightning.report import eps_text

    assert [eps_text(e) for e in (8 / 255, 2 / 255, 0.5 / 255, 0.031, None)] == [
        "8/255",
        "2/255",
        "0.5/255",
        "0.031",
        "?",
    ]


def test_a_sweep_rerun_beside_the_first_one_is_not_a_second_seed(tmp_path: Path) -> None:
    """A sweep killed and re-run into a new directory, reported over both: a job that finished in both is one run
    done twice (same config, same seed), not two seeds; the latest counts, the repeat is listed, real seeds
    still average."""
    import os

    for name, pgd in (("first", 0.40), ("rerun", 0.44)):
        sweep = tmp_path / name
        sweep.mkdir()
        params = {"hydra": {"sweeper": {"params": {"method": "frep"}}, "overrides": {"task": ["seed=0"]}}}
        OmegaConf.save(OmegaConf.create(params), sweep / "multirun.yaml")
        summary = {"clean_acc": 0.8, "pgd_acc": pgd, "seed": 0}
        write_run(sweep / "0-frep", ["method=frep", "seed=0"], "frep", 0.9, summary=summary)
        stamp = 1_000_000 + (100 if name == "rerun" else 0)
        os.utime(sweep / "0-frep" / "summary.json", (stamp, stamp))
    write_run(tmp_path / "seed1", ["method=frep", "seed=1"], "frep", 0.9, {"clean_acc": 0.8, "pgd_acc": 0.5, "seed": 1})
    report = write_report([tmp_path / "first", tmp_path / "rerun", tmp_path / "seed1"], tmp_path / "out").read_text()
    assert _row(report, "frep")["PGD-10"] == "47.0 ± 4.2 (n=2)"  # the rerun's 44 and seed 1's 50, not 40/44/50
    repeats = report.split("### Repeated runs", 1)[1].split("##", 1)[0]
    assert f"`{tmp_path / 'first' / '0-frep'}` repeats `{tmp_path / 'rerun' / '0-frep'}`" in repeats


def test_an_eval_of_a_checkpoint_written_beside_it_is_listed_not_skipped(tmp_path: Path) -> None:
    """``frep-eval ckpt=<run>/checkpoints/last.ckpt`` (README) writes ``checkpoints/eval.json``, where the report
    never looks: it must say so, not leave the run's table row silently without those numbers."""
    write_run(tmp_path / "r", ["seed=0"], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.4})
    (tmp_path / "r" / "checkpoints").mkdir()
    (tmp_path / "r" / "checkpoints" / "eval.json").write_text(json.dumps({"clean": 0.8, "aa": 0.3, "n": 100}))
    missing = write_report([tmp_path / "r"], tmp_path / "out").read_text().split("## Missing", 1)[1]
    assert f"- file: {tmp_path / 'r' / 'checkpoints' / 'eval.json'}: an evaluation of a checkpoint" in missing


def test_a_dense_method_of_a_sparsity_grid_is_one_run_not_two_seeds(tmp_path: Path) -> None:
    """README: ``-m method=dense_at,frep ++pruning.sparsity=0.9,0.99`` trains dense_at twice, identically (no
    pruning, same seed): its row is one run, not "± 0.0 (n=2)"."""
    sweep = tmp_path / "sw"
    sweep.mkdir()
    params = {"method": "dense_at,frep", "++pruning.sparsity": "0.9,0.99"}
    OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": {"params": params}, "overrides": {"task": []}}}),
                   sweep / "multirun.yaml")  # fmt: skip
    for i, target in enumerate(("0.9", "0.99")):
        write_run(sweep / f"{i}-dense_at", ["method=dense_at", f"++pruning.sparsity={target}"], "dense_at", None,
                  summary={"clean_acc": 0.8, "pgd_acc": 0.4, "seed": 0})  # fmt: skip
    report = write_report([sweep], tmp_path / "out").read_text()
    assert _row(report, "dense_at")["PGD-10"] == "40.0"
    assert "### Repeated runs" in report


def test_fig5_draws_the_live_models_validation_pgd_dotted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ensemble.validate_live: Fig. 5a puts the live model's validation PGD (dotted) beside the ensemble's, the
    paper's ensemble-vs-SGD comparison on the same images."""
    figures = _capture_figures(monkeypatch)
    write_run(tmp_path / "r", [], "frep", 0.9, summary={"clean_acc": 0.8, "pgd_acc": 0.5}, metrics=METRICS_LIVE)
    write_report([tmp_path / "r"], tmp_path / "out")
    ax_acc = figures["fig5_training_cifar10_resnet18_s0.9.png"].axes[0]
    curves = {
        line.get_label(): ([round(y, 6) for y in line.get_ydata()], line.get_linestyle()) for line in ax_acc.lines
    }
    assert curves == {"frep val/pgd10": ([20.0, 30.0], "-"), "frep live pgd10 (val)": ([18.0, 27.0], ":")}
