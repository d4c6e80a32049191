"""benchmarks/presence_signals.py: every presence decision is chosen on validation only, and the
model's own policy on a run of the real pipeline gives the presence accuracy its evaluation
reported."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from helpers_processes import load_file_module


def _benchmark():
    return load_file_module("benchmarks", "presence_signals")


def _split(p_defect, scores):
    """Two classes (good, crack): the first half good, the second crack."""
    p_defect = np.asarray(p_defect, float)
    labels = np.array([0] * (len(p_defect) // 2) + [1] * (len(p_defect) - len(p_defect) // 2))
    return np.column_stack([1 - p_defect, p_defect]), np.asarray(scores, float), labels


def test_a_defect_only_the_anomaly_score_sees_is_caught_by_the_combined_decisions():
    """Four good and four defect images; the classifier misses the last defect (P(defect) 0.1)
    and the anomaly score alone confuses a good image with a defect, but the two together
    separate every image: the decisions fitted on both are right on all eight."""
    bench = _benchmark()
    split = _split([0.1, 0.2, 0.1, 0.2, 0.9, 0.8, 0.9, 0.1], [1, 1, 3.2, 1, 3, 3, 3, 4])
    info = SimpleNamespace(anomaly_threshold=3.5, temperature=1.0, defect_threshold=0.5)
    rows = {row["decision"]: row for row in bench.score_run(info, split, split)}
    assert set(rows) == set(bench.DECISIONS)
    assert rows["classifier"]["test_presence_accuracy"] == pytest.approx(7 / 8)
    assert rows["classifier"]["test_missed_defects"] == 1
    assert rows["anomaly"]["test_presence_accuracy"] == pytest.approx(7 / 8)
    # The model's anomaly threshold (3.5) flags the missed defect: an unknown_defect, no class.
    assert rows["shipped"]["test_presence_accuracy"] == 1.0
    assert rows["shipped"]["test_accuracy"] == pytest.approx(7 / 8)
    for name in ("logistic", "ratio_max"):
        assert rows[name]["test_presence_accuracy"] == 1.0, name
        assert rows[name]["test_auroc"] == 1.0, name
    # The logistic decision names the most probable defect class; ratio_max, like the product,
    # answers unknown_defect where only the anomaly score flags the part.
    assert rows["logistic"]["test_accuracy"] == 1.0
    assert rows["ratio_max"]["test_accuracy"] == pytest.approx(7 / 8)


def test_decisions_on_a_pipeline_run_reproduce_its_evaluation(pipeline_model, tmp_path):
    bench = _benchmark()
    out = tmp_path / "presence.json"
    assert bench.main([str(pipeline_model.run_dir), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    evaluation = json.loads((pipeline_model.run_dir / "evaluation" / "metrics.json").read_text())
    shipped = record["summary"]["shipped"]
    assert shipped["test_presence_accuracy"] == pytest.approx(
        evaluation["presence_accuracy"], abs=1e-4
    )
    assert shipped["test_accuracy"] == pytest.approx(evaluation["accuracy"], abs=1e-4)
    assert {row["decision"] for row in record["runs"]} == set(bench.DECISIONS)
    assert record["provenance"]["command"].startswith("python benchmarks/presence_signals.py")
