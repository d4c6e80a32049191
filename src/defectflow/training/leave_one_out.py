"""Leave one defect type out: is a defect type the model was never taught still caught?

For each defect type T: train on the usual split with every image of T removed (a small
budget is enough: the question is detection, not naming), fit the anomaly score on the good
training images, choose all thresholds on the validation split (still without T), then look at
every image of T (none of them was seen) and at the good test images:

* flagged: share of T's images the combined decision calls defective (the classifier says a
  defect, or the anomaly score exceeds its threshold: `unknown_defect`); also by the
  classifier alone and by the anomaly score alone;
* AUROC of good test images versus T's images, for the combined decision score
  (`defectflow.inference.anomaly_score.decision_score`), the anomaly score and the classifier's P(defect);
* false alarms: share of good test images flagged.

The same split as the training pipeline (`data.split`), so the good test images are the ones
its evaluation uses.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from defectflow.artifacts import ModelInfo
from defectflow.data.mvtec import DatasetError, Sample, class_names, scan_training_data
from defectflow.data.split import SplitSample, stratified_split
from defectflow.evaluation.calibration import calibrate_model
from defectflow.evaluation.metrics import auroc
from defectflow.inference.anomaly_score import decision_score
from defectflow.inference.postprocessing import UNKNOWN_DEFECT
from defectflow.inference.predictor import Predictor
from defectflow.inference.preprocessing import read_image
from defectflow.training.anomaly_fitting import fit_anomaly_head

log = logging.getLogger(__name__)

#: Goals of the capsule benchmark (means over the left-out types).
TARGETS = {"flagged": 0.90, "false_alarm_rate": 0.05, "auroc": 0.95}
#: Columns of the table: key, heading, what it means.
COLUMNS = (
    ("left_out", "left out", "the defect type absent from training"),
    ("n_images", "images", "its images (all splits)"),
    ("flagged", "flagged", "share flagged defective (classifier or anomaly score)"),
    ("flagged_by_classifier", "by classifier", "share the classifier alone calls a defect"),
    ("flagged_by_anomaly", "by anomaly", "share above the anomaly threshold"),
    ("auroc", "AUROC", "good test vs left-out, combined decision score"),
    ("anomaly_auroc", "anomaly AUROC", "good test vs left-out, anomaly score"),
    ("classifier_auroc", "classifier AUROC", "good test vs left-out, P(defect)"),
    ("false_alarm_rate", "false alarms", "share of good test images flagged"),
    (
        "false_alarm_rate_classifier",
        "by classifier",
        "share of good test images the classifier alone flags",
    ),
    (
        "false_alarm_rate_anomaly",
        "by anomaly",
        "share of good test images above the anomaly threshold",
    ),
)


def split_rows(cfg) -> tuple[list[SplitSample], list[str]]:
    """The pipeline's split of `cfg.data` (same seed and ratios) and the classes, good first."""
    samples = scan_training_data(cfg.data.root, cfg.data.good_class, cfg.data.incoming or None)
    split = cfg.data.split
    return stratified_split(samples, split.train, split.val, split.test, split.seed), class_names(
        samples, cfg.data.good_class
    )


def without(rows: list[SplitSample], split: str, label: str) -> list[Sample]:
    return [r.sample for r in rows if r.split == split and r.sample.label != label]


def score_images(predictor: Predictor, samples: list[Sample], batch_size: int = 8) -> list[dict]:
    """Per image, through the serving path: the answer, and each part of the decision (the
    classifier alone is the same outputs without the anomaly map, as evaluation scores it)."""
    info = predictor.info
    good = predictor.classes[0]
    rows = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [read_image(s.path) for s in chunk]
        outputs = predictor.raw_outputs(images, batch_size)
        alone = predictor.predictions(images, outputs.probabilities, outputs.masks)
        for sample, prediction, classifier in zip(
            chunk, predictor.predictions(images, *outputs), alone, strict=True
        ):
            score = prediction.anomaly_score
            rows.append(
                {
                    "path": str(sample.path),
                    "true": sample.label,
                    "predicted": prediction.label,
                    "is_defective": prediction.is_defective,
                    "p_defect": 1.0 - prediction.probabilities[good],
                    "by_classifier": classifier.label != good,
                    "anomaly_score": score,
                    "by_anomaly": bool(
                        score is not None
                        and info.anomaly_threshold is not None
                        and score > info.anomaly_threshold
                    ),
                }
            )
    return rows


