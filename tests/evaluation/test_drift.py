"""The drift checks on synthetic prediction logs: a shifted class mix, a shifted anomaly-score
distribution and a rising uncertain rate are flagged, an unchanged stream is not, too few answers
are not judged, an empty window says so, and the log is read as the service writes it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from omegaconf import OmegaConf

from defectflow.config import DriftConfig
from defectflow.evaluation import drift
from defectflow.serving.settings import json_log_line, prediction_record

CLASSES = ["good", "crack", "poke"]
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MODEL = "defectflow:abc"


def _cfg(**changes):
    return OmegaConf.merge(OmegaConf.structured(DriftConfig), changes)


def _answers(n, shares=(0.8, 0.1, 0.1), score_mean=1.0, uncertain=0.05, seed=0):
    rng = np.random.default_rng(seed)
    classes = rng.choice(CLASSES, size=n, p=shares)
    scores = rng.normal(score_mean, 0.1, size=n)
    statuses = np.where(rng.random(n) < uncertain, "uncertain", "accepted")
    return [
        {"class": str(c), "answer_status": str(s), "anomaly_score": float(v)}
        for c, s, v in zip(classes, statuses, scores, strict=True)
    ]


def _verdicts(checks):
    return {c.name: c.verdict for c in checks}


def test_an_unchanged_stream_is_not_flagged():
    checks = drift.compare(_answers(300, seed=1), _answers(400, seed=2), _cfg(), CLASSES)
    assert _verdicts(checks) == {
        "class mix": drift.NO_DRIFT,
        "anomaly score": drift.NO_DRIFT,
        "uncertain rate": drift.NO_DRIFT,
    }
    psi = checks[0]
    assert psi.value < 0.05 and psi.p_value > 0.01


def test_a_shifted_class_mix_is_flagged_alone():
    checks = drift.compare(
        _answers(300, seed=1), _answers(400, shares=(0.4, 0.5, 0.1), seed=2), _cfg(), CLASSES
    )
    assert _verdicts(checks) == {
        "class mix": drift.DRIFT,
        "anomaly score": drift.NO_DRIFT,
        "uncertain rate": drift.NO_DRIFT,
    }
    assert checks[0].value >= 0.2 and checks[0].p_value < 1e-6
    assert "crack" in checks[0].production and "(n=400)" in checks[0].production


def test_a_shifted_score_distribution_is_flagged_alone():
    checks = drift.compare(
        _answers(300, seed=1), _answers(400, score_mean=1.15, seed=2), _cfg(), CLASSES
    )
    assert _verdicts(checks)["anomaly score"] == drift.DRIFT
    assert _verdicts(checks)["class mix"] == drift.NO_DRIFT
    ks = checks[1]
    assert ks.statistic == "KS" and ks.value > 0.4 and ks.p_value < 1e-6


def test_a_rising_uncertain_rate_is_flagged():
    checks = drift.compare(
        _answers(300, seed=1), _answers(400, uncertain=0.3, seed=2), _cfg(), CLASSES
    )
    rate = checks[2]
    assert rate.verdict == drift.DRIFT and rate.value == pytest.approx(0.25, abs=0.06)
    assert rate.value_text().startswith("change +")


def test_a_large_effect_on_a_handful_of_answers_is_not_judged():
    checks = drift.compare(
        _answers(300, seed=1), _answers(20, shares=(0.1, 0.8, 0.1), seed=2), _cfg(), CLASSES
    )
    assert set(_verdicts(checks).values()) == {drift.TOO_FEW}
    assert checks[0].value > 1.0  # shown, not judged
    assert "drift.min_predictions=50" in checks[0].note


def test_a_small_reference_needs_a_significant_difference():
    # A PSI over its threshold, but 8 reference answers cannot tell that from chance.
    reference = [{"class": "good", "answer_status": "accepted", "anomaly_score": None}] * 6 + [
        {"class": "crack", "answer_status": "accepted", "anomaly_score": None}
    ] * 2
    production = _answers(200, shares=(0.4, 0.5, 0.1), seed=3)
    check = drift.compare(reference, production, _cfg(), CLASSES)[0]
    assert check.value >= 0.2 and check.p_value > 0.01 and check.verdict == drift.NO_DRIFT


def test_scores_missing_on_either_side_are_not_available():
    without = [{**a, "anomaly_score": None} for a in _answers(100)]
    assert "no anomaly score" in drift.compare(without, _answers(100), _cfg())[1].note
    check = drift.compare(_answers(100), without, _cfg())[1]
    assert check.verdict == drift.UNAVAILABLE and "carry no anomaly score" in check.note


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift():
    # Zero but for the pseudo-count every class gets.
    assert drift.population_stability_index([50, 30, 20], [100, 60, 40]) == pytest.approx(
        0.0, abs=1e-4
    )
    small = drift.population_stability_index([50, 30, 20], [45, 35, 20])
    large = drift.population_stability_index([50, 30, 20], [10, 70, 20])
    assert 0 < small < 0.1 < 0.25 < large
    assert np.isfinite(drift.population_stability_index([50, 50, 0], [0, 50, 50]))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_p_value"):
        drift.check_settings(_cfg(max_p_value=0.0))
    with pytest.raises(ValueError, match="window_hours"):
        drift.check_settings(_cfg(window_hours=0))


def _line(record: dict, when: datetime) -> str:
    return json.dumps({**record, "time": when.strftime(drift.LOG_TIME_FORMAT)})


def test_the_log_is_read_as_the_service_writes_it(tmp_path):
    result = {
        "class": "crack",
        "probabilities": {"good": 0.1, "crack": 0.9},
        "confidence": 0.9,
        "status": "uncertain",
        "anomaly_score": 1.25,
    }
    written = json_log_line(prediction_record("r1", "/predict", MODEL, 0.0, None, result, 200))
    log = tmp_path / "predictions.jsonl"
    now = datetime.now(UTC)
    hour = timedelta(hours=1)
    log.write_text(
        "\n".join(
            [
                written,
                json_log_line({"event": "start", "review_access": "off"}),
                json_log_line(
                    prediction_record("r2", "/predict", MODEL, 0.0, None, None, 413, "too big")
                ),
                json_log_line(
                    prediction_record("r3", "/predict", "defectflow:old", 0.0, None, result, 200)
                ),
                _line({"event": "prediction", "model": MODEL, "class": "good"}, now - 30 * hour),
                "not json",
            ]
        )
        + "\n"
    )
    window = drift.read_prediction_log(log, now - 24 * hour, now + hour, MODEL)
    assert window.answers == [
        {"class": "crack", "answer_status": "uncertain", "anomaly_score": 1.25}
    ]
    assert (window.refused, window.malformed, window.other_models) == (
        1,
        1,
        {"defectflow:old": 1},
    )
    missing = drift.read_prediction_log(tmp_path / "none.jsonl", now - hour, now, MODEL)
    assert not missing.exists and missing.answers == []


def test_an_empty_window_says_so_without_numbers(tmp_path):
    window = drift.LogWindow(str(tmp_path / "p.jsonl"), NOW - timedelta(hours=24), NOW)
    window.other_models = {"defectflow:old": 3}
    report = drift.DriftReport(MODEL, window)
    text = report.markdown()
    assert report.headline() == "no answers logged in the last 24 h"
    assert "No answer of production model `defectflow:abc` was logged" in text
    assert "nothing to compare" in text and "`defectflow:old` 3" in text
    assert not any(ch.isdigit() for row in report.table_rows() for ch in "".join(row.values()))
    paths = report.save(tmp_path / "out")
    assert "png" not in paths and "nothing to compare" in paths["html"].read_text()
    assert json.loads(paths["json"].read_text())["window"]["answers"] == 0


def test_the_report_names_the_drift_and_draws_it(tmp_path):
    window = drift.LogWindow("p.jsonl", NOW - timedelta(hours=24), NOW)
    window.answers = _answers(400, shares=(0.4, 0.5, 0.1), seed=2)
    reference = _answers(300, seed=1)
    report = drift.DriftReport(
        MODEL,
        window,
        "its own answers on 300 validation images",
        drift.compare(reference, window.answers, _cfg(), CLASSES),
        classes=[*CLASSES, "unknown_defect"],
        reference=reference,
    )
    assert report.headline() == "drift in class mix" and report.summary()["drifted"] == [
        "class mix"
    ]
    text = report.markdown()
    assert "| class mix |" in text and "| drift |" in text and "300 validation images" in text
    assert [r["check"] for r in report.table_rows()] == [
        "class mix",
        "anomaly score",
        "uncertain rate",
    ]
    fig = drift.drift_figure(report)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("Class mix\nPSI") and titles[0].endswith(", drift")
    assert "unknown_defect" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    image = drift.drift_image(report)
    assert image.dtype == np.uint8 and image.shape == (380, 1260, 3)
    paths = report.save(tmp_path)
    assert paths["png"].stat().st_size > 0 and 'src="drift.png"' in paths["html"].read_text()
