"""Size and forward-pass speed of the serving model architecture (or of a trained model).

    .venv/bin/python benchmarks/model_forward.py [--input-size 256] [--model-dir PATH]
        [--repeats 100] [--batch-repeats 20] [--warmup 5] [--out JSON]

Default model: `build_model("lite0", input_size, num_classes=6, base_filters=16)`, the serving
architecture with its ImageNet encoder weights (read offline). `--model-dir` benchmarks a trained
model folder instead (its `model.keras`; the input size is the model's own).

Reports (JSON lines): parameters (total, trainable, non-trainable); the saved size of the full
model (`model.save("x.keras")`) and of the weights alone (`model.save_weights("x.weights.h5")`)
in MB (10^6 bytes); forward-pass latency in ms (p50 / p99 / min / max, and images/s) at batch 1
(`--repeats` calls) and batch 16 (`--batch-repeats` calls) for two compiled calls:
`model.predict_on_batch(x)` and `tf.function(lambda x: model(x, training=False))`. The calls
alternate within each repeat after `--warmup` calls of each (graph tracing, first allocation),
so a load change on a shared machine affects both alike. Inputs are random RGB in [0, 255].
The headline is the faster call at batch 1 (by p50), against the goal p50 <= 25 ms on 2 CPU
cores. With 20 repeats, p99 is close to the max. Writes all figures, the goal and the provenance
(machine, date, commit, load) to `--out` (default `benchmarks/results/model_forward.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from timing import take_turns  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

GOAL_P50_MS = 25.0
BATCHES = (1, 16)


def _np_percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def _print(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def _load_model(args):
    import keras

    if args.model_dir is None:
        from defectflow.models.unet import build_model

        model = build_model("lite0", args.input_size, num_classes=6, base_filters=16)
        return model, f'build_model("lite0", {args.input_size}, num_classes=6, base_filters=16)'
    # Importing these registers the custom losses, metrics and layers a saved model names.
    import defectflow.models.losses  # noqa: F401
    import defectflow.models.unet  # noqa: F401

    path = args.model_dir / "model.keras"
    if not path.is_file():
        sys.exit(f"{path} not found: --model-dir must be a trained model folder")
    return keras.models.load_model(path, compile=False), str(path)


def _sizes(model) -> dict:
    with tempfile.TemporaryDirectory(prefix="defectflow-bench-") as tmp:
        full, weights = Path(tmp) / "x.keras", Path(tmp) / "x.weights.h5"
        model.save(full)
        model.save_weights(weights)
        return {
            "keras_file_mb": round(full.stat().st_size / 1e6, 2),
            "weights_h5_mb": round(weights.stat().st_size / 1e6, 2),
        }


def _params(model) -> dict:
    def count(weights) -> int:
        return int(sum(int(w.numpy().size) for w in weights))

    trainable = count(model.trainable_weights)
    non_trainable = count(model.non_trainable_weights)
    return {
        "total": trainable + non_trainable,
        "trainable": trainable,
        "non_trainable": non_trainable,
    }


def _latency(model, input_size: int, batch: int, repeats: int, warmup: int) -> list[dict]:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(batch)
    x_np = rng.uniform(0, 255, (batch, input_size, input_size, 3)).astype("float32")
    x_tf = tf.constant(x_np)
    forward = tf.function(lambda x: model(x, training=False))
    calls = {
        "predict_on_batch": lambda: model.predict_on_batch(x_np),
        # .numpy() on every output: the call is done when the result is on the host.
        "tf.function": lambda: tf.nest.map_structure(lambda t: t.numpy(), forward(x_tf)),
    }
    times = take_turns(calls, repeats, warmup)
    rows = []
    for name, ms in times.items():
        p50 = statistics.median(ms)
        rows.append(
            _print(
                {
                    "what": f"forward {name}",
                    "batch": batch,
                    "n": len(ms),
                    "p50_ms": round(p50, 2),
                    "p99_ms": round(_np_percentile(ms, 99), 2),
                    "min_ms": round(min(ms), 2),
                    "max_ms": round(max(ms), 2),
                    "images_per_s": round(batch * 1000 / p50, 1),
                }
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input-size", type=int, default=256, help="side of the square input (built model)"
    )
    parser.add_argument(
        "--model-dir", type=Path, help="a trained model folder (model.keras) instead"
    )
    parser.add_argument("--repeats", type=int, default=100, help="timed calls at batch 1")
    parser.add_argument("--batch-repeats", type=int, default=20, help="timed calls at batch 16")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls of each kind first")
    timing.add_out_option(parser, "model_forward", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("model_forward", argv, args)
    configure_environment()

    import keras
    import tensorflow as tf

    started = time.perf_counter()
    model, source = _load_model(args)
    input_size = int(model.input_shape[1])
    _print(
        {
            "what": "setup",
            "model": source,
            "name": model.name,
            "input_size": input_size,
            "load_s": round(time.perf_counter() - started, 1),
            "cpus": os.cpu_count(),
            "load_avg_1m": timing.load_avg()[0],
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        }
    )
    record["model"] = {
        "source": source,
        "input_size": input_size,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
    params = _print({"what": "parameters", **_params(model)})
    sizes = _print({"what": "saved size", **_sizes(model)})

    repeats = {1: args.repeats, 16: args.batch_repeats}
    rows_by_batch = {
        batch: _latency(model, input_size, batch, repeats[batch], args.warmup) for batch in BATCHES
    }
    best1 = min(rows_by_batch[1], key=lambda r: r["p50_ms"])
    best16 = max(rows_by_batch[16], key=lambda r: r["images_per_s"])
    passed = best1["p50_ms"] <= GOAL_P50_MS
    headline = _print(
        {
            "what": "headline",
            "batch1_call": best1["what"].removeprefix("forward "),
            "batch1_p50_ms": best1["p50_ms"],
            "batch1_p99_ms": best1["p99_ms"],
            "batch16_call": best16["what"].removeprefix("forward "),
            "batch16_images_per_s": best16["images_per_s"],
            "goal": f"batch-1 forward p50 <= {GOAL_P50_MS:g} ms on 2 CPU cores",
            "result": "PASS" if passed else "FAIL",
            "cpus": os.cpu_count(),
            "load_avg_1m_after": timing.load_avg()[0],
        }
    )
    rows = [
        timing.row(
            f"batch-1 forward p50, {headline['batch1_call']} (ms)",
            best1["p50_ms"],
            f"<= {GOAL_P50_MS:g}",
            passed,
        ),
        timing.row(f"batch-1 forward p99, {headline['batch1_call']} (ms)", best1["p99_ms"]),
    ]
    for batch_rows in rows_by_batch.values():
        for r in batch_rows:
            call = r["what"].removeprefix("forward ")
            if r["batch"] != 1 or call != headline["batch1_call"]:
                rows.append(timing.row(f"batch-{r['batch']} forward p50, {call} (ms)", r["p50_ms"]))
            if r["batch"] != 1:
                rows.append(timing.row(f"batch-{r['batch']} {call} (images/s)", r["images_per_s"]))
    rows += [
        timing.row("parameters", params["total"]),
        timing.row("parameters, trainable", params["trainable"]),
        timing.row('model.save("x.keras") file (MB)', sizes["keras_file_mb"]),
        timing.row("weights alone, .weights.h5 (MB)", sizes["weights_h5_mb"]),
    ]
    record["latency"] = rows_by_batch
    record["parameters"], record["saved_size_mb"] = params, sizes
    timing.finish(record, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
