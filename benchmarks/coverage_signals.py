"""How many answers could be accepted without a person, with other confidence signals than today's.

    .venv/bin/python benchmarks/coverage_signals.py RUN_DIR [RUN_DIR ...]
        [--targets 0.95 0.97 0.99] [--out JSON]

Each RUN_DIR is a finished training run (its model/ and manifest.csv), e.g. the three runs of
`make reproduce CATEGORY=...`. For each run the model answers its validation and test images
once as they are and once per flip (left-right, up-down, both), in the format it serves; then,
for every signal below, the temperature, the P(defect) threshold and the confidence threshold
are chosen on validation exactly as calibration does (`defectflow.evaluation.calibration`),
and the test split is scored: coverage (answers accepted), accuracy of the accepted answers,
accuracy of all answers. Nothing is chosen on test.

First the model's own decision policy on test (`shipped`: it must give the coverage its
evaluation reported, with or without `eval.anomaly_agreement`). Then the signals (the confidence an answer gets; below the threshold it
goes to a person; an UNKNOWN_DEFECT answer always goes to a person, as in the product):
  `confidence`   the calibrated probability of the class answered: what the model ships with
  `flip_mean`    the same, from the class probabilities averaged over the four views
  `anomaly_agreement`  `confidence`, but 0 when the anomaly score (above its threshold =
                 defective) disagrees with the answer's defect presence: free at serving time,
                 and what `eval.anomaly_agreement=true` ships
  `agreement`    as `anomaly_agreement`, and also 0 when the four views do not answer the same
                 class (four forward passes per image)
  `flip_mean_agreement`  both of the above

Prints one JSON line per run and signal, the last line the mean over runs; writes them with the
provenance to `--out` (default `benchmarks/results/coverage_signals.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

SIGNALS = ("confidence", "anomaly_agreement", "agreement", "flip_mean", "flip_mean_agreement")
#: The views of an image: as it is, flipped left-right, up-down, both.
FLIPS = (None, 1, 0, -1)


def _views(predictor, images, flips=FLIPS, batch_size: int = 8):
    """(probabilities per view (V, N, C), anomaly maps of the unflipped view or None)."""
    import cv2
    import numpy as np

    probs, anomaly = [], None
    for flip in flips:
        shown = images if flip is None else [cv2.flip(img, flip) for img in images]
        outputs = predictor.raw_outputs(shown, batch_size)
        probs.append(outputs.probabilities)
        if flip is None:
            anomaly = outputs.anomaly
    return np.stack(probs), anomaly


def split_outputs(run_dir: Path, predictor, name: str, flips=FLIPS):
    """((probabilities per view of `flips`, anomaly scores or None), true class indices) of split
    `name` (benchmarks/presence_signals.py reads the unflipped view alone)."""
    import numpy as np

    from defectflow.data.split import read_manifest, select
    from defectflow.inference.anomaly_score import image_scores
    from defectflow.inference.preprocessing import read_image

    samples = select(read_manifest(run_dir / "manifest.csv"), name)
    if not samples:
        raise SystemExit(f"{run_dir}: no {name} images in manifest.csv")
    labels = np.array([predictor.classes.index(s.label) for s in samples])
    views, anomaly = _views(predictor, [read_image(s.path) for s in samples], flips)
    return (views, None if anomaly is None else image_scores(anomaly)), labels


def _answers(probs, labels, temperature, defect_threshold, scores, anomaly_threshold):
    """What the product answers for network probabilities `probs` (N, C): (answer indices, the
    calibrated probability of each answer, whether it is right). An image the classifier calls
    good while its anomaly score exceeds the threshold is answered UNKNOWN_DEFECT, always sent to
    a person and never right (it names no class): confidence 0, wrong
    (`defectflow.inference.postprocessing.postprocess`)."""
    import numpy as np

    from defectflow.inference.postprocessing import answer_indices, apply_temperature

    calibrated = apply_temperature(probs, temperature)
    answers = answer_indices(calibrated, defect_threshold)
    conf = calibrated[np.arange(len(calibrated)), answers]
    right = answers == labels
    if scores is not None and anomaly_threshold is not None:
        unknown = (answers == 0) & (scores > anomaly_threshold)
        conf, right = np.where(unknown, 0.0, conf), right & ~unknown
    return answers, conf, right


def _scored(threshold: float, conf, right) -> dict:
    accepted = conf >= threshold
    return {
        "test_coverage": float(accepted.mean()),
        "test_accepted_accuracy": float(right[accepted].mean()) if accepted.any() else None,
    }


def shipped(info, test) -> dict:
    """The model's own decision policy on the test split: what its evaluation reported."""
    import numpy as np

    from defectflow.inference.postprocessing import anomaly_disagrees

    (views, scores), labels = test
    answers, conf, right = _answers(
        views[0], labels, info.temperature, info.defect_threshold, scores, info.anomaly_threshold
    )
    threshold = info.confidence_threshold if info.confidence_threshold is not None else 0.0
    if info.anomaly_agreement and scores is not None and info.anomaly_threshold is not None:
        conf = np.where(anomaly_disagrees(answers, scores, info.anomaly_threshold), -1.0, conf)
    return {
        "signal": "shipped",
        "test_accuracy": float(right.mean()),
        **_scored(threshold, conf, right),
    }


