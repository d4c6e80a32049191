"""benchmarks/coverage_signals.py on a run of the real pipeline: the model's own policy gives
the coverage its evaluation reported, and every signal is calibrated on validation only."""

import json

import pytest
from helpers_processes import load_file_module


def _benchmark():
    return load_file_module("benchmarks", "coverage_signals")


def test_signals_on_a_pipeline_run_reproduce_its_evaluation(pipeline_model, tmp_path):
    bench = _benchmark()
    out = tmp_path / "coverage.json"
    assert (
        bench.main([str(pipeline_model.run_dir), "--targets", "0.9", "0.99", "--out", str(out)])
        == 0
    )
    record = json.loads(out.read_text())
    evaluation = json.loads((pipeline_model.run_dir / "evaluation" / "metrics.json").read_text())
    shipped = record["summary"]["shipped"]
    assert shipped["test_coverage"] == pytest.approx(evaluation["coverage"], abs=1e-4)
    assert shipped["test_accuracy"] == pytest.approx(evaluation["accuracy"], abs=1e-4)
    rows = {row["signal"]: row for row in record["runs"]}
    assert set(rows) == {"shipped", *bench.SIGNALS}
    for signal in bench.SIGNALS:
        for target in ("at_0.9", "at_0.99"):
            point = rows[signal][target]
            assert 0.0 <= point["test_coverage"] <= 1.0 and 0.0 < point["val_coverage"] <= 1.0
    assert record["provenance"]["command"].startswith("python benchmarks/coverage_signals.py")


def test_a_confident_error_the_flips_disagree_on_is_withheld_by_agreement():
    """Nine right answers at 0.9 and one wrong at 0.99 that its three flipped views contradict:
    the plain confidence cannot reach 0.99 accepted accuracy on validation (the error is its most
    confident answer); agreement withholds the error and accepts the other nine."""
    import numpy as np

    bench = _benchmark()
    labels = np.array([0] * 6 + [1] * 4)
    right = np.where(labels[:, None] == np.arange(2), 0.9, 0.1)
    views = np.repeat(right[None], 4, axis=0)
    views[0, 0] = [0.01, 0.99]  # the good image 0 called crack, only as it is
    split = ((views, None), labels)
    plain = bench.score_signal("confidence", split, split, None, [0.99])
    agree = bench.score_signal("agreement", split, split, None, [0.99])
    mean = bench.score_signal("flip_mean", split, split, None, [0.99])
    assert not plain["at_0.99"]["target_reached_on_val"]
    assert agree["at_0.99"]["target_reached_on_val"]
    assert agree["at_0.99"]["test_coverage"] == pytest.approx(0.9)
    assert agree["at_0.99"]["test_accepted_accuracy"] == 1.0
    assert plain["test_accuracy"] == pytest.approx(0.9) and mean["test_accuracy"] == 1.0
