"""Speed of the data validation gate against merely decoding the same images.

    .venv/bin/python benchmarks/validation_speed.py [--root DATASET] [--repeats 5] [--workers N]
        [--out JSON]

`validate`: scan the folder, extract the facts of every image (`image_facts`, with a stratified
split, `workers` threads) and run the Great Expectations suite (`validate_dataset`).
`decode`: read and `cv2.imdecode` every image and every mask once, sequentially.
Both run `--repeats` times, alternating, after one warm-up of each (page cache; GX's first-run
lazy imports). Prints JSON lines: min / median / max seconds of each, and the ratio of the
medians (goal: <= 1.3). Importing great_expectations is a one-off cost of the process: it is
measured and printed on its own line and is not part of either timing or the ratio.
Default dataset: the MVTec capsule copy beside the repository; skipped (exit 0) when absent.
Writes the figures, the goal and the provenance (machine, date, commit, load) to `--out`
(default from the command line `benchmarks/results/validation_speed.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import timing  # noqa: E402

DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "data" / "mvtec_capsule" / "capsule"
RATIO_GOAL = 1.3


def _print(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def _summary(name: str, seconds: list[float], **extra) -> dict:
    return _print(
        {
            "what": name,
            "n": len(seconds),
            "min_s": round(min(seconds), 4),
            "median_s": round(statistics.median(seconds), 4),
            "max_s": round(max(seconds), 4),
            **extra,
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MVTec-layout dataset")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="default: min(8, CPUs)")
    timing.add_out_option(parser, "validation_speed", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("validation_speed", argv, args)
    if not args.root.is_dir():
        reason = f"dataset folder {args.root} not found: nothing to measure"
        print(f"skipped: {reason}", file=sys.stderr)
        _print({"what": "validation_speed", "skipped": reason})
        return 0

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    if "great_expectations" in sys.modules:
        ge_import = 0.0  # already imported by this process (e.g. under pytest)
    else:
        start = time.perf_counter()
        import great_expectations  # noqa: F401

        ge_import = time.perf_counter() - start

    import cv2
    import numpy as np

    from defectflow.config import ValidationConfig
    from defectflow.data.mvtec import scan_dataset
    from defectflow.data.split import stratified_split
    from defectflow.data.validation import (
        _good_mask_path,
        default_workers,
        image_facts,
        split_map,
        validate_dataset,
    )

    cfg = ValidationConfig()
    workers = args.workers or default_workers()
    samples = scan_dataset(args.root)
    files = [s.path for s in samples]
    files += [s.mask_path for s in samples if s.mask_path is not None]
    files += [m for s in samples if s.label == "good" and (m := _good_mask_path(s)) is not None]

    def decode() -> None:
        for path in files:
            cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)

    def validate():
        found = scan_dataset(args.root)
        splits = split_map(stratified_split(found, 0.7, 0.15, 0.15, seed=42))
        facts = image_facts(found, "good", splits, workers=workers)
        return validate_dataset(facts, cfg)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    record["dataset"] = _print(
        {
            "what": "dataset",
            "root": str(args.root),
            "images": len(samples),
            "files_decoded": len(files),
            "workers": workers,
            "cpus": os.cpu_count(),
        }
    )
    _print({"what": "ge_import", "seconds": round(ge_import, 4), "in_ratio": False})
    first_decode = timed(decode)
    start = time.perf_counter()
    result = validate()
    first_validate = time.perf_counter() - start
    _print(
        {
            "what": "warm_up",
            "decode_s": round(first_decode, 4),
            "validate_s": round(first_validate, 4),
            "valid": result.success,
            "checks": result.statistics.get("evaluated_expectations"),
        }
    )
    decode_times, validate_times = [], []
    for _ in range(max(1, args.repeats)):
        decode_times.append(timed(decode))
        validate_times.append(timed(validate))
    decode_row = _summary("decode", decode_times)
    validate_row = _summary("validate", validate_times)
    ratio = validate_row["median_s"] / decode_row["median_s"]
    summary = _print(
        {
            "what": "ratio",
            "validate_over_decode": round(ratio, 3),
            # Medians are the goal's measure; the ratio of minimums is the least load-sensitive.
            "ratio_of_min": round(validate_row["min_s"] / decode_row["min_s"], 3),
            "goal": RATIO_GOAL,
            "met": ratio <= RATIO_GOAL,
            "excludes": "great_expectations import (one-off per process)",
        }
    )
    record.update(decode=decode_row, validate=validate_row, ratio=summary)
    rows = [
        timing.row(
            "validate / decode, ratio of the medians",
            summary["validate_over_decode"],
            f"<= {RATIO_GOAL:g}",
            summary["met"],
        ),
        timing.row("validate, median (s)", validate_row["median_s"]),
        timing.row("decode every image and mask sequentially, median (s)", decode_row["median_s"]),
        timing.row("validate / decode, ratio of the minimums", summary["ratio_of_min"]),
        timing.row("images (files decoded)", f"{len(samples)} ({len(files)})"),
        timing.row(
            "great_expectations import, once per process, not in the ratio (s)", round(ge_import, 2)
        ),
        timing.row("repeats", len(validate_times)),
    ]
    timing.finish(record, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
