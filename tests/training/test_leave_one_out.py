"""`defectflow evaluate --leave-one-out` end to end on tiny synthetic data, and its table."""

import json

import numpy as np
import pytest

from defectflow.cli import main
from defectflow.training.leave_one_out import COLUMNS, figures, summarize


def test_leave_one_out_trains_without_each_type_and_measures_it(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "loo"
    args = [
        "evaluate",
        "--leave-one-out",
        "--config",
        "tiny",
        "--types",
        "poke",
        "--out",
        str(out),
        f"data.root={tiny_dataset}",
        "train.epochs=1",
        "anomaly.bank_size=200",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| poke |" in printed and "**mean**" in printed
    summary = json.loads((out / "leave_one_out.json").read_text())
    assert [row["left_out"] for row in summary["types"]] == ["poke"]
    for row in summary["types"]:
        left_out = row["left_out"]
        model = json.loads((out / left_out / "model" / "model.json").read_text())
        assert left_out not in model["classes"] and len(model["classes"]) == 5  # never taught
        assert model["anomaly_threshold"] is not None and model["anomaly"]["bank_size"] == 200
        per_image = json.loads((out / left_out / "per_image.json").read_text())
        held = [r for r in per_image if r["true"] == left_out]
        assert len(held) == row["n_images"] == 4  # every image of the type, from all splits
        assert row["flagged"] == pytest.approx(np.mean([r["is_defective"] for r in held]))
        assert all(r["is_defective"] == (r["by_classifier"] or r["by_anomaly"]) for r in per_image)
        assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["false_alarm_rate"] <= 1.0
    assert summary["mean"]["flagged"] == pytest.approx(
        np.mean([r["flagged"] for r in summary["types"]])
    )
    assert (out / "leave_one_out.png").stat().st_size > 0
    assert "| left out |" in (out / "leave_one_out.md").read_text()

    # A type already measured is read back, not trained again.
    trained = (out / "poke" / "model" / "model.keras").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "poke" / "model" / "model.keras").stat().st_mtime_ns == trained


def test_leave_one_out_refuses_an_unknown_type(tmp_path, tiny_dataset, capsys):
    args = [
        "evaluate",
        "--leave-one-out",
        "--config",
        "tiny",
        "--types",
        "dent",
        "--out",
        str(tmp_path),
        f"data.root={tiny_dataset}",
    ]
    assert main(args) == 2
    assert "unknown defect types ['dent']" in capsys.readouterr().err
    assert main(["evaluate", "--leave-one-out", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def row(held, goods, left_out="poke"):
    rows = [
        {
            "true": left_out,
            "predicted": "crack" if c else ("unknown_defect" if a else "good"),
            "p_defect": p,
            "anomaly_score": s,
            "by_classifier": c,
            "by_anomaly": a,
            "is_defective": c or a,
        }
        for p, s, c, a in held
    ]
    rows += [
        {
            "true": "good",
            "predicted": "good" if not (c or a) else "crack",
            "p_defect": p,
            "anomaly_score": s,
            "by_classifier": c,
            "by_anomaly": a,
            "is_defective": c or a,
        }
        for p, s, c, a in goods
    ]
    return figures(rows, left_out, "good", 0.5, 10.0)


def test_figures_split_the_decision_into_its_parts():
    # Held-out images: one the classifier catches, two only the anomaly score, one missed.
    held = [
        (0.9, 5.0, True, False),
        (0.1, 12.0, False, True),
        (0.2, 15.0, False, True),
        (0.1, 4.0, False, False),
    ]
    goods = [
        (0.1, 3.0, False, False),
        (0.2, 6.0, False, False),
        (0.1, 11.0, False, True),
        (0.3, 2.0, False, False),
    ]
    r = row(held, goods)
    assert (
        r["flagged"] == 0.75
        and r["flagged_by_classifier"] == 0.25
        and r["flagged_by_anomaly"] == 0.5
    )
    assert r["unknown_defect"] == 0.5 and r["false_alarm_rate"] == 0.25
    assert r["false_alarm_rate_classifier"] == 0.0 and r["false_alarm_rate_anomaly"] == 0.25
    assert r["answers"] == {"crack": 1, "good": 1, "unknown_defect": 2}
    # Combined score max(p/0.5, s/10): held 1.8, 1.2, 1.5, 0.4 vs good 0.3, 0.6, 1.1, 0.6.
    assert r["auroc"] == pytest.approx(13 / 16)
    summary = summarize([r, {**r, "left_out": "crack", "flagged": 1.0}])
    assert summary["mean"]["flagged"] == 0.875 and summary["met"] == {
        "flagged": False,
        "false_alarm_rate": False,
        "auroc": False,
    }
    assert {key for key, _, _ in COLUMNS} <= set(r)


def test_chart_is_a_picture_of_the_summary():
    from defectflow.training.leave_one_out import chart

    held = [(0.9, 5.0, True, False), (0.1, 12.0, False, True)]
    goods = [(0.1, 3.0, False, False), (0.2, 6.0, False, False)]
    long_name = "faulty_imprint_with_a_very_long_name"
    summary = summarize([row(held, goods), {**row(held, goods, long_name), "flagged": 1.0}])
    image = chart(summary)
    assert (
        image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[2] == 3
        and image.shape[1] >= 600
    )
