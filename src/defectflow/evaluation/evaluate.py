"""Evaluating a model artifact on a set of samples, through the serving code path."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from defectflow.artifacts import HEADLINE_METRICS, METRICS_FILE
from defectflow.data.mvtec import Sample
from defectflow.evaluation.calibration import coverage_curve
from defectflow.evaluation.metrics import (
    auroc,
    classification_metrics,
    dice,
    expected_calibration_error,
    iou,
    reliability_bins,
    segmentation_metrics,
)
from defectflow.evaluation.plots import (
    confusion_matrix_image,
    coverage_curve_image,
    error_analysis_grid,
    image_grid,
    reliability_diagram_image,
    save_rgb,
)
from defectflow.inference.anomaly_score import decision_score
from defectflow.inference.postprocessing import UNKNOWN_DEFECT, overlay
from defectflow.inference.predictor import Predictor
from defectflow.inference.preprocessing import prepare_mask, read_image, read_mask

#: At most this many points of the accuracy-versus-coverage curve are kept in the metrics.
CURVE_POINTS = 200
HEADLINE = tuple(HEADLINE_METRICS)
#: Where `Evaluation.save` keeps the predicted masks of the worst cases (PNG, 0/255).
WORST_MASKS_DIR = "worst_masks"


def error_rank(row: dict) -> tuple | None:
    """Sort key of an error case, smallest = worst; None for a correct answer on a good image.

    Misclassified images come first, the most confidently wrong first; then correctly
    classified defect images, lowest Dice first.
    """
    if row["true"] != row["predicted"]:
        return (0, -row.get("confidence", 0.0))
    if row.get("true_area", 0.0) > 0 or row.get("mask_path"):
        return (1, row["dice"])
    return None


@dataclass
class Evaluation:
    metrics: dict
    per_image: list[dict] = field(default_factory=list)
    #: per_image index -> predicted mask (uint8 {0, 1}, image resolution) of the worst cases
    #: only (see `error_rank`), at most `plot_count` of them: what the error analysis shows.
    predicted_masks: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def headline(self) -> dict[str, float]:
        return {k: self.metrics[k] for k in HEADLINE}

    def markdown(self) -> str:
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.headline().items()]
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for c, row in self.metrics["per_class"].items():
            lines.append(
                f"| {c} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |"
            )
        m = self.metrics
        if "coverage" in m:
            threshold = m.get("confidence_threshold")
            lines += [
                "",
                f"Temperature {m['temperature']:.3f}; confidence threshold "
                + ("none (every answer accepted)" if threshold is None else f"{threshold:.4f}")
                + f": coverage {m['coverage']:.3f}, accuracy of accepted {m['accepted_accuracy']:.4f}.",
            ]
        if "anomaly_threshold" in m:
            alone = m["classifier_only"]
            lines += [
                "",
                f"Anomaly score > {m['anomaly_threshold']:.4f} flags a defect: AUROC {m['anomaly_auroc']:.4f} "
                f"alone, {m['detection_auroc']:.4f} combined with the classifier; "
                f"{m['unknown_defect_answers']} `unknown_defect` answers; false alarms on good images "
                f"{m['false_alarm_rate']:.3f} (classifier alone {alone['false_alarm_rate']:.3f}). Classifier "
                f"alone: accuracy {alone['accuracy']:.4f}, defect Dice {alone['defect_dice']:.4f}.",
            ]
        return "\n".join(lines)

    def reliability(self, n_bins: int = 10) -> list[dict] | None:
        """Reliability bins of the per-image confidences; None when the rows carry none
        (evaluations written before confidences were recorded)."""
        rows = [r for r in self.per_image if "confidence" in r]
        if not rows:
            return None
        return reliability_bins(
            [r["confidence"] for r in rows], [r["true"] == r["predicted"] for r in rows], n_bins
        )

    def coverage_curve(self, max_points: int = CURVE_POINTS) -> list[dict] | None:
        """Accuracy against coverage as the confidence threshold rises (see
        `defectflow.evaluation.calibration.coverage_curve`), at most `max_points` points evenly spread
        along it (the first and last kept); None when the rows carry no confidences."""
        rows = [r for r in self.per_image if "confidence" in r]
        if not rows:
            return None
        curve = coverage_curve(
            [r["confidence"] for r in rows], [r["true"] == r["predicted"] for r in rows]
        )
        if len(curve) > max_points:
            keep = np.unique(np.round(np.linspace(0, len(curve) - 1, max_points)).astype(int))
            curve = [curve[i] for i in keep]
        return curve

    def worst_cases(self, count: int | None = None) -> list[tuple[dict, np.ndarray]]:
        """(per-image row, predicted mask) of the worst cases whose masks were kept, worst first."""
        ranked = sorted(
            (i for i in self.predicted_masks if error_rank(self.per_image[i]) is not None),
            key=lambda i: error_rank(self.per_image[i]),
        )
        return [(self.per_image[i], self.predicted_masks[i]) for i in ranked[:count]]

    def save(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "per_image.json").write_text(json.dumps(self.per_image, indent=1))
        masks_dir = out_dir / WORST_MASKS_DIR
        # Masks of an earlier evaluation in the same folder would pair with the wrong rows.
        for stale in masks_dir.glob("*.png") if masks_dir.is_dir() else []:
            stale.unlink()
        for index, mask in self.predicted_masks.items():
            masks_dir.mkdir(exist_ok=True)
            if not cv2.imwrite(str(masks_dir / f"{index:05d}.png"), mask.astype(np.uint8) * 255):
                raise OSError(f"could not write {masks_dir / f'{index:05d}.png'}")
        path = out_dir / "metrics.json"
        path.write_text(json.dumps(self.metrics, indent=2))
        return path

    @classmethod
    def load(cls, out_dir: Path) -> Evaluation:
        """What `save` wrote: metrics, per-image rows (if any) and the worst cases' masks (if any)."""
        out_dir = Path(out_dir)
        metrics = json.loads((out_dir / "metrics.json").read_text())
        rows_file = out_dir / "per_image.json"
        per_image = json.loads(rows_file.read_text()) if rows_file.exists() else []
        masks = {}
        for png in (
            sorted((out_dir / WORST_MASKS_DIR).glob("*.png"))
            if (out_dir / WORST_MASKS_DIR).is_dir()
            else []
        ):
            if png.stem.isdigit() and int(png.stem) < len(per_image):
                masks[int(png.stem)] = read_mask(png)
        return cls(metrics, per_image, masks)


