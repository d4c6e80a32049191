"""Which format serves a trained model: Keras or its TensorFlow Lite export (per quantization).

    .venv/bin/python benchmarks/serving_format.py [MODEL_DIR] [--manifest CSV]
        [--quantizations dynamic float16 none] [--repeats 100] [--batch-repeats 10] [--warmup 5]
        [--out JSON]

MODEL_DIR: a trained model folder (default: `$DEFECTFLOW_HOME/runs/capsule-seed44/model`, the
seed-44 capsule run, when present). Its split is `--manifest` (default: the run's
`manifest.csv` beside the model folder); parity uses its test split. The model folder is copied
to a temporary folder first and only the copy is touched: its `model.keras` is re-saved without
optimizer state (as `save_artifact` writes it), then exported once per quantization.

Per format (keras; tflite-<quantization>), through `Predictor` (`raw_outputs`: resize to the
model input + forward pass):
- artifact size in MB (10^6 bytes) and load time (TensorFlow already imported) plus first call;
- batch-1 latency, ms p50 / p99 / min / max over `--repeats` calls after `--warmup`, the formats
  taking turns within each repeat (alternating order) so load changes on a shared machine hit
  them alike, each call on the next test image;
- throughput at batch 8 and 16 (images/s from the median of `--batch-repeats` calls); for
  TFLite both ways of running a batch: one invocation per image (what `TFLiteBackend` does by
  default) and one invocation for the whole batch (input tensor resized), plus the cost of a
  batch-size change in the latter (a batch-8 call right after a batch-1 call);
- parity with the Keras model on the test split (`defectflow.training.export.compare_predictors`): class
  agreement, mean thresholded Dice (all images and defect images) of each, the differences.

Headline: what `export.serve=auto` serves for each export (TFLite when it passed parity, i.e.
class agreement >= 0.99 and |ΔDice| < 0.01, and is faster than Keras at batch 1: the rule of
`defectflow.training.export.choose_serving_format`), and for the quantization configs/default.yaml
configures; the batch-1 speed-up over Keras; goals: TFLite artifact <= 15 MB, parity passed. Prints
JSON lines and a table, writes all figures, the goals and the provenance (machine, date, commit,
load) to `--out` (default `benchmarks/results/serving_format.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

GOAL_SIZE_MB = 15.0
BATCHES = (8, 16)


def _print(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def _stats(ms: list[float]) -> dict:
    import numpy as np

    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "min_ms": round(min(ms), 2),
        "max_ms": round(max(ms), 2),
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _take_turns(calls: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """ms per call of each named `calls[name](i)`, the names alternating order every repeat."""
    for fn in calls.values():
        for i in range(warmup):
            fn(i)
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(_timed(lambda name=name, i=i: calls[name](i)))
    return times


def _work_copy(model_dir: Path, work: Path) -> dict:
    """Copy the model folder and re-save its model.keras without optimizer state."""
    import keras

    import defectflow.models.losses  # noqa: F401  (custom objects model.keras names)
    import defectflow.models.unet  # noqa: F401

    shutil.copytree(model_dir, work)
    original = (work / "model.keras").stat().st_size / 1e6
    # Loading without compiling drops the optimizer; saving then writes weights and graph only.
    keras.saving.load_model(work / "model.keras", compile=False).save(work / "model.keras")
    return {"original_keras_mb": round(original, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model_dir", type=Path, nargs="?", help="a trained model folder (default: capsule-seed44)"
    )
    parser.add_argument(
        "--manifest", type=Path, help="the split CSV (default: MODEL_DIR/../manifest.csv)"
    )
    parser.add_argument(
        "--quantizations",
        nargs="+",
        default=["dynamic", "float16", "none"],
        choices=["dynamic", "float16", "none"],
    )
    parser.add_argument(
        "--repeats", type=int, default=100, help="timed calls at batch 1 (per format)"
    )
    parser.add_argument(
        "--batch-repeats", type=int, default=10, help="timed calls at batch 8 and 16"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls of each kind first")
    timing.add_out_option(parser, "serving_format", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("serving_format", argv, args)
    home = configure_environment()
    model_dir = args.model_dir or home / "runs" / "capsule-seed44" / "model"
    if not (model_dir / "model.keras").is_file():
        sys.exit(
            f"{model_dir} has no model.keras: pass a trained model folder (e.g. RUN/model of a "
            "`defectflow train` run); the default is the capsule-seed44 run, absent here"
        )
    manifest = args.manifest or model_dir.parent / "manifest.csv"
    if not manifest.is_file():
        sys.exit(f"{manifest} not found: pass the model's split with --manifest")

    import keras
    import tensorflow as tf

    from defectflow.artifacts import TFLITE_FILE, ModelInfo
    from defectflow.config import load_config
    from defectflow.data.split import read_manifest, select
    from defectflow.inference.predictor import Predictor, TFLiteBackend
    from defectflow.inference.preprocessing import read_image
    from defectflow.training.export import (
        choose_serving_format,
        compare_predictors,
        export_tflite,
        megabytes,
    )

    samples = select(read_manifest(manifest), "test")
    if not samples:
        sys.exit(f"{manifest} has no test split")
    missing = [s.path for s in samples if not Path(s.path).is_file()]
    if missing:
        sys.exit(
            f"{len(missing)} test images of {manifest} not found, e.g. {missing[0]} (paths are relative to "
            f"the directory the run was started in; run from there)"
        )
    results: dict = {
        "model_dir": str(model_dir),
        "manifest": str(manifest),
        "cpus": os.cpu_count(),
        "load_avg_1m": timing.load_avg()[0],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "n_test_images": len(samples),
    }
    _print({"what": "setup", **results})

    with tempfile.TemporaryDirectory(prefix="defectflow-serving-format-") as tmp:
        work = Path(tmp) / "model"
        results.update(_work_copy(model_dir, work))
        _print(
            {
                "what": "keras artifact",
                "with_optimizer_state_mb": results["original_keras_mb"],
                "without_mb": megabytes(work / "model.keras"),
            }
        )
        info = ModelInfo.load(work)
        sizes = {"keras": megabytes(work / "model.keras")}
        exports = {}
        for quantization in args.quantizations:
            started = time.perf_counter()
            path = export_tflite(work, quantization).rename(work / f"model.{quantization}.tflite")
            exports[f"tflite-{quantization}"] = path
            sizes[f"tflite-{quantization}"] = megabytes(path)
            _print(
                {
                    "what": "export",
                    "quantization": quantization,
                    "size_mb": sizes[f"tflite-{quantization}"],
                    "export_s": round(time.perf_counter() - started, 1),
                }
            )
        assert not (work / TFLITE_FILE).exists()  # every export was renamed to its own file

        images = [read_image(s.path) for s in samples]
        predictors, loading = {}, {}
        for name in ["keras", *exports]:
            started = time.perf_counter()
            predictors[name] = (
                Predictor.load(work, format="keras")
                if name == "keras"
                else Predictor(TFLiteBackend(exports[name]), info)
            )
            load_s = time.perf_counter() - started
            first_ms = _timed(lambda name=name: predictors[name].raw_outputs(images[:1], 1))
            loading[name] = {"load_s": round(load_s, 2), "first_call_ms": round(first_ms, 1)}
            _print({"what": "load", "format": name, **loading[name]})

        parity = {}
        for name in exports:
            row = compare_predictors(predictors["keras"], predictors[name], samples)
            parity[name] = row
            _print(
                {
                    "what": "parity",
                    "format": name,
                    "passed": row["passed"],
                    "class_agreement": round(row["class_agreement"], 4),
                    "keras_dice": round(row["keras"]["dice"], 4),
                    "tflite_dice": round(row["tflite"]["dice"], 4),
                    "dice_difference": round(row["dice_difference"], 5),
                    "keras_defect_dice": round(row["keras"]["defect_dice"] or float("nan"), 4),
                    "tflite_defect_dice": round(row["tflite"]["defect_dice"] or float("nan"), 4),
                    "defect_dice_difference": round(row["defect_dice_difference"], 5),
                    "max_probability_difference": round(row["max_probability_difference"], 5),
                    "max_mask_probability_difference": round(
                        row["max_mask_probability_difference"], 5
                    ),
                }
            )

        n = len(images)
        batch1 = _take_turns(
            {
                name: (lambda i, p=p: p.raw_outputs([images[i % n]], 1))
                for name, p in predictors.items()
            },
            args.repeats,
            args.warmup,
        )
        latency = {name: _stats(ms) for name, ms in batch1.items()}
        for name, row in latency.items():
            _print({"what": "latency batch 1", "format": name, **row})

        # Whole-batch invocation of each export, beside the default one-invocation-per-image.
        batched = {
            f"{name} (whole batch)": Predictor(TFLiteBackend(path, per_image=False), info)
            for name, path in exports.items()
        }
        throughput = {}
        for batch in BATCHES:
            chunk = (images * (batch // n + 1))[:batch]
            calls = {
                name: (lambda i, p=p, chunk=chunk, batch=batch: p.raw_outputs(chunk, batch))
                for name, p in {**predictors, **batched}.items()
            }
            for name, ms in _take_turns(calls, args.batch_repeats, 2).items():
                row = {**_stats(ms), "images_per_s": round(batch * 1000 / statistics.median(ms), 1)}
                throughput.setdefault(name, {})[f"batch{batch}"] = row
                _print({"what": f"throughput batch {batch}", "format": name, **row})
        switch = {}
        for name, predictor in batched.items():
            ms = []
            for _ in range(5):
                predictor.raw_outputs(images[:1], 1)
                ms.append(_timed(lambda p=predictor: p.raw_outputs((images * 8)[:8], 8)))
            switch[name] = round(statistics.median(ms), 1)
            _print(
                {
                    "what": "batch-8 call right after a batch-1 call (whole batch)",
                    "format": name,
                    "median_ms": switch[name],
                }
            )

    # What `export.serve=auto` decides for each export: TFLite when it passed parity and is
    # faster at batch 1 (the serving case), by the same rule `defectflow.training.export` applies.
    configured = load_config("default").export.quantization
    decisions = {
        name: choose_serving_format(
            "auto",
            True,
            parity[name]["passed"],
            latency[name]["p50_ms"] < latency["keras"]["p50_ms"],
        )
        for name in exports
    }
    headline = {
        "what": "headline",
        "auto_serves": {name: decision for name, decision in decisions.items()},
        "configured_quantization": configured,
        "serve": decisions.get(f"tflite-{configured}", "(configured quantization not benchmarked)"),
        "batch1_speedup_vs_keras": {
            name: round(latency["keras"]["p50_ms"] / latency[name]["p50_ms"], 2) for name in exports
        },
        "goal_size": f"TFLite artifact <= {GOAL_SIZE_MB:g} MB",
        "size_result": {
            name: ("PASS" if sizes[name] <= GOAL_SIZE_MB else "FAIL") for name in exports
        },
        "goal_parity": "class agreement >= 0.99, |ΔDice| < 0.01 (all and defect images)",
        "parity_result": {name: ("PASS" if parity[name]["passed"] else "FAIL") for name in exports},
        "load_avg_1m_after": timing.load_avg()[0],
    }
    _print(headline)
    results.update(
        {
            "sizes_mb": sizes,
            "loading": loading,
            "latency_batch1": latency,
            "throughput": throughput,
            "batch_switch_ms": switch,
            "parity": parity,
            "headline": headline,
        }
    )
    _table(results, list(predictors))
    record.update(results)
    timing.finish(record, _rows(results, list(predictors)), args.out)
    return 0


def _rows(results: dict, names: list[str]) -> list[dict]:
    """The goals (per export: size, parity) and the headline figures of each format."""
    rows = []
    for name in names:
        if name == "keras":
            continue
        parity = results["parity"][name]
        rows += [
            timing.row(
                f"{name} artifact (MB)",
                results["sizes_mb"][name],
                f"<= {GOAL_SIZE_MB:g}",
                results["sizes_mb"][name] <= GOAL_SIZE_MB,
            ),
            timing.row(
                f"{name} parity with Keras: class agreement, |ΔDice|, |Δ defect Dice|",
                f"{parity['class_agreement']:.3f}, {abs(parity['dice_difference']):.5f}, "
                f"{abs(parity['defect_dice_difference']):.5f}",
                ">= 0.99, < 0.01, < 0.01",
                bool(parity["passed"]),
            ),
        ]
    rows.append(
        timing.row("keras artifact, without optimizer state (MB)", results["sizes_mb"]["keras"])
    )
    for name in names:
        latency, tput = results["latency_batch1"][name], results["throughput"][name]
        rows += [
            timing.row(
                f"{name} batch 1 p50 / p99 (ms)", f"{latency['p50_ms']} / {latency['p99_ms']}"
            ),
            timing.row(f"{name} batch 8 (images/s)", tput["batch8"]["images_per_s"]),
        ]
    for name, speedup in results["headline"]["batch1_speedup_vs_keras"].items():
        rows.append(timing.row(f"{name} batch-1 speed-up over Keras (x)", speedup))
    headline = results["headline"]
    rows += [
        timing.row("test images (parity)", results["n_test_images"]),
        timing.row(
            f"export.serve=auto with quantization {headline['configured_quantization']} serves",
            headline["serve"],
        ),
    ]
    return rows


def _table(results: dict, names: list[str]) -> None:
    header = (
        f"{'format':<16} {'MB':>6} {'load s':>7} {'b1 p50':>7} {'b1 p99':>7} {'img/s b8':>9} {'img/s b16':>9}"
        f" {'agree':>6} {'Dice':>7} {'|ΔDice|':>8} {'defDice':>7} {'|ΔdefD|':>8}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name in names:
        latency, tput = results["latency_batch1"][name], results["throughput"][name]
        parity = results["parity"].get(name)
        dice = (
            parity["tflite"]
            if parity
            else next(iter(results["parity"].values()), {}).get("keras", {})
        )
        cells = (
            f"{name:<16} {results['sizes_mb'][name]:>6.2f} {results['loading'][name]['load_s']:>7.2f}"
            f" {latency['p50_ms']:>7.1f} {latency['p99_ms']:>7.1f} {tput['batch8']['images_per_s']:>9.1f}"
            f" {tput['batch16']['images_per_s']:>9.1f}"
        )
        if parity:
            cells += (
                f" {parity['class_agreement']:>6.3f} {dice['dice']:>7.4f} {parity['dice_difference']:>8.5f}"
                f" {dice['defect_dice'] or float('nan'):>7.4f} {parity['defect_dice_difference']:>8.5f}"
            )
        elif dice:
            cells += f" {'-':>6} {dice['dice']:>7.4f} {'-':>8} {dice['defect_dice'] or float('nan'):>7.4f} {'-':>8}"
        print(cells)
    for name, by_batch in results["throughput"].items():
        if name.endswith("(whole batch)"):
            print(
                f"{name:<32} img/s b8 {by_batch['batch8']['images_per_s']:.1f}, b16 "
                f"{by_batch['batch16']['images_per_s']:.1f}; batch-8 call after a batch-1 call "
                f"{results['batch_switch_ms'][name]:.0f} ms"
            )
    headline = results["headline"]
    print(
        f"\nexport.serve=auto with export.quantization={headline['configured_quantization']} "
        f"(configs/default.yaml) serves: {headline['serve']}"
    )


if __name__ == "__main__":
    sys.exit(main())
