"""Train-step time against tf.data input-pipeline throughput: does the pipeline starve training?

    .venv/bin/python benchmarks/training_speed.py [--input-size 256] [--batch-size 8] [--steps 20]
        [--data-root DATASET] [--pipeline-batches 50] [--warmup 3] [--out JSON]

Data: the training part of the stratified split (configs/capsule.yaml: the MVTec capsule copy
beside the repository; `--data-root` for another MVTec-layout folder). When that folder is
absent, the synthetic set of configs/default.yaml is used instead (written with
`defectflow data synth` if missing) and a reason line says so.

(a) Input pipeline: `make_dataset(train, batch_size, augment=JointAugmentation(cfg.augment),
    shuffle=True, oversample=True)`, as training builds it, iterated alone for
    `--pipeline-batches` batches after `--warmup` untimed ones (the first fills the shuffle
    buffer): batches/s and images/s.
(b) Train step: `build_model("lite0", input_size, num_classes, base_filters=16)` compiled like
    training (`compile_model(model, cfg, 1e-3)`: the config's losses and weights, no XLA, as
    on a CPU), with the encoder frozen and then
    unfrozen (`set_backbone_trainable`), `model.train_on_batch` over batches fetched from the
    pipeline beforehand (input time excluded): median / p90 / min / max ms per step and
    images/s over `--steps` steps after `--warmup` untimed ones (the first traces the graph;
    its time is printed as first_step_s).
(c) Ratio: pipeline images/s / training images/s per phase; goal >= 3, printed PASS / FAIL.
    The pipeline is timed alone: during `fit` it shares the CPU cores with the train step.
Writes the figures, the goals and the provenance (machine, date, commit, load) to `--out`
(default `benchmarks/results/training_speed.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import timing  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

RATIO_GOAL = 3.0
LEARNING_RATE = 1e-3


def _np_percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def _print(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def _resolve(path: str | Path) -> Path:
    """Config paths are relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def _config_and_root(data_root: Path | None):
    """The capsule config and its dataset, or the synthetic set (written if missing)."""
    from defectflow.config import load_config

    cfg = load_config("capsule")
    root = data_root if data_root is not None else _resolve(cfg.data.root)
    if root.is_dir():
        return cfg, root, "capsule"
    if data_root is not None:
        sys.exit(f"--data-root {data_root} is not a folder")
    cfg = load_config("default")
    synthetic = _resolve(cfg.data.root)
    reason = f"dataset folder {root} not found: using the synthetic set {synthetic}"
    if not synthetic.is_dir():
        cli = Path(sys.executable).with_name("defectflow")
        subprocess.run([str(cli), "data", "synth"], check=True, cwd=REPO_ROOT, stdout=sys.stderr)
        reason += " (written by `defectflow data synth`)"
    print(reason, file=sys.stderr)
    _print({"what": "data fallback", "reason": reason})
    return cfg, synthetic, "default"


def _load_train_split(cfg, root: Path, input_size: int):
    from defectflow.data.dataset import load_split
    from defectflow.data.mvtec import class_names, scan_dataset
    from defectflow.data.split import select, stratified_split

    samples = scan_dataset(root, cfg.data.good_class)
    classes = list(cfg.data.classes) or class_names(samples, cfg.data.good_class)
    s = cfg.data.split
    train = select(stratified_split(samples, s.train, s.val, s.test, s.seed), "train")
    started = time.perf_counter()
    split = load_split(train, classes, input_size)
    return split, classes, time.perf_counter() - started


def bench_pipeline(cfg, split, batch_size: int, batches: int, warmup: int) -> dict:
    from defectflow.data.augment import JointAugmentation
    from defectflow.data.dataset import make_dataset

    ds = make_dataset(
        split,
        batch_size,
        augment=JointAugmentation(cfg.augment, seed=0),
        shuffle=True,
        oversample=True,
    ).repeat()
    iterator = iter(ds)
    started = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    warmup_s = time.perf_counter() - started
    images = 0
    started = time.perf_counter()
    for _ in range(batches):
        x, _targets = next(iterator)
        images += int(x.shape[0])
    seconds = time.perf_counter() - started
    return _print(
        {
            "what": "input pipeline (alone)",
            "batches": batches,
            "batch_size": batch_size,
            "images": images,
            "seconds": round(seconds, 2),
            "warmup_s": round(warmup_s, 2),
            "batches_per_s": round(batches / seconds, 2),
            "images_per_s": round(images / seconds, 1),
        }
    )


