"""Which presence decision (defect or good) holds on test: the classifier's, the anomaly score's, or both.

    .venv/bin/python benchmarks/presence_signals.py RUN_DIR [RUN_DIR ...] [--out JSON]

Each RUN_DIR is a finished training run (its model/ and manifest.csv), e.g. the three runs of
`make reproduce CATEGORY=...`. The model answers its validation and test images once, in the
format it serves. Every decision below is chosen on validation only; the test split is scored:
presence accuracy, the class accuracy the decision gives (a part called defective gets its most
probable defect class, as `defectflow.inference.postprocessing.answer_indices` does), and the
test AUROC of the score the decision thresholds.

  `shipped`     the model's own policy (its temperature and thresholds, as calibration stored
                them): calibrated P(defect) above its threshold, or the anomaly
                score above its threshold (a part only the score flags is `unknown_defect`, which
                names no class: wrong for class accuracy)
  `classifier`  calibrated P(defect) above the model's threshold (the anomaly score ignored)
  `classifier_refit`  temperature and P(defect) threshold chosen again as calibration does, on
                the validation outputs of the served format (TFLite float16 by default): how
                much the threshold moves when the outputs move that little
  `classifier_half`  calibrated P(defect) above 0.5: what the temperature-scaled probability
                says, without a threshold chosen on the validation images
  `anomaly`     the anomaly score above the threshold with the best validation presence accuracy
  `logistic`    a logistic regression on (logit P(defect), log anomaly score) fitted on the
                validation images, defective above 0.5 (scikit-learn, standardised features)
  `ratio_max`   the product's combined decision score (`decision_score`: the larger of P(defect)
                and the anomaly score, each over its threshold) with both thresholds chosen
                together on validation for presence accuracy (ties: the pair nearest the model's);
                as in the product, a part only the anomaly score flags is `unknown_defect`

Prints one JSON line per run and decision, the last line the mean over runs; writes them with the
provenance to `--out` (default `benchmarks/results/presence_signals.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from coverage_signals import split_outputs  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

DECISIONS = (
    "shipped",
    "classifier",
    "classifier_refit",
    "classifier_half",
    "anomaly",
    "logistic",
    "ratio_max",
)


def _outputs(run_dir: Path, predictor, name: str):
    """(network class probabilities (N, C), anomaly scores (N,), true class indices) of split `name`."""
    (views, scores), labels = split_outputs(run_dir, predictor, name, flips=(None,))
    if scores is None:
        raise SystemExit(f"{run_dir}: the model has no anomaly head; nothing to compare")
    return views[0].astype("float64"), scores, labels


def _features(p_defect, scores):
    import numpy as np

    p = np.clip(p_defect, 1e-6, 1 - 1e-6)
    return np.column_stack([np.log(p / (1 - p)), np.log(np.maximum(scores, 1e-12))])


def _best_threshold(score, is_defect, prefer: float) -> float:
    """The threshold on `score` (defective above it) with the best presence accuracy; the
    candidates are midpoints between neighbouring scores; ties: the one nearest `prefer`."""
    import numpy as np

    values = np.unique(score)
    candidates = np.r_[values[0] - 1e-9, (values[1:] + values[:-1]) / 2, values[-1]]
    accuracy = [np.mean((score > t) == is_defect) for t in candidates]
    best = max(accuracy)
    return float(
        min(
            (t for t, a in zip(candidates, accuracy, strict=True) if a == best),
            key=lambda t: abs(t - prefer),
        )
    )


def score_run(info, val, test) -> list[dict]:
    """Each decision chosen on `val` and scored on `test` ((probs, scores, labels) each)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from defectflow.evaluation.calibration import DEFECT_GRID, calibrate_classes
    from defectflow.evaluation.metrics import auroc
    from defectflow.inference.anomaly_score import decision_score
    from defectflow.inference.postprocessing import apply_temperature

    # The model's own temperature and thresholds (chosen by calibration before export, on the
    # Keras model's validation outputs): what its evaluation and serving use.
    temperature, defect_threshold = info.temperature, info.defect_threshold
    if defect_threshold is None:
        raise SystemExit("the model has no calibrated P(defect) threshold; nothing to compare")

    def parts(split):
        probs, scores, labels = split
        calibrated = apply_temperature(probs, temperature)
        return calibrated, 1.0 - calibrated[:, 0], scores, labels

    v_cal, v_p, v_s, v_y = parts(val)
    t_cal, t_p, t_s, t_y = parts(test)
    ship_a = info.anomaly_threshold

    # Each decision: (test defective flags, test score it thresholds, names a class when flagged).
    decisions = {
        "shipped": (
            (t_p > defect_threshold) | (t_s > ship_a),
            decision_score(t_p, t_s, defect_threshold, ship_a),
            t_p > defect_threshold,
        ),
        "classifier": (t_p > defect_threshold, t_p, None),
        "classifier_half": (t_p > 0.5, t_p, None),
    }
    refit = calibrate_classes(val[0], val[2], True, None)
    refit_p = 1.0 - apply_temperature(test[0], refit["temperature"])[:, 0]
    decisions["classifier_refit"] = (refit_p > refit["defect_threshold"], refit_p, None)
    a_best = _best_threshold(v_s, v_y != 0, ship_a)
    decisions["anomaly"] = (t_s > a_best, t_s, None)
    model = make_pipeline(StandardScaler(), LogisticRegression())
    model.fit(_features(v_p, v_s), v_y != 0)
    t_lr = model.predict_proba(_features(t_p, t_s))[:, 1]
    decisions["logistic"] = (t_lr > 0.5, t_lr, None)
    pairs = [
        (float(np.mean((decision_score(v_p, v_s, t, a) > 1) == (v_y != 0))), t, a)
        for t in DEFECT_GRID
        for a in np.unique(v_s)
    ]
    best = max(p[0] for p in pairs)
    _, t_joint, a_joint = min(
        (p for p in pairs if p[0] == best),
        key=lambda p: (abs(p[1] - defect_threshold), abs(p[2] - ship_a) / ship_a),
    )
    decisions["ratio_max"] = (
        decision_score(t_p, t_s, t_joint, a_joint) > 1,
        decision_score(t_p, t_s, t_joint, a_joint),
        t_p > t_joint,
    )
    rows = []
    best_defect_class = 1 + t_cal[:, 1:].argmax(axis=1)
    for name in DECISIONS:
        flagged, score, names_class = decisions[name]
        answers = np.where(flagged, best_defect_class, 0)
        if names_class is not None:  # a part only the anomaly score flags: unknown_defect
            answers = np.where(flagged & ~names_class, -1, answers)
        rows.append(
            {
                "decision": name,
                **(
                    {"defect_threshold": refit["defect_threshold"]}
                    if name == "classifier_refit"
                    else {}
                ),
                **({"defect_threshold": defect_threshold} if name == "classifier" else {}),
                "test_presence_accuracy": float(np.mean(flagged == (t_y != 0))),
                "test_accuracy": float(np.mean(answers == t_y)),
                "test_auroc": auroc(t_y != 0, score),
                "test_false_alarms": int(np.sum(flagged & (t_y == 0))),
                "test_missed_defects": int(np.sum(~flagged & (t_y != 0))),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="finished training run folders")
    timing.add_out_option(parser, "presence_signals", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("presence_signals", argv, args)
    configure_environment()
    import numpy as np

    from defectflow.inference.predictor import Predictor

    per_run = []
    for run_dir in map(Path, args.runs):
        predictor = Predictor.load(run_dir / "model")
        val = _outputs(run_dir, predictor, "val")
        test = _outputs(run_dir, predictor, "test")
        for row in score_run(predictor.info, val, test):
            row = {"run": run_dir.name, **row}
            print(json.dumps(row), flush=True)
            per_run.append(row)

    keys = ("test_presence_accuracy", "test_accuracy", "test_auroc")
    summary = {
        name: {
            key: round(float(np.mean([r[key] for r in per_run if r["decision"] == name])), 4)
            for key in keys
        }
        for name in DECISIONS
    }
    print(json.dumps({"summary": f"mean over {len(args.runs)} runs", **summary}), flush=True)
    record.update(runs=per_run, summary=summary)
    rows = [
        timing.row(
            f"{name}: test presence accuracy / accuracy / AUROC",
            " / ".join(str(summary[name][key]) for key in keys),
        )
        for name in DECISIONS
    ]
    rows.append(timing.row("runs", ", ".join(Path(run).name for run in args.runs)))
    timing.finish(record, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
