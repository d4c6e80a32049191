"""The evaluation report: what evaluate records for it, its figures, and the HTML/Markdown pages."""

import base64
import html
import json
import math
import re

import cv2
import numpy as np
import pytest

from defectflow.artifacts import ModelInfo
from defectflow.data.mvtec import class_names, scan_dataset
from defectflow.evaluation.evaluate import WORST_MASKS_DIR, Evaluation, error_rank, evaluate
from defectflow.evaluation.metrics import classification_metrics, expected_calibration_error
from defectflow.evaluation.report import (
    ECE_LABEL,
    REPORT_METRICS,
    load_history,
    metrics_table_rows,
    summary_markdown,
    write_report,
)
from defectflow.evaluation.results import LABELS
from defectflow.inference.predictor import Predictor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ScriptedBackend:
    """A forward pass from a script: one class-probability vector per image, in order; the
    mask probability is 0.9 on the top-left quarter of the model input, 0 elsewhere."""

    format = "scripted"

    def __init__(self, script, size):
        self.script = list(script)
        self.size = size

    def __call__(self, batch):
        soft = np.zeros((len(batch), self.size, self.size, 1), np.float32)
        soft[:, : self.size // 2, : self.size // 2] = 0.9
        return {"class": np.array([self.script.pop(0) for _ in batch]), "mask": soft}


class ScriptedPredictor(Predictor):
    """The real Predictor (post-processing included) over a scripted forward pass; the
    predicted mask is the top-left quarter of the image (when the answer is a defect)."""

    def __init__(self, classes, script, size=16, confidence_threshold=None):
        super().__init__(
            ScriptedBackend(script, size),
            ModelInfo(
                classes=list(classes),
                input_size=size,
                mask_threshold=0.5,
                confidence_threshold=confidence_threshold,
            ),
        )

    @property
    def script(self):
        return self.backend.script


def one_hot_ish(classes, label, confidence):
    """`confidence` on `label`, the rest shared evenly by the other classes."""
    rest = (1.0 - confidence) / (len(classes) - 1)
    return [confidence if c == label else rest for c in classes]


@pytest.fixture()
def scripted(tiny_dataset):
    """The tiny dataset's test images (good ones and the 4 of each defect), answered so that
    the first good image is called `crack` (0.9) and the first crack image `good` (0.6)."""
    samples = [s for s in scan_dataset(tiny_dataset) if s.origin == "test"]
    classes = class_names(samples)
    script, wrong = [], {}
    for s in samples:
        if s.label == "good" and "good" not in wrong:
            wrong["good"] = s.path
            script.append(one_hot_ish(classes, "crack", 0.9))
        elif s.label == "crack" and "crack" not in wrong:
            wrong["crack"] = s.path
            script.append(one_hot_ish(classes, "good", 0.6))
        else:
            script.append(one_hot_ish(classes, s.label, 0.8))
    return samples, ScriptedPredictor(classes, script), wrong


def test_evaluate_records_confidence_probabilities_mask_path_and_ece(scripted, tmp_path):
    samples, predictor, wrong = scripted
    result = evaluate(predictor, samples, batch_size=3, plot_dir=tmp_path, plot_count=4)
    rows = result.per_image
    for row, sample in zip(rows, samples, strict=True):
        assert row["confidence"] == pytest.approx(row["probabilities"][row["predicted"]])
        assert set(row["probabilities"]) == set(predictor.classes)
        assert row["mask_path"] == (str(sample.mask_path) if sample.mask_path else None)
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(wrong["good"])]["predicted"] == "crack"
    assert by_path[str(wrong["good"])]["confidence"] == pytest.approx(0.9)
    # 2 wrong of n: 0.9 -> bin 9 alone (accuracy 0), 0.6 -> bin 6 alone (accuracy 0), the rest 0.8 right.
    n = len(rows)
    assert result.metrics["expected_calibration_error"] == pytest.approx(
        (0.9 + 0.6 + (n - 2) * 0.2) / n
    )
    # Keys other code relies on are all still there.
    for key in (
        "accuracy",
        "presence_accuracy",
        "defect_accuracy",
        "auroc",
        "dice",
        "defect_dice",
        "per_class",
        "confusion_matrix",
        "classes",
    ):
        assert key in result.metrics
    for name in (
        "confusion_matrix.png",
        "predictions.png",
        "reliability.png",
        "error_analysis.png",
    ):
        assert (tmp_path / name).exists(), name


