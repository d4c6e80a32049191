"""Every evaluation figure defectflow reports, defined once.

Class figures: overall accuracy, defect-only accuracy (images whose true class is a defect),
defect-presence accuracy (good vs any defect), image AUROC of P(defect) = 1 - P(good),
per-class precision/recall/F1 and the confusion matrix (scikit-learn).

Mask figures, per image, then averaged overall and over defect images only:
Dice and IoU, soft (probabilities against the area-averaged target at model resolution) and
thresholded (binary mask against the ground truth at the image's own resolution).
Rule for an image whose true and predicted masks are both empty: Dice = IoU = 1. The
defect-only means never meet that case, since every defect image has a non-empty mask.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def dice(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    t, p = y_true.astype(np.float64).ravel(), y_pred.astype(np.float64).ravel()
    total = t.sum() + p.sum()
    return 1.0 if total == 0 else float(2.0 * (t * p).sum() / total)


def iou(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    t, p = y_true.astype(np.float64).ravel(), y_pred.astype(np.float64).ravel()
    inter = (t * p).sum()
    union = t.sum() + p.sum() - inter
    return 1.0 if union == 0 else float(inter / union)


def auroc(is_defect, score) -> float:
    """Image AUROC of `score` for telling defect images from good ones; NaN without both kinds."""
    is_defect = np.asarray(is_defect, dtype=bool)
    return (
        float(roc_auc_score(is_defect, score))
        if 0 < is_defect.sum() < len(is_defect)
        else float("nan")
    )


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, p_defect: np.ndarray, classes: list[str]
) -> dict:
    """Class indices (0 = good) and P(defect) per image to the class figures."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    defect = y_true != 0
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "presence_accuracy": float(accuracy_score(defect, y_pred != 0)),
        "defect_accuracy": float(accuracy_score(y_true[defect], y_pred[defect]))
        if defect.any()
        else float("nan"),
        "auroc": auroc(defect, p_defect),
        "n_images": int(len(y_true)),
        "n_defect_images": int(defect.sum()),
    }
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    out["per_class"] = {
        c: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(classes)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def segmentation_metrics(per_image: list[dict], defect: np.ndarray) -> dict:
    """Per-image dicts with dice, iou, soft_dice, soft_iou to overall and defect-only means."""
    out = {}
    defect = np.asarray(defect, dtype=bool)
    for key in ("dice", "iou", "soft_dice", "soft_iou"):
        values = np.array([row[key] for row in per_image], dtype=np.float64)
        out[key] = float(values.mean()) if len(values) else float("nan")
        out[f"defect_{key}"] = float(values[defect].mean()) if defect.any() else float("nan")
    return out


def reliability_bins(confidence, correct, n_bins: int = 10) -> list[dict]:
    """Top-label calibration in `n_bins` equal-width confidence bins over [0, 1].

    `confidence`: the probability the model gave the class it answered, per image; `correct`:
    whether that answer was right. Bin i holds confidences in [i/n, (i+1)/n), the last bin also
    1.0. Each bin: lower, upper, count, confidence (mean), accuracy (NaN for an empty bin).
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != hit.shape:
        raise ValueError(f"{conf.size} confidences but {hit.size} correctness flags")
    if ((conf < 0) | (conf > 1)).any():
        raise ValueError("confidences must lie in [0, 1]")
    index = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    bins = []
    for i in range(n_bins):
        members = index == i
        count = int(members.sum())
        bins.append(
            {
                "lower": i / n_bins,
                "upper": (i + 1) / n_bins,
                "count": count,
                "confidence": float(conf[members].mean()) if count else float("nan"),
                "accuracy": float(hit[members].mean()) if count else float("nan"),
            }
        )
    return bins


def expected_calibration_error(bins: list[dict]) -> float:
    """ECE from `reliability_bins`: the count-weighted mean |accuracy - confidence| (NaN if no images)."""
    total = sum(b["count"] for b in bins)
    if total == 0:
        return float("nan")
    return float(
        sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    )
