"""The compact inference artifact: TensorFlow Lite export, parity with Keras, serving format.

`export_tflite` converts a model folder's `model.keras` to `model.tflite` beside it (through a
SavedModel, the converter path Keras 3 supports; built-in TFLite ops only, so the plain
interpreter runs it), with `export.quantization`:

- `dynamic`: int8 weights, float activations (smallest);
- `float16`: float16 weights, computed in float32 (XNNPACK expands them at load);
- `none`: float32.

`check_parity` runs the Keras model and the export over the same samples (the test split)
through `Predictor`, so through the one post-processing path with the model's own thresholds,
and compares the answers: class agreement, and the thresholded Dice of each against the
ground-truth masks (as `defectflow.evaluation.evaluate` computes it), over all images and over defect
images. `export_compact` does both, times both formats on one image, and records in model.json
which format serving loads (`choose_serving_format`).

Measured on the 256-px capsule model (lite0 U-Net of runs/capsule-seed44, its 51 test images,
15 of them defective; 2 CPU cores, otherwise idle; TF 2.21; `benchmarks/serving_format.py`):

    format          MB     batch 1 p50 / p99 ms   images/s b8 / b16   class agreement   |ΔDice| / |Δdefect Dice|
    keras           18.8   21.1 / 30.8            80 / 80             -                 -
    tflite dynamic   4.9    9.1 / 20.6            114 / 114           1.000             0.0007 / 0.0025
    tflite float16   9.0    9.0 / 15.4            113 / 113           1.000             0.00001 / 0.00004
    tflite none     17.9    8.9 / 15.3            114 / 112           1.000             0 / 0

(Keras with the optimizer state, as training used to save it: 54.4 MB. Load: Keras 0.6 s and
0.75 s for the first call; TFLite instant and 31-39 ms.) TFLite is 2.3x faster at batch 1 and
1.4x at batch 8 and 16 with every quantization, at equal quality, so `auto` serves TFLite. It
is still decided per model from data: `export_compact` times both formats again on the
exported model and keeps Keras when TFLite is not faster or fails parity.

float16 is the default quantization: as fast as dynamic-range int8 when the machine is idle,
faster when it is not (one busy process competing for the 2 cores: p50 15 vs 22 ms), with a far
smaller deviation from Keras (max |Δ class probability| 0.0014 vs 0.013, max |Δ mask
probability| 0.03 vs 0.30; at the calibrated mask threshold of 0.05 the latter moves defect
Dice by 0.0025 on 15 images, a quarter of the 0.01 allowed), and 9.0 MB, within the 15 MB goal.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from defectflow.artifacts import MODEL_FILE, TFLITE_FILE, ModelInfo
from defectflow.data.mvtec import Sample
from defectflow.evaluation.metrics import dice
from defectflow.files import atomic_write
from defectflow.inference.anomaly_score import image_scores
from defectflow.inference.predictor import Predictor
from defectflow.inference.preprocessing import read_image, read_mask

log = logging.getLogger(__name__)

QUANTIZATIONS = ("dynamic", "float16", "none")
SERVE_CHOICES = ("auto", "keras", "tflite")


def megabytes(path: Path) -> float:
    return round(Path(path).stat().st_size / 1e6, 3)


def export_tflite(model_dir: str | Path, quantization: str = "float16") -> Path:
    """`model_dir`/model.keras to `model_dir`/model.tflite with `quantization`; returns its path."""
    import tensorflow as tf

    from defectflow.inference.predictor import KerasBackend

    model_dir = Path(model_dir)
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"unknown quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}"
        )
    if not (model_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} has no {MODEL_FILE} to export")
    model = KerasBackend(model_dir / MODEL_FILE).model
    with tempfile.TemporaryDirectory(prefix="defectflow-export-") as saved_model:
        # The SavedModel's serving signature keeps the output dict's keys ("class", "mask") as
        # the TFLite signature's output names, which TFLiteBackend maps them back by.
        model.export(saved_model, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        if quantization != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        flatbuffer = converter.convert()
    path = model_dir / TFLITE_FILE
    atomic_write(path, flatbuffer)  # a reader never sees half a file
    log.info("exported %s (%s quantization, %.2f MB)", path, quantization, megabytes(path))
    return path


def check_parity(
    model_dir: str | Path,
    samples: list[Sample],
    min_class_agreement: float = 0.99,
    max_dice_difference: float = 0.01,
    batch_size: int = 8,
) -> dict:
    """The Keras model and its TFLite export on `samples`, compared; JSON-able.

    Passes when the predicted classes agree on at least `min_class_agreement` of the images
    and the mean thresholded Dice against the ground truth differs by less than
    `max_dice_difference`, both over all images and over the defect images.
    """
    model_dir = Path(model_dir)
    parity = compare_predictors(
        Predictor.load(model_dir, format="keras"),
        Predictor.load(model_dir, format="tflite"),
        samples,
        min_class_agreement,
        max_dice_difference,
        batch_size,
    )
    parity["sizes_mb"] = {
        "keras": megabytes(model_dir / MODEL_FILE),
        "tflite": megabytes(model_dir / TFLITE_FILE),
    }
    return parity


def compare_predictors(
    keras_predictor: Predictor,
    tflite_predictor: Predictor,
    samples: list[Sample],
    min_class_agreement: float = 0.99,
    max_dice_difference: float = 0.01,
    batch_size: int = 8,
) -> dict:
    """`check_parity` of two loaded predictors (without the file sizes)."""
    if not samples:
        raise ValueError("parity needs samples: the sample list is empty")
    predictors = {"keras": keras_predictor, "tflite": tflite_predictor}
    good = predictors["keras"].classes[0]
    labels: dict[str, list[str]] = {name: [] for name in predictors}
    dices: dict[str, list[float]] = {name: [] for name in predictors}
    defect, paths = [], []
    max_prob_diff = max_mask_diff = max_anomaly_diff = 0.0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [read_image(s.path) for s in chunk]
        truths = [
            read_mask(s.mask_path) if s.mask_path else np.zeros(img.shape[:2], np.uint8)
            for s, img in zip(chunk, images, strict=True)
        ]
        outputs = {name: p.raw_outputs(images, batch_size) for name, p in predictors.items()}
        max_prob_diff = max(
            max_prob_diff, float(np.abs(outputs["keras"][0] - outputs["tflite"][0]).max())
        )
        max_mask_diff = max(
            max_mask_diff, float(np.abs(outputs["keras"][1] - outputs["tflite"][1]).max())
        )
        if outputs["keras"].anomaly is not None and outputs["tflite"].anomaly is not None:
            max_anomaly_diff = max(
                max_anomaly_diff,
                float(
                    np.abs(
                        image_scores(outputs["keras"].anomaly)
                        - image_scores(outputs["tflite"].anomaly)
                    ).max()
                ),
            )
        for name, predictor in predictors.items():
            predictions = predictor.predictions(images, *outputs[name])
            labels[name] += [pred.label for pred in predictions]
            dices[name] += [
                dice(truth, pred.mask) for truth, pred in zip(truths, predictions, strict=True)
            ]
        defect += [s.label != good for s in chunk]
        paths += [str(s.path) for s in chunk]
    agree = [k == t for k, t in zip(labels["keras"], labels["tflite"], strict=True)]
    defect_mask = np.array(defect)
    figures = {
        name: {
            "dice": float(np.mean(values)),
            "defect_dice": float(np.mean(np.array(values)[defect_mask]))
            if defect_mask.any()
            else None,
        }
        for name, values in dices.items()
    }
    dice_difference = abs(figures["keras"]["dice"] - figures["tflite"]["dice"])
    defect_dice_difference = (
        abs(figures["keras"]["defect_dice"] - figures["tflite"]["defect_dice"])
        if defect_mask.any()
        else 0.0
    )
    class_agreement = float(np.mean(agree))
    return {
        "n_images": len(samples),
        "n_defect_images": int(defect_mask.sum()),
        "class_agreement": class_agreement,
        "disagreements": [
            {"path": p, "keras": k, "tflite": t}
            for p, k, t, same in zip(paths, labels["keras"], labels["tflite"], agree, strict=True)
            if not same
        ],
        "keras": figures["keras"],
        "tflite": figures["tflite"],
        "dice_difference": dice_difference,
        "defect_dice_difference": defect_dice_difference,
        "max_probability_difference": max_prob_diff,
        "max_mask_probability_difference": max_mask_diff,
        # Of the image anomaly scores (0 without an anomaly head): the float16 bank moves them a little.
        "max_anomaly_score_difference": max_anomaly_diff,
        "limits": {
            "min_class_agreement": min_class_agreement,
            "max_dice_difference": max_dice_difference,
        },
        "passed": bool(
            class_agreement >= min_class_agreement
            and dice_difference < max_dice_difference
            and defect_dice_difference < max_dice_difference
        ),
    }


def time_formats(
    predictors: dict[str, Predictor], image: np.ndarray, repeats: int = 20, warmup: int = 3
) -> dict[str, dict]:
    """Batch-1 latency of `raw_outputs([image])` per predictor, in ms (p50, p99, min, max).

    The predictors take turns within each repeat (order alternating), so a load change on a
    shared machine affects them alike.
    """
    for predictor in predictors.values():
        for _ in range(warmup):
            predictor.raw_outputs([image], 1)
    times: dict[str, list[float]] = {name: [] for name in predictors}
    names = list(predictors)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            predictors[name].raw_outputs([image], 1)
            times[name].append((time.perf_counter() - start) * 1000)
    return {
        name: {
            "n": len(ms),
            "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "min_ms": round(min(ms), 2),
            "max_ms": round(max(ms), 2),
        }
        for name, ms in times.items()
    }


def choose_serving_format(
    serve: str, has_tflite: bool, parity_passed: bool = False, tflite_faster: bool = False
) -> str:
    """keras | tflite: what `Predictor.load` runs by default.

    `serve` keras or tflite is followed (tflite needs the artifact); `auto` takes TFLite only
    when it passed the parity check and is faster, since equal quality is the condition and
    speed the only reason to serve it.
    """
    if serve not in SERVE_CHOICES:
        raise ValueError(
            f"unknown export.serve {serve!r}: expected one of {', '.join(SERVE_CHOICES)}"
        )
    if serve == "keras":
        return "keras"
    if serve == "tflite":
        if not has_tflite:
            raise ValueError(
                "export.serve=tflite but there is no TFLite artifact (export.format=none?)"
            )
        return "tflite"
    return "tflite" if has_tflite and parity_passed and tflite_faster else "keras"


def export_compact(
    model_dir: str | Path,
    samples: list[Sample],
    export_cfg,
    batch_size: int = 8,
    timing_repeats: int = 20,
) -> dict:
    """Export, check parity on `samples` (the test split), time both formats and record the
    serving format and the artifact's figures in model.json. Returns a JSON-able summary."""
    model_dir = Path(model_dir)
    if not samples:
        raise ValueError("no test samples to check the export's parity on")
    if export_cfg.format != "tflite":
        raise ValueError(
            f"unknown export.format {export_cfg.format!r}: expected tflite (or none: no export)"
        )
    if export_cfg.serve not in SERVE_CHOICES:  # fail before minutes of export work, not after
        raise ValueError(
            f"unknown export.serve {export_cfg.serve!r}: expected one of {', '.join(SERVE_CHOICES)}"
        )
    started = time.perf_counter()
    path = export_tflite(model_dir, export_cfg.quantization)
    export_seconds = time.perf_counter() - started
    predictors = {name: Predictor.load(model_dir, format=name) for name in ("keras", "tflite")}
    parity = compare_predictors(
        predictors["keras"],
        predictors["tflite"],
        samples,
        export_cfg.min_class_agreement,
        export_cfg.max_dice_difference,
        batch_size,
    )
    parity["sizes_mb"] = {"keras": megabytes(model_dir / MODEL_FILE), "tflite": megabytes(path)}
    latency = time_formats(predictors, read_image(samples[0].path), repeats=timing_repeats)
    tflite_faster = latency["tflite"]["p50_ms"] < latency["keras"]["p50_ms"]
    serving_format = choose_serving_format(export_cfg.serve, True, parity["passed"], tflite_faster)
    if export_cfg.serve == "auto":
        reason = (
            "passed parity and is faster"
            if serving_format == "tflite"
            else "failed parity"
            if not parity["passed"]
            else "is not faster"
        )
        reason = f"auto: TFLite {reason}"
    else:
        reason = f"export.serve={export_cfg.serve}"
    summary = {
        "format": serving_format,
        "reason": reason,
        "tflite": {
            "file": path.name,
            "quantization": export_cfg.quantization,
            "size_mb": megabytes(path),
            "export_seconds": round(export_seconds, 1),
        },
        "keras_size_mb": megabytes(model_dir / MODEL_FILE),
        "latency_batch1": latency,
        "parity": parity,
    }
    info = ModelInfo.load(model_dir)
    info.serving_format = serving_format
    info.tflite = {
        **summary["tflite"],
        "parity_passed": parity["passed"],
        "class_agreement": parity["class_agreement"],
        "dice_difference": parity["dice_difference"],
        "defect_dice_difference": parity["defect_dice_difference"],
        "parity_images": parity["n_images"],
        "serving_reason": reason,
    }
    info.save(model_dir)
    return summary


