"""The evaluation report a person reads to see why a model was, or was not, promoted.

`write_report` writes, into one folder:

- `report.html`: self-contained (inline CSS, every figure a base64 PNG data URI, no scripts,
  nothing fetched), so it can be mailed, attached or opened from an artifact store as is;
  rendered from templates/report.html.j2 (Jinja2, autoescaped) with a context of plain values;
- `report.md`: the same summary in Markdown, figures linked as the PNG files beside it;
- `report_*.png`: those figures.

Contents: the promotion decision (banner and the checks behind it), headline metrics with the
champion beside the challenger and their difference, per-class precision/recall/F1, the
confusion matrix, training curves, the reliability diagram with the expected calibration
error, the confidence figures (temperature, ECE before/after it on validation and on test,
the confidence threshold with its coverage and accuracy) with the accuracy-versus-coverage
plot, and the worst cases (image | true mask | predicted mask).

The decision is the gate's dict: {"passed", "promoted", "message", "champion",
"checks": [{"metric", "kind", "value", "threshold", "champion_value", "tolerance", "passed"}]}.
"""

from __future__ import annotations

import base64
import csv
import json
import math
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from defectflow.artifacts import HEADLINE_METRICS
from defectflow.evaluation.evaluate import Evaluation
from defectflow.evaluation.plots import (
    anomaly_scores_image,
    confusion_matrix_image,
    coverage_curve_image,
    curves_image,
    error_analysis_grid,
    reliability_diagram_image,
    save_rgb,
)
from defectflow.evaluation.results import LABELS

ECE_LABEL = "expected calibration error (top label, 10 bins)"
#: The headline metrics of the report, in order.
REPORT_METRICS = (*HEADLINE_METRICS, "expected_calibration_error")
LOWER_IS_BETTER = {"expected_calibration_error"}
#: Training history series drawn, (chart title, preferred keys); absent keys are skipped.
CURVES = (
    ("loss", ["loss", "val_loss", "class_loss", "val_class_loss"]),
    (
        "class accuracy and mask Dice",
        ["class_accuracy", "val_class_accuracy", "mask_dice", "val_mask_dice"],
    ),
)


def metric_label(key: str) -> str:
    return ECE_LABEL if key == "expected_calibration_error" else LABELS.get(key, key)


def _number(value) -> float | None:
    """A metric value as a float, None when missing or not a number (NaN included)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _fmt(value, digits: int = 4) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.{digits}f}"


def _difference(challenger, champion) -> float | None:
    a, b = _number(challenger), _number(champion)
    return None if a is None or b is None else a - b


def metrics_table_rows(challenger: Evaluation, champion: Evaluation | None = None) -> list[dict]:
    """The headline metrics as rows for a table (e.g. a Prefect table artifact): metric (its
    readable name), challenger, and with a champion also champion and difference (challenger
    minus champion). Values rounded to 4 digits; None where a metric is missing or undefined."""
    rows = []
    for key in REPORT_METRICS:
        value = _number(challenger.metrics.get(key))
        row = {
            "metric": metric_label(key),
            "challenger": None if value is None else round(value, 4),
        }
        if champion is not None:
            theirs = _number(champion.metrics.get(key))
            diff = _difference(value, theirs)
            row["champion"] = None if theirs is None else round(theirs, 4)
            row["difference"] = None if diff is None else round(diff, 4)
        rows.append(row)
    return rows


def load_history(path: str | Path) -> dict[str, list[float]]:
    """Training history from a model's training.json ("history") or a Keras CSVLogger file."""
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())["history"]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in (rows[0] if rows else {}) if k != "epoch"]
    return {k: [float(r[k]) for r in rows] for k in keys}


# ---------------------------------------------------------------- Markdown


def _decision_dict(decision) -> dict | None:
    """The decision dict, also from a `gate.GateDecision` (which gives it with `to_dict()`)."""
    return decision if decision is None or isinstance(decision, dict) else decision.to_dict()