def test_evaluate_keeps_only_the_worst_cases_masks_worst_first(scripted):
    samples, predictor, wrong = scripted
    result = evaluate(predictor, samples, batch_size=5, plot_count=3)
    assert len(result.predicted_masks) == 3
    worst = result.worst_cases()
    # Misclassified first, the more confident mistake first; then a defect image.
    assert [r["path"] for r, _ in worst[:2]] == [str(wrong["good"]), str(wrong["crack"])]
    assert worst[2][0]["true"] != "good" and worst[2][0]["true"] == worst[2][0]["predicted"]
    for row, mask in worst:
        image_hw = cv2.imread(row["path"]).shape[:2]
        assert mask.shape == image_hw and mask.dtype == np.uint8
    assert worst[0][1].any()  # good called crack: the predicted quarter mask
    assert not worst[1][1].any()  # crack called good: the mask is cleared
    all_right = ScriptedPredictor(
        predictor.classes, [one_hot_ish(predictor.classes, s.label, 0.8) for s in samples]
    )
    assert evaluate(all_right, samples, plot_count=0).predicted_masks == {}


def test_error_rank_orders_mistakes_then_low_dice_defects_and_skips_right_good_images():
    wrong_sure = {"true": "good", "predicted": "crack", "confidence": 0.95, "dice": 0.0}
    wrong_unsure = {"true": "poke", "predicted": "crack", "confidence": 0.4, "dice": 0.9}
    low_dice = {
        "true": "poke",
        "predicted": "poke",
        "confidence": 0.99,
        "dice": 0.1,
        "mask_path": "m.png",
    }
    high_dice = {
        "true": "poke",
        "predicted": "poke",
        "confidence": 0.99,
        "dice": 0.8,
        "true_area": 0.01,
    }
    right_good = {
        "true": "good",
        "predicted": "good",
        "confidence": 0.99,
        "dice": 1.0,
        "mask_path": None,
        "true_area": 0.0,
    }
    assert error_rank(right_good) is None
    ranked = sorted([high_dice, low_dice, wrong_unsure, wrong_sure], key=error_rank)
    assert ranked == [wrong_sure, wrong_unsure, low_dice, high_dice]


def test_save_and_load_round_trip_the_worst_masks_and_drop_stale_ones(scripted, tmp_path):
    samples, predictor, _ = scripted
    result = evaluate(predictor, samples, plot_count=3)
    (tmp_path / WORST_MASKS_DIR).mkdir()
    cv2.imwrite(
        str(tmp_path / WORST_MASKS_DIR / "00001.png"), np.zeros((4, 4), np.uint8)
    )  # an older evaluation's
    result.save(tmp_path)
    loaded = Evaluation.load(tmp_path)
    assert loaded.metrics == json.loads(json.dumps(result.metrics))
    assert loaded.per_image == json.loads(json.dumps(result.per_image))
    assert sorted(loaded.predicted_masks) == sorted(result.predicted_masks)
    for index, mask in result.predicted_masks.items():
        assert np.array_equal(loaded.predicted_masks[index], mask)


# ---------------------------------------------------------------- figures