def evaluate(
    predictor: Predictor,
    samples: list[Sample],
    batch_size: int = 8,
    plot_dir: Path | None = None,
    plot_count: int = 12,
) -> Evaluation:
    if not samples:
        raise ValueError("nothing to evaluate: the sample list is empty")
    classes = predictor.classes
    size = predictor.info.input_size
    # A model with an anomaly head may also answer UNKNOWN_DEFECT; the classifier alone
    # (the same outputs without the anomaly map) is scored beside it.
    answers = (
        classes + [UNKNOWN_DEFECT] if predictor.info.anomaly_threshold is not None else classes
    )
    per_image, y_true, y_pred, p_defect, tiles = [], [], [], [], []
    worst: list[tuple[tuple, int, np.ndarray]] = []  # (error_rank, index, predicted mask), bounded
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [read_image(s.path) for s in chunk]
        outputs = predictor.raw_outputs(images, batch_size)
        predictions = predictor.predictions(images, *outputs)
        alone = (
            predictor.predictions(images, outputs.probabilities, outputs.masks)
            if len(answers) > len(classes)
            else [None] * len(chunk)
        )
        for sample, image, pred, classifier in zip(chunk, images, predictions, alone, strict=True):
            truth = (
                read_mask(sample.mask_path)
                if sample.mask_path
                else np.zeros(image.shape[:2], np.uint8)
            )
            soft_truth = prepare_mask(truth, size)[:, :, 0]
            row = {
                "path": str(sample.path),
                "mask_path": str(sample.mask_path) if sample.mask_path else None,
                "true": sample.label,
                "predicted": pred.label,
                # The probability of the class answered (with a calibrated P(defect) threshold
                # that need not be the most probable one): what calibration is measured on.
                "confidence": pred.confidence,
                # accepted, or uncertain: below the model's confidence threshold.
                "status": pred.status,
                "probabilities": dict(pred.probabilities),
                "p_defect": 1.0 - pred.probabilities[classes[0]],
                "dice": dice(truth, pred.mask),
                "iou": iou(truth, pred.mask),
                "soft_dice": dice(soft_truth, pred.mask_probability),
                "soft_iou": iou(soft_truth, pred.mask_probability),
                "true_area": float(truth.mean()),
                "predicted_area": pred.defect_area_fraction,
            }
            if pred.anomaly_score is not None:
                row["anomaly_score"] = pred.anomaly_score
            if classifier is not None:
                row["classifier_predicted"] = classifier.label
                row["classifier_dice"] = dice(truth, classifier.mask)
            rank = error_rank(row)
            if rank is not None and plot_count > 0:
                worst.append((rank, len(per_image), pred.mask))
                worst.sort(key=lambda w: (w[0], w[1]))
                del worst[plot_count:]
            per_image.append(row)
            y_true.append(classes.index(sample.label))
            y_pred.append(answers.index(pred.label))
            p_defect.append(row["p_defect"])
            if plot_dir is not None and len(tiles) < plot_count:
                tiles.append(
                    (
                        overlay(
                            overlay(image, truth, (0, 255, 0), 0.4), pred.mask, (255, 0, 0), 0.5
                        ),
                        row,
                    )
                )
    y_true_a = np.array(y_true)
    metrics = classification_metrics(y_true_a, np.array(y_pred), np.array(p_defect), answers)
    metrics.update(segmentation_metrics(per_image, y_true_a != 0))
    result = Evaluation(metrics, per_image, {index: mask for _, index, mask in worst})
    metrics["expected_calibration_error"] = expected_calibration_error(result.reliability())
    metrics.update(_confidence_metrics(result, predictor.info))
    metrics.update(_anomaly_metrics(per_image, classes[0], predictor.info))
    metrics["classes"] = answers
    if plot_dir is not None:
        _plots(result, tiles, plot_dir)
    return result