def _decision_line(decision: dict | None) -> str:
    if decision is None:
        return "**Decision: none recorded** (evaluation only)"
    verdict = "PROMOTED" if decision["promoted"] else "NOT PROMOTED"
    line = f"**Decision: {verdict}** — {decision['message']}"
    if decision.get("champion"):
        line += f" (champion: `{decision['champion']}`)"
    return line


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _check_cells(check: dict) -> list[str]:
    return [
        metric_label(check["metric"]),
        check.get("kind", "absolute"),
        _fmt(check.get("value")),
        _fmt(check.get("threshold")),
        _fmt(check.get("champion_value")),
        _fmt(check.get("tolerance")),
        "pass" if check["passed"] else "FAIL",
    ]


CHECK_HEADER = ["check", "kind", "challenger", "threshold", "champion", "tolerance", "result"]


def _per_class_rows(
    challenger: Evaluation, champion: Evaluation | None
) -> tuple[list[str], list[list[str]]]:
    ours = challenger.metrics.get("per_class", {})
    theirs = champion.metrics.get("per_class", {}) if champion is not None else {}
    header = ["class", "precision", "recall", "F1", "support"]
    if champion is not None:
        header += ["champion precision", "champion recall", "champion F1"]
    rows = []
    for name in [*ours, *(c for c in theirs if c not in ours)]:
        row = ours.get(name, {})
        cells = [
            name,
            _fmt(row.get("precision"), 3),
            _fmt(row.get("recall"), 3),
            _fmt(row.get("f1"), 3),
            str(row.get("support", "—")),
        ]
        if champion is not None:
            other = theirs.get(name, {})
            cells += [
                _fmt(other.get("precision"), 3),
                _fmt(other.get("recall"), 3),
                _fmt(other.get("f1"), 3),
            ]
        rows.append(cells)
    return header, rows


def confidence_rows(m: dict) -> list[list[str]]:
    """The confidence figures of evaluation metrics `m` as [figure, value] rows (plain text):
    the temperature, ECE on validation before/after it and on test, the confidence threshold
    and what it accepts on validation and test. Empty for an evaluation without them."""
    if "coverage" not in m:
        return []
    rows = [["temperature (1 = the network's own probabilities)", _fmt(m.get("temperature"), 3)]]
    if "val_ece_before" in m:
        rows += [
            ["ECE, validation, before temperature", _fmt(m.get("val_ece_before"))],
            ["ECE, validation, after temperature", _fmt(m.get("val_ece_after"))],
        ]
    rows.append(["ECE, test, after temperature", _fmt(m.get("expected_calibration_error"))])
    threshold = _number(m.get("confidence_threshold"))
    if threshold is None:
        rows.append(["confidence threshold", "none: every answer accepted"])
    else:
        rows.append(["confidence threshold (below: uncertain)", _fmt(threshold)])
        if "val_coverage" in m:
            target = _number(m.get("accept_target_accuracy"))
            reached = "reached" if m.get("target_reached") else "not reached"
            rows += [
                ["coverage, validation", _fmt(m.get("val_coverage"), 3)],
                [
                    "accuracy of accepted, validation"
                    + (f" (target {target:.3f}, {reached})" if target else ""),
                    _fmt(m.get("val_accepted_accuracy"), 3),
                ],
            ]
    rows += [
        ["coverage, test (share of images accepted)", _fmt(m.get("coverage"), 3)],
        ["accuracy of accepted, test", _fmt(m.get("accepted_accuracy"), 3)],
    ]
    return rows


