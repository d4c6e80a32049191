import json

import pytest

from defectflow.evaluation import results
from defectflow.evaluation.evaluate import HEADLINE


def _run(seed, value):
    return {"seed": seed, "metrics": {k: value for k in HEADLINE}, "run_dir": f"/runs/{seed}"}


def test_mean_and_sample_std_over_seeds(tmp_path):
    runs = [_run(1, 0.8), _run(2, 0.9), _run(3, 1.0)]
    summary = results.write(runs, tmp_path)
    assert summary["accuracy"]["mean"] == pytest.approx(0.9)
    assert summary["accuracy"]["std"] == pytest.approx(0.1)  # sample std (ddof=1)
    assert (summary["accuracy"]["min"], summary["accuracy"]["max"]) == (0.8, 1.0)
    table = (tmp_path / "results.md").read_text()
    assert "| overall class accuracy | 0.900 ± 0.100 | 0.800 | 0.900 | 1.000 |" in table
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 4
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["seed"] == 1


def test_one_run_has_zero_spread_and_none_is_an_error():
    assert results.summarize([_run(1, 0.5)])["dice"]["std"] == 0.0
    with pytest.raises(ValueError, match="no runs"):
        results.summarize([])


def test_confusion_matrices_are_pooled_over_runs(tmp_path):
    runs = [
        {**_run(s, 0.5), "classes": ["good", "crack"], "confusion_matrix": [[2, 0], [1, 1]]}
        for s in (1, 2)
    ]
    results.write(runs, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| good | 4 | 0 |" in text and "| crack | 2 | 2 |" in text


def test_coverage_and_the_confusion_matrix_come_from_each_run_folder(tmp_path):
    runs = []
    for seed, coverage in ((1, 0.6), (2, 0.8)):
        run_dir = tmp_path / f"run{seed}"
        (run_dir / "evaluation").mkdir(parents=True)
        metrics = {
            **{k: 0.9 for k in HEADLINE},
            "coverage": coverage,
            "accepted_accuracy": 1.0,
            "accept_target_accuracy": 0.99,
            "classes": ["good", "crack"],
            "confusion_matrix": [[3, 0], [1, 2]],
            "per_class": {},  # the rest of metrics.json stays in the run folder
        }
        (run_dir / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
        runs.append({"seed": seed, "metrics": {k: 0.9 for k in HEADLINE}, "run_dir": str(run_dir)})
    full = results.with_test_figures(runs)
    assert "coverage" not in runs[0]["metrics"]  # the flow's own records are left as they were
    summary = results.write(full, tmp_path / "out")
    assert summary["coverage"]["mean"] == pytest.approx(0.7)
    assert summary["accepted_accuracy"]["values"] == [1.0, 1.0]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| answers accepted without review (coverage) | 0.700 ± 0.141 | 0.600 | 0.800 |" in table
    assert "lowest that gives 0.99 accuracy" in table
    assert "| crack | 2 | 4 |" in table
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert "coverage" in header and "per_class" not in header


def test_runs_without_coverage_are_summarized_without_it():
    summary = results.summarize(
        [_run(1, 0.5), {**_run(2, 0.5), "metrics": {**_run(2, 0.5)["metrics"], "coverage": 0.4}}]
    )
    assert "coverage" not in summary and "accuracy" in summary
    assert "coverage" not in results.markdown([_run(1, 0.5)], results.summarize([_run(1, 0.5)]))


def test_stage_times_per_seed_and_over_all_seeds(tmp_path):
    runs = [
        {
            **_run(42, 0.9),
            "stage_seconds": {"tune-hyperparameters": 600.0, "train-model": 300.0},
            "wall_seconds": 950.0,
        },
        {
            **_run(43, 0.9),
            "stage_seconds": {"tune-hyperparameters": 0.5, "train-model": 280.0},
            "wall_seconds": 320.0,
        },
        {
            **_run(44, 0.9),
            "stage_seconds": {"train-model": 290.0, "gate": 0.25},
            "wall_seconds": 330.0,
        },
    ]
    assert results.stage_seconds(runs)["gate"] == [None, None, 0.25]
    table = results.stage_markdown(runs)
    assert "| tune-hyperparameters | 600.0 | 0.5 | — | 600.5 |" in table
    assert "| train-model | 300.0 | 280.0 | 290.0 | 870.0 |" in table
    assert "| whole run (first start to last end) | 950.0 | 320.0 | 330.0 | 1600.0 |" in table
    results.write(runs, tmp_path)
    assert "Wall time of each stage, seconds:" in (tmp_path / "results.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][1]["stage_seconds"]["train-model"] == 280.0
    assert results.stage_markdown([_run(1, 0.5)]) is None  # runs from before stage times


def test_a_run_that_accepted_no_answer_leaves_its_accepted_accuracy_out_of_the_mean(tmp_path):
    runs = [_run(s, 0.5) for s in (1, 2, 3)]
    for run, (coverage, accepted) in zip(
        runs, [(0.05, 1.0), (0.4, 0.96), (0.0, float("nan"))], strict=True
    ):
        run["metrics"].update(coverage=coverage, accepted_accuracy=accepted)
    summary = results.write(runs, tmp_path)
    row = summary["accepted_accuracy"]
    assert row["n"] == 2 and row["mean"] == pytest.approx(0.98)
    assert summary["coverage"]["n"] == 3
    table = (tmp_path / "results.md").read_text()
    assert (
        "| accuracy of the accepted answers | 0.980 ± 0.028 (the 2 of 3 runs that have one) "
        "| 1.000 | 0.960 | — |" in table
    )
    nothing = results.summarize([{**runs[2]}])["accepted_accuracy"]
    assert nothing["n"] == 0 and results.mean_std(nothing) == "— (none of the 1 runs has one)"