def _case_files(tmp_path, name, size=(48, 64), box=None):
    """An image (and a mask with `box` = (y0, y1, x0, x1) as defect) written to tmp_path."""
    image = np.full((*size, 3), 90, np.uint8)
    cv2.circle(
        image, (size[1] // 2, size[0] // 2), min(size) // 3, (160, 160, 160), -1
    )  # gray: no mask colour
    path = tmp_path / f"{name}.png"
    cv2.imwrite(str(path), image)
    mask_path = None
    if box is not None:
        mask = np.zeros(size, np.uint8)
        mask[box[0] : box[1], box[2] : box[3]] = 255
        mask_path = tmp_path / f"{name}_mask.png"
        cv2.imwrite(str(mask_path), mask)
    return path, mask_path


# ---------------------------------------------------------------- report

CLASSES = ["good", "crack", "poke"]


def hand_made_evaluation(tmp_path, shift: float = 0.0) -> Evaluation:
    """Four images of real files: good right, good called crack, crack right, poke called crack."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    specs = [
        ("g0", "good", "good", 0.9, None),
        ("g1", "good", "crack", 0.8, None),
        ("c0", "crack", "crack", 0.7, (5, 15, 5, 25)),
        ("p0", "poke", "crack", 0.6, (20, 30, 30, 50)),
    ]
    rows, masks = [], {}
    for i, (name, true, predicted, confidence, box) in enumerate(specs):
        path, mask_path = _case_files(tmp_path, name, box=box)
        rows.append(
            {
                "path": str(path),
                "mask_path": str(mask_path) if mask_path else None,
                "true": true,
                "predicted": predicted,
                "confidence": confidence,
                "probabilities": dict(
                    zip(CLASSES, one_hot_ish(CLASSES, predicted, confidence), strict=True)
                ),
                "p_defect": 0.1 if predicted == "good" else confidence,
                "dice": 0.5 - shift if box else 1.0,
                "iou": 0.3,
                "soft_dice": 0.4,
                "soft_iou": 0.3,
                "true_area": 0.05 if box else 0.0,
                "predicted_area": 0.0,
            }
        )
        if error_rank(rows[-1]) is not None:
            mask = np.zeros((48, 64), np.uint8)
            mask[10:20, 20:40] = 1
            masks[i] = mask
    y_true = np.array([CLASSES.index(r["true"]) for r in rows])
    y_pred = np.array([CLASSES.index(r["predicted"]) for r in rows])
    metrics = classification_metrics(
        y_true, y_pred, np.array([r["p_defect"] for r in rows]), CLASSES
    )
    metrics.update(
        dice=0.75 - shift,
        defect_dice=0.5 - shift,
        iou=0.65,
        defect_iou=0.3,
        soft_dice=0.7,
        defect_soft_dice=0.4,
        soft_iou=0.6,
        defect_soft_iou=0.3,
        classes=CLASSES,
    )
    evaluation = Evaluation(metrics, rows, masks)
    metrics["expected_calibration_error"] = expected_calibration_error(evaluation.reliability())
    return evaluation


DECISION = {
    "passed": False,
    "promoted": False,
    "champion": "defectflow:abc123",
    "message": "not promoted: defect_dice 0.4000 < champion 0.5000 - 0.01 <tolerance>",
    "checks": [
        {
            "metric": "accuracy",
            "kind": "absolute",
            "value": 0.5,
            "threshold": 0.4,
            "champion_value": None,
            "tolerance": None,
            "passed": True,
        },
        {
            "metric": "defect_dice",
            "kind": "champion",
            "value": 0.4,
            "threshold": 0.49,
            "champion_value": 0.5,
            "tolerance": 0.01,
            "passed": False,
        },
    ],
}


def data_uri_srcs(page: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', page)


def bare_cells(page: str) -> str:
    """The page with table cells stripped of their (alignment) attributes."""
    return re.sub(r"<(td|th)\b[^>]*>", r"<\1>", page)


def test_html_report_is_self_contained_and_explains_the_decision(tmp_path):
    challenger = hand_made_evaluation(tmp_path / "challenger", shift=0.1)
    champion = hand_made_evaluation(tmp_path / "champion")
    history = {
        "loss": [1.0, 0.6, 0.5],
        "val_loss": [1.1, 0.8, 0.7],
        "class_accuracy": [0.5, 0.7, 0.8],
    }
    paths = write_report(
        tmp_path / "report",
        challenger,
        champion,
        DECISION,
        history,
        title="run 42",
        info={"run": "run-42"},
    )
    page = paths["html"].read_text()
    cells = bare_cells(page)
    assert paths["html"] == tmp_path / "report" / "report.html"
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "url(" not in page
    srcs = data_uri_srcs(page)
    assert (
        len(srcs) == 6
    )  # confusion matrices (2), reliability, coverage, training curves, error analysis
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    assert html.escape(DECISION["message"]) in page and DECISION["message"] not in page  # escaped
    assert 'class="banner rejected"' in page and "Not promoted" in page
    assert "<th>champion (defectflow:abc123)</th>" in cells
    assert (
        '<tr class="fail"><td>defect-only Dice (thresholded)</td><td>champion</td>' in cells
    )  # stands out
    assert '<tr class="wrong"><td>1</td>' in cells  # misclassified worst cases too
    for name in CLASSES:
        assert f"<td>{name}</td>" in cells
    for key in REPORT_METRICS:
        assert (
            html.escape(ECE_LABEL if key == "expected_calibration_error" else LABELS[key]) in page
        )
    assert (
        '<td>0.4000</td><td>0.5000</td><td><span class="worse">-0.1000</span></td>' in cells
    )  # defect Dice
    assert "run-42" in page and "<h1>run 42</h1>" in page


def test_html_report_escapes_markup_in_titles_facts_and_class_names(tmp_path):
    """The template autoescapes: markup in a title, a fact or a class name shows as text."""
    challenger = hand_made_evaluation(tmp_path / "e")
    evil = "<script>alert(1)</script>"
    per_class = challenger.metrics["per_class"]
    per_class[evil] = per_class.pop("poke")
    for row in challenger.per_image:
        if row["true"] == "poke":
            row["true"] = evil  # misclassified: also in the worst cases table
    page = write_report(tmp_path / "r", challenger, title=f"run {evil}", info={"run": evil})[
        "html"
    ].read_text()
    assert "<script" not in page.lower()
    escaped = html.escape(evil)
    assert f"<title>run {escaped}</title>" in page and f"<h1>run {escaped}</h1>" in page
    cells = bare_cells(page)
    assert f"<td>run</td><td>{escaped}</td>" in cells
    assert f"<tr><td>{escaped}</td>" in cells  # the per-class row
    assert f"<td>{escaped}</td><td>crack</td>" in cells  # the worst case: true, predicted


def test_lone_model_report_has_no_comparison_column(tmp_path):
    challenger = hand_made_evaluation(tmp_path / "challenger")
    paths = write_report(tmp_path / "report", challenger)
    page, markdown = paths["html"].read_text(), paths["markdown"].read_text()
    assert "champion" not in page.lower() and "champion" not in markdown.lower()
    assert 'class="banner neutral"' in page
    assert "training_curves" not in paths and "No training history" in page
    assert set(paths) == {
        "html",
        "markdown",
        "confusion_matrix",
        "reliability",
        "coverage",
        "error_analysis",
    }


def test_promoted_decision_shows_a_green_banner(tmp_path):
    decision = {
        **DECISION,
        "passed": True,
        "promoted": True,
        "message": "promoted: every check passed",
        "checks": [{**c, "passed": True} for c in DECISION["checks"]],
    }
    page = write_report(tmp_path / "r", hand_made_evaluation(tmp_path / "e"), None, decision)[
        "html"
    ].read_text()
    assert 'class="banner promoted"' in page and "promoted: every check passed" in page
    assert '<tr class="fail">' not in page


def test_gate_passed_but_not_promoted_is_amber_and_decision_objects_are_accepted(tmp_path):
    class DecisionObject:  # what gate.GateDecision offers
        def to_dict(self):
            return {
                **DECISION,
                "passed": True,
                "promoted": False,
                "champion": None,
                "champion_note": "champion could not be loaded",
                "message": "not promoted: gate passed, but promotion is off",
                "checks": [{**c, "passed": True} for c in DECISION["checks"]],
            }

    paths = write_report(
        tmp_path / "r", hand_made_evaluation(tmp_path / "e"), None, DecisionObject()
    )
    page = paths["html"].read_text()
    assert 'class="banner held"' in page and "Not promoted (gate passed)" in page
    assert "champion could not be loaded" in page and "gate checks: 2 of 2 passed" in page
    assert (
        paths["markdown"]
        .read_text()
        .startswith("**Decision: NOT PROMOTED** — not promoted: gate passed")
    )


def test_markdown_summary_decision_first_tables_and_relative_image_links(tmp_path):
    challenger = hand_made_evaluation(tmp_path / "challenger", shift=0.1)
    champion = hand_made_evaluation(tmp_path / "champion")
    paths = write_report(tmp_path / "report", challenger, champion, DECISION, {"loss": [1.0, 0.5]})
    markdown = paths["markdown"].read_text()
    lines = markdown.splitlines()
    assert lines[0].startswith("**Decision: NOT PROMOTED**") and DECISION["message"] in lines[0]
    assert "| metric | challenger | champion | difference |" in markdown
    assert "| defect-only Dice (thresholded) | 0.4000 | 0.5000 | -0.1000 |" in markdown
    ece = challenger.metrics["expected_calibration_error"]
    assert f"| {ECE_LABEL} | {ece:.4f} |" in markdown
    assert "| class | precision | recall | F1 | support | champion precision |" in markdown
    assert (
        "| crack | 0.333 | 1.000 | 0.500 | 1 |" in markdown
    )  # crack predicted 3 times, right once
    assert (
        "| defect-only Dice (thresholded) | champion | 0.4000 | 0.4900 | 0.5000 | 0.0100 | FAIL |"
        in markdown
    )
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 6
    for link in links:
        assert "/" not in link and (paths["markdown"].parent / link).read_bytes().startswith(
            PNG_SIGNATURE
        )
    without_images = summary_markdown(challenger)
    assert "![" not in without_images and without_images.startswith("**Decision: none recorded**")


def test_metrics_table_rows_for_a_table_artifact(tmp_path):
    challenger = hand_made_evaluation(tmp_path / "a", shift=0.1)
    champion = hand_made_evaluation(tmp_path / "b")
    champion.metrics["auroc"] = float("nan")
    rows = metrics_table_rows(challenger, champion)
    assert [r["metric"] for r in rows][:2] == [LABELS["accuracy"], LABELS["presence_accuracy"]]
    assert len(rows) == len(REPORT_METRICS) and all(
        set(r) == {"metric", "challenger", "champion", "difference"} for r in rows
    )
    dice_row = next(r for r in rows if r["metric"] == LABELS["defect_dice"])
    assert dice_row == {
        "metric": LABELS["defect_dice"],
        "challenger": 0.4,
        "champion": 0.5,
        "difference": -0.1,
    }
    auroc_row = next(r for r in rows if r["metric"] == LABELS["auroc"])
    assert auroc_row["champion"] is None and auroc_row["difference"] is None
    json.dumps(rows, allow_nan=False)  # a table artifact is JSON: no NaN
    assert all(set(r) == {"metric", "challenger"} for r in metrics_table_rows(challenger))


def test_report_survives_moved_images_and_old_evaluations(tmp_path):
    challenger = hand_made_evaluation(tmp_path / "e")
    for row in challenger.per_image:
        row["path"] = str(tmp_path / "gone" / "x.png")
    paths = write_report(tmp_path / "r1", challenger)
    assert "error_analysis" not in paths and "could not be read" in paths["html"].read_text()
    old = Evaluation(
        {k: v for k, v in challenger.metrics.items() if k != "expected_calibration_error"},
        [
            {k: v for k, v in r.items() if k not in ("confidence", "probabilities")}
            for r in challenger.per_image
        ],
    )
    paths = write_report(tmp_path / "r2", old)
    page = paths["html"].read_text()
    assert "reliability" not in paths and "no per-image confidences" in page
    assert "coverage" not in paths and "no accuracy-versus-coverage plot" in page
    assert "kept no predicted masks" in page


def test_load_history_from_csv_logger_and_training_json(tmp_path):
    csv_path = tmp_path / "history.csv"
    csv_path.write_text("epoch,loss,val_loss\n0,1.5,1.7\n1,0.5,0.9\n")
    assert load_history(csv_path) == {"loss": [1.5, 0.5], "val_loss": [1.7, 0.9]}
    json_path = tmp_path / "training.json"
    json_path.write_text(json.dumps({"history": {"loss": [1.0]}, "best_epoch": 1}))
    assert load_history(json_path) == {"loss": [1.0]}


def test_report_from_a_real_tiny_model(tiny_dataset, tmp_path):
    """The whole path with a real Keras model: evaluate, then the report from it."""
    from helpers_models import make_tiny_model_dir

    from defectflow.inference.predictor import Predictor

    samples = [s for s in scan_dataset(tiny_dataset) if s.origin == "test"]
    predictor = Predictor.load(make_tiny_model_dir(tmp_path / "model"))
    result = evaluate(predictor, samples, batch_size=8, plot_count=4)
    assert 0.0 <= result.metrics["expected_calibration_error"] <= 1.0
    assert len(result.predicted_masks) <= 4
    paths = write_report(tmp_path / "report", result)
    page = paths["html"].read_text()
    assert "error_analysis" in paths and "reliability" in paths
    assert not math.isnan(result.metrics["expected_calibration_error"])
    assert all(src.startswith("data:image/png;base64,") for src in data_uri_srcs(page))


# ---------------------------------------------------------------- confidence and coverage


def test_evaluate_records_status_coverage_and_the_accuracy_coverage_curve(scripted, tmp_path):
    samples, predictor, wrong = scripted
    # Right answers at 0.8, wrong ones at 0.9 and 0.6: a threshold of 0.7 leaves the 0.6 one uncertain.
    gated = ScriptedPredictor(predictor.classes, list(predictor.script), confidence_threshold=0.7)
    result = evaluate(gated, samples, batch_size=4, plot_dir=tmp_path, plot_count=2)
    m, n = result.metrics, len(samples)
    by_path = {r["path"]: r for r in result.per_image}
    assert by_path[str(wrong["crack"])]["status"] == "uncertain"
    assert by_path[str(wrong["good"])]["status"] == "accepted"  # confidently wrong: 0.9
    assert sum(r["status"] == "uncertain" for r in result.per_image) == 1
    assert m["coverage"] == pytest.approx((n - 1) / n)
    assert m["accepted_accuracy"] == pytest.approx((n - 2) / (n - 1))
    assert m["confidence_threshold"] == 0.7 and m["temperature"] == 1.0
    # Curve: accept all, then from 0.8 up (the 0.6 mistake out), then only the 0.9 mistake.
    assert m["coverage_curve"] == [
        {"threshold": 0.0, "coverage": 1.0, "accuracy": pytest.approx((n - 2) / n)},
        {"threshold": pytest.approx(0.6), "coverage": 1.0, "accuracy": pytest.approx((n - 2) / n)},
        {
            "threshold": pytest.approx(0.8),
            "coverage": pytest.approx((n - 1) / n),
            "accuracy": pytest.approx((n - 2) / (n - 1)),
        },
        {"threshold": pytest.approx(0.9), "coverage": pytest.approx(1 / n), "accuracy": 0.0},
    ]
    assert (tmp_path / "coverage.png").exists()
    assert f"confidence threshold 0.7000: coverage {(n - 1) / n:.3f}" in result.markdown()
    json.dumps(m, allow_nan=False)
    assert None not in [
        v for v in m.values() if not isinstance(v, (dict, list))
    ]  # model store metadata: no None
    ungated = evaluate(predictor, samples)  # no threshold stored: everything accepted
    assert ungated.metrics["coverage"] == 1.0 and "confidence_threshold" not in ungated.metrics
    assert ungated.metrics["accepted_accuracy"] == pytest.approx(ungated.metrics["accuracy"])


def test_report_shows_confidence_figures_and_the_coverage_plot(tmp_path):
    challenger = hand_made_evaluation(tmp_path / "e")
    challenger.metrics.update(
        coverage=0.75,
        accepted_accuracy=2 / 3,
        temperature=1.7,
        confidence_threshold=0.65,
        val_ece_before=0.21,
        val_ece_after=0.04,
        val_coverage=0.8,
        val_accepted_accuracy=0.99,
        accept_target_accuracy=0.99,
        target_reached=True,
        coverage_curve=challenger.coverage_curve(),
    )
    paths = write_report(tmp_path / "r", challenger)
    page, markdown = paths["html"].read_text(), paths["markdown"].read_text()
    assert paths["coverage"].name == "report_coverage.png" and paths[
        "coverage"
    ].read_bytes().startswith(PNG_SIGNATURE)
    assert "![Accuracy vs coverage (confidence threshold)](report_coverage.png)" in markdown
    assert "| ECE, validation, before temperature | 0.2100 |" in markdown
    assert "| ECE, validation, after temperature | 0.0400 |" in markdown
    assert (
        f"| ECE, test, after temperature | {challenger.metrics['expected_calibration_error']:.4f} |"
        in markdown
    )
    assert "| confidence threshold (below: uncertain) | 0.6500 |" in markdown
    assert "| coverage, test (share of images accepted) | 0.750 |" in markdown
    assert "| accuracy of accepted, test | 0.667 |" in markdown
    assert "(target 0.990, reached) | 0.990 |" in markdown
    cells = bare_cells(page)
    assert "<h2>Confidence and coverage</h2>" in page
    assert (
        "<td>temperature (1 = the network's own probabilities)</td><td>1.700</td>"
        in html.unescape(cells)
    )
    assert "<td>confidence threshold (below: uncertain)</td><td>0.6500</td>" in cells
    # The plot is in the page too (as a data URI, after the section heading).
    section = page[page.index("<h2>Confidence and coverage</h2>") :]
    assert (
        'alt="Accuracy vs coverage (confidence threshold)" src="data:image/png;base64,' in section
    )