def anomaly_rows(m: dict) -> list[list[str]]:
    """The anomaly figures of evaluation metrics `m` as [figure, value] rows, with the
    classifier alone beside the combined decision; empty without an anomaly head."""
    if "anomaly_threshold" not in m:
        return []
    alone = m.get("classifier_only", {})
    return [
        ["anomaly threshold (chosen on good validation images)", _fmt(m.get("anomaly_threshold"))],
        ["AUROC of the anomaly score (good vs defect)", _fmt(m.get("anomaly_auroc"))],
        ["AUROC of the combined decision score", _fmt(m.get("detection_auroc"))],
        ["unknown_defect answers", str(m.get("unknown_defect_answers"))],
        [
            "false alarms on good images: combined / classifier alone",
            f"{_fmt(m.get('false_alarm_rate'), 3)} / {_fmt(alone.get('false_alarm_rate'), 3)}",
        ],
        [
            "accuracy: combined / classifier alone",
            f"{_fmt(m.get('accuracy'))} / {_fmt(alone.get('accuracy'))}",
        ],
        [
            "defect-only Dice: combined / classifier alone",
            f"{_fmt(m.get('defect_dice'))} / {_fmt(alone.get('defect_dice'))}",
        ],
    ]


def summary_markdown(
    challenger: Evaluation,
    champion: Evaluation | None = None,
    decision: dict | None = None,
    images: dict[str, str] | None = None,
    title: str = "defectflow evaluation",
) -> str:
    """The Markdown summary: decision line first, then the metric tables; `images` (caption ->
    link) are appended as image links when given (report.md links the PNGs beside it)."""
    decision = _decision_dict(decision)
    parts = [_decision_line(decision), "", f"## {title}", ""]
    header = ["metric", "challenger"] + (["champion", "difference"] if champion is not None else [])
    rows = []
    for row in metrics_table_rows(challenger, champion):
        cells = [row["metric"], _fmt(row["challenger"])]
        if champion is not None:
            diff = row["difference"]
            cells += [_fmt(row["champion"]), "—" if diff is None else f"{diff:+.4f}"]
        rows.append(cells)
    parts += ["### Metrics", "", _md_table(header, rows), ""]
    m = challenger.metrics
    parts += [
        f"Test images: {m.get('n_images', len(challenger.per_image))}, "
        f"of which defective: {m.get('n_defect_images', '—')}. "
        f"Expected calibration error: {_fmt(m.get('expected_calibration_error'))} "
        "(count-weighted mean |accuracy − confidence| over 10 confidence bins; 0 = calibrated).",
        "",
    ]
    confidence = confidence_rows(m)
    if confidence:
        parts += ["### Confidence and coverage", "", _md_table(["figure", "value"], confidence), ""]
    anomaly = anomaly_rows(m)
    if anomaly:
        parts += [
            "### Anomaly score (defect types never labelled)",
            "",
            _md_table(["figure", "value"], anomaly),
            "",
        ]
    if decision is not None and decision.get("checks"):
        parts += [
            "### Promotion checks",
            "",
            _md_table(CHECK_HEADER, [_check_cells(c) for c in decision["checks"]]),
            "",
        ]
    parts += ["### Per class", "", _md_table(*_per_class_rows(challenger, champion)), ""]
    for caption, link in (images or {}).items():
        parts += [f"### {caption}", "", f"![{caption}]({link})", ""]
    return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------- HTML

#: Where report.html.j2 lives (package data, beside this module).
TEMPLATES = Path(__file__).parent / "templates"
#: The report's figures by name (the keys `write_report` returns), with their captions.
FIGURE_CAPTIONS = {
    "confusion_matrix": "Confusion matrix (rows: true class, columns: predicted)",
    "champion_confusion_matrix": "Confusion matrix of the champion",
    "reliability": "Reliability diagram",
    "coverage": "Accuracy vs coverage (confidence threshold)",
    "anomaly_scores": "Anomaly scores of good and defect test images",
    "training_curves": "Training curves",
    "error_analysis": "Worst cases: image | true mask | predicted mask",
}