def figures(
    rows: list[dict], left_out: str, good: str, defect_threshold, anomaly_threshold
) -> dict:
    """The table row of one left-out type from `score_images` rows of its images and the good test images."""
    held = [r for r in rows if r["true"] == left_out]
    goods = [r for r in rows if r["true"] == good]
    if not held or not goods:
        raise ValueError(
            f"need images of {left_out!r} and good test images, got {len(held)} and {len(goods)}"
        )
    both = goods + held
    is_defect = [r["true"] == left_out for r in both]
    p_defect = np.array([r["p_defect"] for r in both])
    scores = np.array([r["anomaly_score"] for r in both], dtype=np.float64)
    share = lambda group, key: float(np.mean([r[key] for r in group]))  # noqa: E731
    return {
        "left_out": left_out,
        "n_images": len(held),
        "n_good_test": len(goods),
        "flagged": share(held, "is_defective"),
        "flagged_by_classifier": share(held, "by_classifier"),
        "flagged_by_anomaly": share(held, "by_anomaly"),
        "unknown_defect": float(np.mean([r["predicted"] == UNKNOWN_DEFECT for r in held])),
        "auroc": auroc(
            is_defect, decision_score(p_defect, scores, defect_threshold, anomaly_threshold)
        ),
        "anomaly_auroc": auroc(is_defect, scores),
        "classifier_auroc": auroc(is_defect, p_defect),
        "false_alarm_rate": share(goods, "is_defective"),
        "false_alarm_rate_classifier": share(goods, "by_classifier"),
        "false_alarm_rate_anomaly": share(goods, "by_anomaly"),
        "answers": {
            label: sum(r["predicted"] == label for r in held)
            for label in sorted({r["predicted"] for r in held})
        },
    }


def run_left_out(
    cfg, rows: list[SplitSample], classes: list[str], left_out: str, out_dir: Path
) -> dict:
    """Train without `left_out`, fit the anomaly score, calibrate on validation, measure on
    `left_out`'s images and the good test images. Model and figures under `out_dir`."""
    from defectflow.training.train import PreparedData, save_artifact, train

    if left_out not in classes[1:]:
        raise DatasetError(
            f"{left_out!r} is not a defect type of this data set ({', '.join(classes[1:])})"
        )
    good = classes[0]
    started = time.perf_counter()
    known = [c for c in classes if c != left_out]
    data = PreparedData(without(rows, "train", left_out), without(rows, "val", left_out), known)
    log.info(
        "leave-one-out %s: training on %d images of %s",
        left_out,
        len(data.train_samples),
        ", ".join(known),
    )
    result = train(cfg, data, out_dir)
    model_dir = save_artifact(result, cfg, known, out_dir / "model")
    fit_anomaly_head(
        model_dir,
        [s for s in data.train_samples if s.label == good],
        cfg.anomaly.bank_size,
        cfg.anomaly.projection_dims,
        cfg.anomaly.seed,
        cfg.train.batch_size,
    )
    calibrate_model(
        model_dir,
        data.val_samples,
        cfg.train.batch_size,
        out_dir / "calibration.json",
        cfg.eval.temperature_scaling,
        cfg.eval.accept_target_accuracy,
        cfg.anomaly.false_alarm_rate,
        cfg.eval.anomaly_agreement,
    )
    predictor = Predictor.load(model_dir)
    measured = [
        r.sample
        for r in rows
        if r.sample.label == left_out or (r.split == "test" and r.sample.label == good)
    ]
    per_image = score_images(predictor, measured, cfg.train.batch_size)
    (out_dir / "per_image.json").write_text(json.dumps(per_image, indent=1))
    row = figures(
        per_image, left_out, good, predictor.info.defect_threshold, predictor.info.anomaly_threshold
    )
    row.update(
        train_seconds=round(result.seconds, 1),
        seconds=round(time.perf_counter() - started, 1),
        anomaly_threshold=predictor.info.anomaly_threshold,
    )
    (out_dir / "figures.json").write_text(json.dumps(row, indent=2))
    log.info(
        "leave-one-out %s: flagged %.3f (classifier %.3f, anomaly %.3f), AUROC %.3f, false alarms %.3f",
        left_out,
        row["flagged"],
        row["flagged_by_classifier"],
        row["flagged_by_anomaly"],
        row["auroc"],
        row["false_alarm_rate"],
    )
    return row


