"""What the anomaly head adds to a prediction: forward pass with and without it, both formats.

    .venv/bin/python benchmarks/anomaly_cost.py [--model-dir PATH] [--input-size 256]
        [--bank-size 1000] [--projection-dims 0] [--repeats 60] [--warmup 5] [--out JSON]

`--model-dir`: a trained model folder with an anomaly head (its model.keras); default: the
serving architecture (`build_model("lite0", input_size, 6)`, ImageNet encoder) with a head
fitted on 40 synthetic good capsules with `--bank-size` and `--projection-dims` (the cost
depends on the bank's shape, not on what it holds).

The same network is timed twice: with the anomaly output, and as the classifier alone (the
same layers and weights, outputs class and mask only). Both run as Keras
(`predict_on_batch`) and as TFLite (float16, as exported for serving, through
`TFLiteBackend`), at batch 1 on an image already at input size; the variants take turns within
each repeat, so a load change on the shared machine affects both alike. Then the
post-processing (`Predictor.predictions` on a 512x512 image) with and without the anomaly map.

Prints JSON lines, the last one the summary: extra cost = (median with − median without) /
median without, per format, against the goal of at most 20 %. Writes the figures, the goals and
the provenance (machine, date, commit, load) to `--out` (default
`benchmarks/results/anomaly_cost.json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from timing import take_turns  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

GOAL = 0.20


def _print(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def _summary(ms: list[float]) -> dict:
    return {
        "n": len(ms),
        "min_ms": round(min(ms), 2),
        "median_ms": round(statistics.median(ms), 2),
        "max_ms": round(max(ms), 2),
    }


def _take_turns(calls: dict, repeats: int, warmup: int) -> dict[str, dict]:
    return {name: _summary(ms) for name, ms in take_turns(calls, repeats, warmup).items()}


def _models(args, work: Path):
    """(model with the anomaly head, the same without it, description)."""
    import keras
    import numpy as np

    from defectflow.models.anomaly_head import PatchDistance, feature_extractor, with_anomaly_head

    if args.model_dir:
        from defectflow.inference.predictor import (
            KerasBackend,  # registers defectflow's layers while loading
        )

        model = KerasBackend(Path(args.model_dir) / "model.keras").model
        about = str(args.model_dir)
    else:
        from defectflow.data.synthetic import render_sample
        from defectflow.inference.preprocessing import prepare_image
        from defectflow.models.unet import build_model
        from defectflow.training.anomaly_fitting import fit_memory_bank

        base = build_model("lite0", args.input_size, 6)
        rng = np.random.default_rng(0)
        goods = np.stack(
            [
                prepare_image(render_sample(rng, args.input_size, None)[0], args.input_size)
                for _ in range(40)
            ]
        )
        projection, bank = fit_memory_bank(
            feature_extractor(base).predict(goods, verbose=0), args.bank_size, args.projection_dims
        )
        model = with_anomaly_head(base, projection, bank)
        about = (
            f"lite0 U-Net at {args.input_size} px, untrained heads, bank of synthetic good capsules"
        )
    head = next(layer for layer in model.layers if isinstance(layer, PatchDistance))
    alone = keras.Model(
        model.inputs,
        {"class": model.get_layer("class").output, "mask": model.get_layer("mask").output},
        name="classifier_alone",
    )
    shape = {
        "bank_size": head.bank_size,
        "projection_dims": head.projection_dims,
        "feature_dims": head.feature_dims,
        "grid": list(model.get_layer("anomaly").output.shape[1:3]),
    }
    return model, alone, about, shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--bank-size", type=int, default=1000)
    parser.add_argument("--projection-dims", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    timing.add_out_option(parser, "anomaly_cost", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("anomaly_cost", argv, args)
    configure_environment()
    import numpy as np

    from defectflow.artifacts import ModelInfo
    from defectflow.inference.predictor import Predictor, TFLiteBackend
    from defectflow.training.export import export_tflite

    with tempfile.TemporaryDirectory(prefix="defectflow-anomaly-bench-") as tmp:
        work = Path(tmp)
        model, alone, about, shape = _models(args, work)
        size = int(model.inputs[0].shape[1])
        record["model"] = _print({"model": about, "input_size": size, **shape})
        image = np.random.default_rng(1).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
        calls = {
            "keras_classifier": lambda: alone.predict_on_batch(image),
            "keras_with_anomaly": lambda: model.predict_on_batch(image),
        }
        for name, variant in (("classifier", alone), ("with_anomaly", model)):
            folder = work / name
            folder.mkdir()
            variant.save(folder / "model.keras")
            backend = TFLiteBackend(export_tflite(folder, "float16"))
            calls[f"tflite_{name}"] = lambda b=backend: b(image)
        forward = _take_turns(calls, args.repeats, args.warmup)
        for name, row in forward.items():
            _print({"forward_batch1": name, **row})

        # Post-processing on a 512x512 image: resize the mask (and the anomaly map) to it.
        outputs = {k: np.asarray(v) for k, v in model.predict_on_batch(image).items()}
        info = ModelInfo(
            classes=["good", "crack", "faulty_imprint", "poke", "scratch", "squeeze"],
            input_size=size,
            mask_threshold=0.5,
            anomaly_threshold=float(outputs["anomaly"].max()) + 1.0,
            anomaly=shape,
        )
        predictor = Predictor(None, info)
        full = [np.zeros((512, 512, 3), np.uint8)]
        post = _take_turns(
            {
                "postprocess_classifier": lambda: predictor.predictions(
                    full, outputs["class"], outputs["mask"]
                ),
                "postprocess_with_anomaly": lambda: predictor.predictions(
                    full, outputs["class"], outputs["mask"], outputs["anomaly"]
                ),
            },
            args.repeats,
            args.warmup,
        )
        for name, row in post.items():
            _print({"postprocess": name, **row})

    def extra(without: str, with_: str, table: dict) -> float:
        return round(
            (table[with_]["median_ms"] - table[without]["median_ms"]) / table[without]["median_ms"],
            4,
        )

    summary = {
        "summary": "extra cost of the anomaly head (median, batch 1)",
        "goal": GOAL,
        "keras_forward": extra("keras_classifier", "keras_with_anomaly", forward),
        "tflite_forward": extra("tflite_classifier", "tflite_with_anomaly", forward),
        "postprocess_extra_ms": round(
            post["postprocess_with_anomaly"]["median_ms"]
            - post["postprocess_classifier"]["median_ms"],
            2,
        ),
    }
    summary["met"] = {
        "keras": summary["keras_forward"] <= GOAL,
        "tflite": summary["tflite_forward"] <= GOAL,
    }
    _print(summary)
    record.update(forward_batch1=forward, postprocess=post, summary=summary)
    rows = [
        timing.row(
            f"anomaly head's extra forward time, {fmt} (%)",
            round(100 * summary[f"{fmt.lower()}_forward"], 1),
            f"<= {100 * GOAL:g}",
            summary["met"][fmt.lower()],
        )
        for fmt in ("Keras", "TFLite")
    ]
    for name, label in (
        ("keras_classifier", "Keras, classifier alone"),
        ("keras_with_anomaly", "Keras, with the anomaly head"),
        ("tflite_classifier", "TFLite float16, classifier alone"),
        ("tflite_with_anomaly", "TFLite float16, with the anomaly head"),
    ):
        rows.append(
            timing.row(f"forward batch 1, {label}, median (ms)", forward[name]["median_ms"])
        )
    rows += [
        timing.row(
            "post-processing of the anomaly map, 512x512 (extra ms)",
            summary["postprocess_extra_ms"],
        ),
        timing.row(
            "memory bank (patches x dims)",
            f"{shape['bank_size']} x {shape['projection_dims'] or shape['feature_dims']}",
        ),
    ]
    timing.finish(record, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