@cache
def _environment() -> Environment:
    """Autoescaping: every text the context gives is plain text, escaped by the template."""
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _draw_figures(
    out_dir: Path,
    challenger: Evaluation,
    champion: Evaluation | None,
    history: dict[str, list[float]] | None,
    cases: list[tuple[dict, np.ndarray]],
) -> tuple[dict[str, Path], dict[str, str]]:
    """Save the report's figures as report_*.png in `out_dir`: their paths by name, and for a
    figure that could not be drawn the note saying why."""
    m = challenger.metrics
    paths: dict[str, Path] = {}
    notes: dict[str, str] = {}
    if "confusion_matrix" in m:
        paths["confusion_matrix"] = save_rgb(
            confusion_matrix_image(m["confusion_matrix"], m["classes"]),
            out_dir / "report_confusion_matrix.png",
        )
    if champion is not None and "confusion_matrix" in champion.metrics:
        paths["champion_confusion_matrix"] = save_rgb(
            confusion_matrix_image(
                champion.metrics["confusion_matrix"], champion.metrics["classes"]
            ),
            out_dir / "report_confusion_matrix_champion.png",
        )
    bins = challenger.reliability()
    if bins is not None:
        paths["reliability"] = save_rgb(
            reliability_diagram_image(bins, m.get("expected_calibration_error", float("nan"))),
            out_dir / "report_reliability.png",
        )
    else:
        notes["reliability"] = (
            "This evaluation recorded no per-image confidences, so no reliability diagram."
        )
    curve = challenger.coverage_curve()
    if curve:
        paths["coverage"] = save_rgb(
            coverage_curve_image(
                curve, m.get("confidence_threshold"), m.get("accept_target_accuracy")
            ),
            out_dir / "report_coverage.png",
        )
    else:
        notes["coverage"] = (
            "This evaluation recorded no per-image confidences, so no accuracy-versus-coverage plot."
        )
    scored = [r for r in challenger.per_image if "anomaly_score" in r]
    if scored and "anomaly_threshold" in m:
        good = m["classes"][0]
        paths["anomaly_scores"] = save_rgb(
            anomaly_scores_image(
                [r["anomaly_score"] for r in scored if r["true"] == good],
                [r["anomaly_score"] for r in scored if r["true"] != good],
                m["anomaly_threshold"],
            ),
            out_dir / "report_anomaly_scores.png",
        )
    if history:
        charts = [
            curves_image(history, keys, size=(560, 320), title=name)
            for name, keys in CURVES
            if any(history.get(k) for k in keys)
        ]
        if charts:
            paths["training_curves"] = save_rgb(
                np.hstack(charts), out_dir / "report_training_curves.png"
            )
    if not history or "training_curves" not in paths:
        notes["training_curves"] = "No training history was given."
    if cases:
        try:
            paths["error_analysis"] = save_rgb(
                error_analysis_grid(cases), out_dir / "report_error_analysis.png"
            )
        except (OSError, ValueError) as exc:  # images moved or deleted since the evaluation
            notes["error_analysis"] = f"The images of the worst cases could not be read: {exc}"
    elif any(r["true"] != r["predicted"] for r in challenger.per_image):
        notes["error_analysis"] = "This evaluation kept no predicted masks, so no error analysis."
    else:
        notes["error_analysis"] = (
            "No errors to show: every image was classified correctly and no defect mask kept."
        )
    return paths, notes


def _banner(decision: dict | None) -> dict:
    """The decision banner: its colour (css class), verdict, message and details. Green:
    promoted; red: the gate failed; amber: the gate passed but the model was not promoted
    (e.g. promotion switched off); grey: no decision."""
    if decision is None:
        return {
            "css": "neutral",
            "verdict": "No promotion decision",
            "message": "evaluation only",
            "details": [],
        }
    checks = decision.get("checks", [])
    failed = [c for c in checks if not c["passed"]]
    passed = decision.get("passed", not failed)
    if decision["promoted"]:
        css, verdict = "promoted", "Promoted"
    else:
        css, verdict = (
            ("held", "Not promoted (gate passed)") if passed else ("rejected", "Not promoted")
        )
    details = [
        f"gate checks: {len(checks) - len(failed)} of {len(checks)} passed",
        f"champion: {decision['champion']}" if decision.get("champion") else "no champion compared",
    ]
    if decision.get("champion_note"):
        details.append(decision["champion_note"])
    return {"css": css, "verdict": verdict, "message": decision["message"], "details": details}