def _confidence_metrics(result: Evaluation, info) -> dict:
    """Coverage (share of images whose answer was accepted), the accuracy of the accepted
    answers (NaN when none was), the accuracy-versus-coverage curve, and the model's
    temperature and confidence threshold with their validation figures (from calibration).
    Numbers only, no None: the metrics also go into the model store's metadata."""
    rows = result.per_image
    accepted = [
        r["true"] == r["predicted"] for r in rows if r.get("status", "accepted") == "accepted"
    ]
    out = {
        "coverage": len(accepted) / len(rows),
        "accepted_accuracy": float(np.mean(accepted)) if accepted else float("nan"),
        "coverage_curve": result.coverage_curve(),
        "temperature": float(info.temperature),
    }
    if info.confidence_threshold is not None:
        out["confidence_threshold"] = float(info.confidence_threshold)
    wanted = ("accept_target_accuracy", "target_reached")
    out.update(
        {
            key: value
            for key, value in (info.confidence_calibration or {}).items()
            if (key.startswith("val_") or key in wanted) and value is not None
        }
    )
    return out


def _anomaly_metrics(rows: list[dict], good: str, info) -> dict:
    """With an anomaly head: the false-alarm rate on good images, the AUROC of the anomaly
    score and of the combined decision score (`defectflow.inference.anomaly_score.decision_score`), how many
    answers were UNKNOWN_DEFECT, and the known-type figures of the classifier alone on the
    same images (`classifier_only`), so the cost of the anomaly score is visible. {} without."""
    if info.anomaly_threshold is None or not rows or "anomaly_score" not in rows[0]:
        return {}
    defect = np.array([r["true"] != good for r in rows])
    scores = np.array([r["anomaly_score"] for r in rows])
    combined = decision_score(
        [r["p_defect"] for r in rows], scores, info.defect_threshold, info.anomaly_threshold
    )
    flagged = np.array([r["predicted"] != good for r in rows])
    flagged_alone = np.array([r["classifier_predicted"] != good for r in rows])
    known = [i for i, r in enumerate(rows) if r["true"] != good]

    def false_alarms(flags):
        return float(flags[~defect].mean()) if (~defect).any() else float("nan")

    classifier_only = {
        "accuracy": float(np.mean([r["classifier_predicted"] == r["true"] for r in rows])),
        "presence_accuracy": float(np.mean(flagged_alone == defect)),
        "defect_accuracy": float(
            np.mean([rows[i]["classifier_predicted"] == rows[i]["true"] for i in known])
        )
        if known
        else float("nan"),
        "defect_dice": float(np.mean([rows[i]["classifier_dice"] for i in known]))
        if known
        else float("nan"),
        "false_alarm_rate": false_alarms(flagged_alone),
    }
    return {
        "anomaly_threshold": float(info.anomaly_threshold),
        "anomaly_auroc": auroc(defect, scores),
        "detection_auroc": auroc(defect, combined),
        "false_alarm_rate": false_alarms(flagged),
        "unknown_defect_answers": int(sum(r["predicted"] == UNKNOWN_DEFECT for r in rows)),
        "classifier_only": classifier_only,
    }


def evaluate_model_dir(
    model_dir: Path, samples: list[Sample], out_dir: Path, batch_size: int = 8, plot_count: int = 12
) -> Evaluation:
    """Evaluate the model in `model_dir` on `samples`; figures and plots into `out_dir`, and the
    metrics beside the model too (metrics.json), so they travel with it."""
    result = evaluate(
        Predictor.load(model_dir), samples, batch_size, plot_dir=out_dir, plot_count=plot_count
    )
    result.save(out_dir)
    (Path(model_dir) / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2))
    return result


def _plots(result: Evaluation, tiles, plot_dir: Path) -> None:
    save_rgb(
        confusion_matrix_image(result.metrics["confusion_matrix"], result.metrics["classes"]),
        plot_dir / "confusion_matrix.png",
    )
    save_rgb(
        reliability_diagram_image(
            result.reliability(), result.metrics["expected_calibration_error"]
        ),
        plot_dir / "reliability.png",
    )
    save_rgb(
        coverage_curve_image(
            result.metrics["coverage_curve"],
            result.metrics.get("confidence_threshold"),
            result.metrics.get("accept_target_accuracy"),
        ),
        plot_dir / "coverage.png",
    )
    # Mistakes first: that is what a person reviewing a model wants to see.
    tiles = sorted(tiles, key=lambda t: (t[1]["true"] == t[1]["predicted"], t[1]["dice"]))
    captions = [
        [f"true {r['true']}", f"pred {r['predicted']}", f"dice {r['dice']:.2f}"] for _, r in tiles
    ]
    if tiles:
        save_rgb(image_grid([t for t, _ in tiles], captions), plot_dir / "predictions.png")
    worst = result.worst_cases()
    if worst:
        save_rgb(error_analysis_grid(worst), plot_dir / "error_analysis.png")
