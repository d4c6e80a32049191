"""Throughput of `defectflow predict` on a folder of 500 images: batch 1 against the default batch.

    .venv/bin/python benchmarks/predict_folder.py --model TAG_OR_FOLDER [--images 500]
        [--batches 1 8] [--repeats 3] [--no-overlay] [--out JSON]

The folder holds `--images` PNGs: the MVTec capsule copy beside the repository
(../shared/data/mvtec_capsule/capsule, 512x512; linked, never copied into the repository),
cycled to the count, or synthetic 512x512 capsules when it is absent (said in the output).
Each repeat runs the command's own path in this process (`collect_inputs`, `inspect_files`
with the mask and overlay PNGs written, `ReportWriter`), the batch sizes taking turns so a
load change affects them alike. Model loading is outside the timing (it happens once per
command). Prints JSON lines: per batch size min / median / max images/s. Writes them and the
provenance (machine, date, commit, load) to `--out` (default
`benchmarks/results/predict_folder.json`).

The served model's HTTP throughput to compare with comes from `benchmarks/serve_bench.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
import timing  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

CAPSULE = REPO.parent / "shared" / "data" / "mvtec_capsule" / "capsule"


def _print(line: dict) -> dict:
    print(json.dumps(line), flush=True)
    return line


def make_folder(folder: Path, count: int) -> str:
    """`count` PNGs in `folder`; returns where they came from."""
    sources = sorted(CAPSULE.glob("*/*/*.png")) if CAPSULE.is_dir() else []
    sources = [p for p in sources if "ground_truth" not in p.parts]
    if sources:
        for i in range(count):
            (folder / f"{i:04d}.png").symlink_to(sources[i % len(sources)])
        return f"MVTec capsule copy, {len(sources)} images cycled to {count} (symlinks)"
    import cv2
    import numpy as np

    from defectflow.data.synthetic import render_sample

    rng = np.random.default_rng(0)
    for i in range(count):
        image, _ = render_sample(rng, 512, None if i % 3 else "crack")
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return f"no capsule copy at {CAPSULE}: {count} synthetic 512x512 capsules"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model tag or folder (default: the production model)"
    )
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True)
    timing.add_out_option(parser, "predict_folder", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("predict_folder", argv, args)
    configure_environment()
    from defectflow.cli.predict import _load_predictor_for
    from defectflow.inference.inspection import ReportWriter, collect_inputs, inspect_files

    predictor, model = _load_predictor_for(args.model)
    with tempfile.TemporaryDirectory(prefix="defectflow-predict-bench-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        source = make_folder(folder, args.images)
        record["input"] = _print(
            {
                "model": model,
                "format": predictor.format,
                "images": args.images,
                "source": source,
                "overlay": args.overlay,
            }
        )
        files = collect_inputs([str(folder)]).files
        warmup = list(inspect_files(predictor, files[:8], Path(tmp) / "warmup", 8, args.overlay))
        assert all(answer.ok for answer in warmup), [answer.error for answer in warmup]
        rates: dict[int, list[float]] = {b: [] for b in args.batches}
        for repeat in range(args.repeats):
            for batch in args.batches if repeat % 2 == 0 else list(reversed(args.batches)):
                out = Path(tmp) / f"out-{batch}-{repeat}"
                writer = ReportWriter(out / "report.csv", predictor.classes)
                start = time.perf_counter()
                for answer in inspect_files(predictor, files, out, batch, args.overlay):
                    writer.write(answer)
                seconds = time.perf_counter() - start
                writer.close()
                rates[batch].append(len(files) / seconds)
        record["rates"] = {}
        for batch, values in rates.items():
            record["rates"][batch] = _print(
                {
                    "batch_size": batch,
                    "repeats": len(values),
                    "images_per_second_min": round(min(values), 1),
                    "images_per_second_median": round(statistics.median(values), 1),
                    "images_per_second_max": round(max(values), 1),
                }
            )
    rows = [
        timing.row(
            f"batch {batch}: images/s, median (min - max)",
            f"{r['images_per_second_median']} ({r['images_per_second_min']} - "
            f"{r['images_per_second_max']})",
        )
        for batch, r in record["rates"].items()
    ]
    rows += [
        timing.row("model (format)", f"{model} ({predictor.format})"),
        timing.row("images", source),
        timing.row("overlay PNGs written beside the masks", "yes" if args.overlay else "no"),
    ]
    timing.finish(record, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