def _metric_rows(challenger: Evaluation, champion: Evaluation | None) -> list[dict]:
    """The headline metrics as text: metric, challenger, champion, difference and its css class
    ("better", "worse"; "" when equal or not comparable)."""
    rows = []
    for key, row in zip(REPORT_METRICS, metrics_table_rows(challenger, champion), strict=True):
        diff = row.get("difference")
        good = None if diff is None else -diff if key in LOWER_IS_BETTER else diff
        rows.append(
            {
                "metric": row["metric"],
                "challenger": _fmt(row["challenger"]),
                "champion": _fmt(row.get("champion")),
                "difference": "—" if diff is None else f"{diff:+.4f}",
                "css": "" if not good else "better" if good > 0 else "worse",
            }
        )
    return rows


def _worst_rows(cases: list[tuple[dict, np.ndarray]]) -> list[list[str]]:
    return [
        [
            str(i + 1),
            "/".join(Path(r["path"]).parts[-3:]),
            r["true"],
            r["predicted"],
            _fmt(r.get("confidence"), 3),
            _fmt(r.get("p_defect"), 3),
            _fmt(r.get("dice"), 3),
        ]
        for i, (r, _) in enumerate(cases)
    ]


def write_report(
    out_dir: str | Path,
    challenger: Evaluation,
    champion: Evaluation | None = None,
    decision: dict | None = None,
    history: dict[str, list[float]] | None = None,
    title: str = "defectflow evaluation",
    info: dict | None = None,
    error_count: int = 12,
) -> dict[str, Path]:
    """Write report.html, report.md and their figures into `out_dir`; returns their paths by
    name: "html", "markdown", and those figures that were drawn: "confusion_matrix",
    "champion_confusion_matrix", "reliability", "coverage", "training_curves", "error_analysis".

    `champion`: the current production model evaluated on the same images (metrics suffice);
    `decision`: the gate's decision dict (module docstring) or an object with `to_dict()`
    giving it; `history`: training history
    series by name (see `load_history`); `info`: extra facts shown at the top (run, data...);
    `error_count`: at most this many worst cases in the error analysis.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decision = _decision_dict(decision)
    m = challenger.metrics
    cases = challenger.worst_cases(error_count)
    paths, notes = _draw_figures(out_dir, challenger, champion, history, cases)

    links = {FIGURE_CAPTIONS[k]: p.name for k, p in paths.items()}
    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(
        summary_markdown(challenger, champion, decision, links, title), encoding="utf-8"
    )

    facts = {
        "test images": m.get("n_images", len(challenger.per_image)),
        "defective test images": m.get("n_defect_images", "—"),
        **(info or {}),
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    checks = (decision or {}).get("checks") or []
    class_header, class_rows = _per_class_rows(challenger, champion)
    context = {
        "title": title,
        "banner": _banner(decision),
        "facts": list(facts.items()),
        "check_header": CHECK_HEADER,
        "checks": [_check_cells(c) for c in checks],
        "check_classes": ["" if c["passed"] else "fail" for c in checks],
        "compared": champion is not None,
        "champion_name": decision.get("champion") if decision else None,
        "metrics": _metric_rows(challenger, champion),
        "class_header": class_header,
        "class_rows": class_rows,
        "ece": _fmt(m.get("expected_calibration_error")),
        "confidence": confidence_rows(m),
        "anomaly": anomaly_rows(m),
        "figures": {
            k: {
                "caption": FIGURE_CAPTIONS[k],
                "png": base64.b64encode(p.read_bytes()).decode("ascii"),
            }
            for k, p in paths.items()
            if k in FIGURE_CAPTIONS
        },
        "notes": notes,
        "worst": _worst_rows(cases),
        "worst_classes": ["wrong" if r["true"] != r["predicted"] else "" for r, _ in cases],
    }
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(
        _environment().get_template("report.html.j2").render(context), encoding="utf-8"
    )
    return paths