def _fixed_batches(cfg, split, batch_size: int, count: int) -> list:
    """`count` augmented batches, fetched before any timing; full batches only."""
    from defectflow.data.augment import JointAugmentation
    from defectflow.data.dataset import make_dataset

    ds = make_dataset(
        split,
        batch_size,
        augment=JointAugmentation(cfg.augment, seed=0),
        shuffle=True,
        oversample=True,
    ).repeat()
    return list(ds.take(count))


def bench_train_step(model, cfg, batches: list, steps: int, warmup: int, phase: str) -> dict:
    import numpy as np

    from defectflow.models.unet import set_backbone_trainable
    from defectflow.training.train import compile_model

    set_backbone_trainable(model, phase == "unfrozen")
    compile_model(model, cfg, LEARNING_RATE)
    trainable = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    batch_size = int(batches[0][0].shape[0])
    started = time.perf_counter()
    x, y = batches[0]
    model.train_on_batch(x, y)  # traces the train step
    first_step_s = time.perf_counter() - started
    for i in range(1, warmup):
        x, y = batches[i % len(batches)]
        model.train_on_batch(x, y)
    ms = []
    for i in range(steps):
        x, y = batches[(warmup + i) % len(batches)]
        start = time.perf_counter()
        model.train_on_batch(x, y)  # returns the losses as numbers: the step has finished
        ms.append((time.perf_counter() - start) * 1000)
    median = statistics.median(ms)
    return _print(
        {
            "what": f"train step ({phase} encoder)",
            "trainable_params": trainable,
            "batch_size": batch_size,
            "steps": steps,
            "first_step_s": round(first_step_s, 1),
            "median_ms": round(median, 1),
            "p90_ms": round(_np_percentile(ms, 90), 1),
            "min_ms": round(min(ms), 1),
            "max_ms": round(max(ms), 1),
            "images_per_s": round(batch_size * 1000 / median, 1),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed train steps per phase")
    parser.add_argument(
        "--data-root", type=Path, help="MVTec-layout dataset (default: configs/capsule.yaml's)"
    )
    parser.add_argument(
        "--pipeline-batches", type=int, default=50, help="timed batches of the input pipeline"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches / train steps first")
    timing.add_out_option(parser, "training_speed", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("training_speed", argv, args)
    configure_environment()

    import keras
    import tensorflow as tf

    from defectflow.models.unet import build_model

    cfg, root, config_name = _config_and_root(args.data_root)
    split, classes, load_s = _load_train_split(cfg, root, args.input_size)
    record["setup"] = _print(
        {
            "what": "setup",
            "config": config_name,
            "data_root": str(root),
            "train_images": len(split),
            "classes": classes,
            "input_size": args.input_size,
            "load_arrays_s": round(load_s, 1),
            "cpus": os.cpu_count(),
            "load_avg_1m": timing.load_avg()[0],
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        }
    )

    pipeline = bench_pipeline(cfg, split, args.batch_size, args.pipeline_batches, args.warmup)

    keras.utils.set_random_seed(0)
    batches = _fixed_batches(cfg, split, args.batch_size, min(args.steps + args.warmup, 32))
    model = build_model("lite0", args.input_size, num_classes=len(classes), base_filters=16)
    ratios, steps = {}, {}
    for phase in ("frozen", "unfrozen"):
        step = bench_train_step(model, cfg, batches, args.steps, args.warmup, phase)
        steps[phase] = step
        ratios[phase] = pipeline["images_per_s"] / step["images_per_s"]

    worst = min(ratios.values())
    _print(
        {
            "what": "ratio pipeline/training images/s",
            **{phase: round(r, 2) for phase, r in ratios.items()},
            "goal": f">= {RATIO_GOAL:g} (input pipeline must not starve training)",
            "result": "PASS" if worst >= RATIO_GOAL else "FAIL",
            "load_avg_1m_after": timing.load_avg()[0],
        }
    )
    record.update(pipeline=pipeline, train_step=steps)
    rows = [
        timing.row(
            f"input pipeline / train step images/s, {phase} encoder",
            round(ratio, 2),
            f">= {RATIO_GOAL:g}",
            ratio >= RATIO_GOAL,
        )
        for phase, ratio in ratios.items()
    ]
    for phase, step in steps.items():
        rows += [
            timing.row(f"train step, {phase} encoder, median (ms)", step["median_ms"]),
            timing.row(f"train step, {phase} encoder (images/s)", step["images_per_s"]),
        ]
    rows += [
        timing.row("input pipeline alone, with augmentation (images/s)", pipeline["images_per_s"]),
        timing.row("batch size, input size (px)", f"{args.batch_size}, {args.input_size}"),
        timing.row("data", f"{config_name}: {len(split)} training images"),
    ]
    timing.finish(record, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
