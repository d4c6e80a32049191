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