def markdown(summary: dict) -> str:
    """The export summary as a Prefect artifact: sizes, parity, latency, the choice."""
    parity, tflite = summary["parity"], summary["tflite"]
    lines = [
        f"**Serving format: {summary['format']}** ({summary['reason']})",
        "",
        "| | Keras | TFLite |",
        "|---|---|---|",
        f"| size MB | {summary['keras_size_mb']:g} | {tflite['size_mb']:g} ({tflite['quantization']}) |",
        f"| batch-1 p50 ms | {summary['latency_batch1']['keras']['p50_ms']:.1f} "
        f"| {summary['latency_batch1']['tflite']['p50_ms']:.1f} |",
        f"| mean Dice | {parity['keras']['dice']:.4f} | {parity['tflite']['dice']:.4f} |",
    ]
    if parity["keras"]["defect_dice"] is not None:
        lines.append(
            f"| defect Dice | {parity['keras']['defect_dice']:.4f} | {parity['tflite']['defect_dice']:.4f} |"
        )
    limits = parity["limits"]
    lines += [
        "",
        f"Parity on {parity['n_images']} test images: **{'passed' if parity['passed'] else 'FAILED'}**; "
        f"class agreement {parity['class_agreement']:.4f} (≥ {limits['min_class_agreement']}), "
        f"|ΔDice| {parity['dice_difference']:.4f} and |Δdefect Dice| {parity['defect_dice_difference']:.4f} "
        f"(< {limits['max_dice_difference']}), max |Δ class probability| {parity['max_probability_difference']:.4f}.",
    ]
    return "\n".join(lines)