def summarize(table: list[dict]) -> dict:
    """Means over the left-out types, and whether each target is met."""
    keys = [key for key, _, _ in COLUMNS if key not in ("left_out", "n_images")]
    mean = {key: float(np.mean([row[key] for row in table])) for key in keys}
    met = {
        "flagged": mean["flagged"] >= TARGETS["flagged"],
        "false_alarm_rate": mean["false_alarm_rate"] <= TARGETS["false_alarm_rate"],
        "auroc": mean["auroc"] >= TARGETS["auroc"],
    }
    return {"types": table, "mean": mean, "targets": TARGETS, "met": met}


def markdown(summary: dict) -> str:
    head = [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in [
        *summary["types"],
        {
            "left_out": "**mean**",
            "n_images": sum(r["n_images"] for r in summary["types"]),
            **summary["mean"],
        },
    ]:
        cells = [
            str(row[key]) if key in ("left_out", "n_images") else f"{row[key]:.3f}"
            for key, _, _ in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    met, targets = summary["met"], summary["targets"]
    lines += [
        "",
        f"Targets (means): flagged ≥ {targets['flagged']:.2f} ({'met' if met['flagged'] else 'NOT met'}), "
        f"false alarms ≤ {targets['false_alarm_rate']:.2f} ({'met' if met['false_alarm_rate'] else 'NOT met'}), "
        f"AUROC ≥ {targets['auroc']:.2f} ({'met' if met['auroc'] else 'NOT met'}).",
        "",
        *[f"- **{title}**: {text}" for _, title, text in COLUMNS],
    ]
    return "\n".join(lines)


def chart(summary: dict) -> np.ndarray:
    """Bars per left-out type: flagged by the combined decision, the classifier alone and the
    anomaly score alone; the 0.90 target as a line (RGB uint8)."""
    from defectflow.evaluation.plots import grouped_bars_image

    types = summary["types"]
    series = {
        key.replace("_", " "): [row[key] for row in types]
        for key in ("flagged", "flagged_by_classifier", "flagged_by_anomaly")
    }
    return grouped_bars_image(
        [row["left_out"] for row in types],
        series,
        "Leave one out: share of the left-out type's images flagged",
        "share flagged",
        "defect type left out of training",
        target=TARGETS["flagged"],
        target_label="target (flagged)",
    )


def leave_one_out(cfg, out_dir: str | Path, types: list[str] | None = None) -> dict:
    """The whole evaluation: one `run_left_out` per defect type (all, or `types`), then the
    table (leave_one_out.json and .md) and its chart (leave_one_out.png) in `out_dir`.
    A type whose folder already holds its figures is not trained again (a stopped run resumes)."""
    from defectflow.evaluation.plots import save_rgb

    out_dir = Path(out_dir)
    rows, classes = split_rows(cfg)
    chosen = types or classes[1:]
    unknown = sorted(set(chosen) - set(classes[1:]))
    if unknown:
        raise DatasetError(
            f"unknown defect types {unknown}: this data set has {', '.join(classes[1:])}"
        )
    table = []
    for left_out in chosen:
        done = out_dir / left_out / "figures.json"
        if done.exists():
            log.info(
                "leave-one-out %s: measured already, figures from %s",
                left_out,
                done.parent / "per_image.json",
            )
            info = ModelInfo.load(done.parent / "model")
            per_image = json.loads((done.parent / "per_image.json").read_text())
            table.append(
                {
                    **json.loads(done.read_text()),
                    **figures(
                        per_image,
                        left_out,
                        classes[0],
                        info.defect_threshold,
                        info.anomaly_threshold,
                    ),
                }
            )
            continue
        table.append(run_left_out(cfg, rows, classes, left_out, out_dir / left_out))
    summary = summarize(table)
    (out_dir / "leave_one_out.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "leave_one_out.md").write_text(markdown(summary) + "\n")
    save_rgb(chart(summary), out_dir / "leave_one_out.png")
    return summary
