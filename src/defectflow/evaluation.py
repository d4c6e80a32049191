"""Evaluating a model artifact on a set of samples, through the serving code path."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectflow.data.mvtec import Sample
from defectflow.inference import METRICS_FILE, Predictor
from defectflow.metrics import classification_metrics, dice, iou, segmentation_metrics
from defectflow.plots import confusion_matrix_image, image_grid, save_rgb
from defectflow.preprocessing import overlay, prepare_mask, read_image, read_mask

HEADLINE = ("accuracy", "defect_accuracy", "presence_accuracy", "auroc", "defect_dice", "defect_iou", "dice", "iou")


@dataclass
class Evaluation:
    metrics: dict
    per_image: list[dict] = field(default_factory=list)

    def headline(self) -> dict[str, float]:
        return {k: self.metrics[k] for k in HEADLINE}

    def markdown(self) -> str:
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.headline().items()]
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for c, row in self.metrics["per_class"].items():
            lines.append(f"| {c} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
        return "\n".join(lines)

    def save(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "per_image.json").write_text(json.dumps(self.per_image, indent=1))
        path = out_dir / "metrics.json"
        path.write_text(json.dumps(self.metrics, indent=2))
        return path


def evaluate(predictor: Predictor, samples: list[Sample], batch_size: int = 8, plot_dir: Path | None = None,
             plot_count: int = 12) -> Evaluation:
    if not samples:
        raise ValueError("nothing to evaluate: the sample list is empty")
    classes = predictor.classes
    size = predictor.info.input_size
    per_image, y_true, y_pred, p_defect, tiles = [], [], [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [read_image(s.path) for s in chunk]
        for sample, image, pred in zip(chunk, images, predictor.predict_arrays(images, batch_size), strict=True):
            truth = read_mask(sample.mask_path) if sample.mask_path else np.zeros(image.shape[:2], np.uint8)
            soft_truth = prepare_mask(truth, size)[:, :, 0]
            row = {
                "path": str(sample.path),
                "true": sample.label,
                "predicted": pred.label,
                "p_defect": 1.0 - pred.probabilities[classes[0]],
                "dice": dice(truth, pred.mask),
                "iou": iou(truth, pred.mask),
                "soft_dice": dice(soft_truth, pred.mask_probability),
                "soft_iou": iou(soft_truth, pred.mask_probability),
                "true_area": float(truth.mean()),
                "predicted_area": pred.defect_area_fraction,
            }
            per_image.append(row)
            y_true.append(classes.index(sample.label))
            y_pred.append(classes.index(pred.label))
            p_defect.append(row["p_defect"])
            if plot_dir is not None and len(tiles) < plot_count:
                tiles.append((overlay(overlay(image, truth, (0, 255, 0), 0.4), pred.mask, (255, 0, 0), 0.5), row))
    y_true_a = np.array(y_true)
    metrics = classification_metrics(y_true_a, np.array(y_pred), np.array(p_defect), classes)
    metrics.update(segmentation_metrics(per_image, y_true_a != 0))
    metrics["classes"] = classes
    result = Evaluation(metrics, per_image)
    if plot_dir is not None:
        _plots(result, tiles, plot_dir)
    return result


def evaluate_model_dir(model_dir: Path, samples: list[Sample], out_dir: Path, batch_size: int = 8,
                       plot_count: int = 12) -> Evaluation:
    """Evaluate the model in `model_dir` on `samples`; figures and plots into `out_dir`, and the
    metrics beside the model too (metrics.json), so they travel with it."""
    result = evaluate(Predictor.load(model_dir), samples, batch_size, plot_dir=out_dir, plot_count=plot_count)
    result.save(out_dir)
    (Path(model_dir) / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2))
    return result


def _plots(result: Evaluation, tiles, plot_dir: Path) -> None:
    save_rgb(confusion_matrix_image(result.metrics["confusion_matrix"], result.metrics["classes"]),
             plot_dir / "confusion_matrix.png")
    # Mistakes first: that is what a person reviewing a model wants to see.
    tiles = sorted(tiles, key=lambda t: (t[1]["true"] == t[1]["predicted"], t[1]["dice"]))
    captions = [[f"true {r['true']}", f"pred {r['predicted']}", f"dice {r['dice']:.2f}"] for _, r in tiles]
    if tiles:
        save_rgb(image_grid([t for t, _ in tiles], captions), plot_dir / "predictions.png")