def score_signal(signal: str, val, test, anomaly_threshold, targets) -> dict:
    """Calibrate on the validation outputs as the product does, score the test outputs."""
    import numpy as np

    from defectflow.evaluation.calibration import calibrate_classes, choose_confidence_threshold
    from defectflow.inference.postprocessing import (
        anomaly_disagrees,
        answer_indices,
        apply_temperature,
    )

    flip_mean = signal.startswith("flip_mean")
    agreement = signal.endswith("agreement")
    flips_agree = agreement and signal != "anomaly_agreement"

    def network(split):
        (views, _), _ = split
        return views.mean(axis=0) if flip_mean else views[0]

    chosen = calibrate_classes(network(val), val[1], True, None)
    temperature, defect_threshold = chosen["temperature"], chosen["defect_threshold"]

    def confidences(split, override: bool = True):
        (views, scores), labels = split
        answers, conf, right = _answers(
            network(split),
            labels,
            temperature,
            defect_threshold,
            scores if override else None,
            anomaly_threshold,
        )
        if agreement:
            stable = np.ones(len(answers), bool)
            if flips_agree:
                per_view = np.stack(
                    [
                        answer_indices(apply_temperature(v, temperature), defect_threshold)
                        for v in views
                    ]
                )
                stable &= (per_view == answers).all(axis=0)
            if scores is not None and anomaly_threshold is not None:
                stable &= ~anomaly_disagrees(answers, scores, anomaly_threshold)
            conf = np.where(stable, conf, 0.0)
        return conf, right

    # The product chooses its threshold on the classifier's answers alone (calibration comes
    # before the anomaly decision); the agreement signals bring the anomaly score in on purpose.
    val_conf, val_right = confidences(val, override=agreement)
    test_conf, test_right = confidences(test)
    out = {
        "signal": signal,
        "temperature": round(float(temperature), 4),
        "defect_threshold": float(defect_threshold),
        "test_accuracy": float(test_right.mean()),
        "val_accuracy": float(val_right.mean()),
    }
    for target in targets:
        # As calibration chooses: the lowest threshold reaching the target, else the most accurate.
        point = choose_confidence_threshold(val_conf, val_right, target)
        out[f"at_{target}"] = {
            "threshold": point["threshold"],
            "val_coverage": point["coverage"],
            "target_reached_on_val": bool(point["target_reached"]),
            **_scored(point["threshold"], test_conf, test_right),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="finished training run folders")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.97, 0.99])
    timing.add_out_option(parser, "coverage_signals", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("coverage_signals", argv, args)
    configure_environment()
    import numpy as np

    from defectflow.inference.predictor import Predictor

    per_run = []
    for run_dir in map(Path, args.runs):
        predictor = Predictor.load(run_dir / "model")
        val = split_outputs(run_dir, predictor, "val")
        test = split_outputs(run_dir, predictor, "test")
        threshold = predictor.info.anomaly_threshold
        row = {"run": run_dir.name, **shipped(predictor.info, test)}
        print(json.dumps(row), flush=True)
        per_run.append(row)
        for signal in SIGNALS:
            row = {"run": run_dir.name, **score_signal(signal, val, test, threshold, args.targets)}
            print(json.dumps(row), flush=True)
            per_run.append(row)

    def mean(values):
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 4) if values else None

    shipped_rows = [r for r in per_run if r["signal"] == "shipped"]
    summary = {
        "shipped": {
            key: mean([r[key] for r in shipped_rows])
            for key in ("test_accuracy", "test_coverage", "test_accepted_accuracy")
        }
    }
    for signal in SIGNALS:
        rows = [r for r in per_run if r["signal"] == signal]
        summary[signal] = {"test_accuracy": mean([r["test_accuracy"] for r in rows])}
        for target in args.targets:
            key = f"at_{target}"
            summary[signal][key] = {
                "test_coverage": mean([r[key]["test_coverage"] for r in rows]),
                "test_accepted_accuracy": mean([r[key]["test_accepted_accuracy"] for r in rows]),
                "val_target_reached": sum(r[key]["target_reached_on_val"] for r in rows),
            }
    print(json.dumps({"summary": f"mean over {len(args.runs)} runs", **summary}), flush=True)
    record.update(runs=per_run, summary=summary)
    rows = [
        timing.row("shipped policy: test coverage", summary["shipped"]["test_coverage"]),
        timing.row(
            "shipped policy: accuracy of the accepted answers",
            summary["shipped"]["test_accepted_accuracy"],
        ),
    ]
    for signal in SIGNALS:
        for target in args.targets:
            point = summary[signal][f"at_{target}"]
            rows.append(
                timing.row(
                    f"{signal} at {target}: test coverage / accuracy of the accepted",
                    f"{point['test_coverage']} / {point['test_accepted_accuracy']}",
                )
            )
    rows.append(timing.row("runs", ", ".join(Path(run).name for run in args.runs)))
    timing.finish(record, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
