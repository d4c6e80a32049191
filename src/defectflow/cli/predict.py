"""`defectflow predict`: image files, folders or globs through a model, offline."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from defectflow.cli.common import table


def add_commands(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser(
        "predict",
        help="inspect image files, folders (recursively) or globs with a model: "
        "a report row per file, mask and overlay PNGs, a summary",
    )
    predict.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, folders or globs (quote them)"
    )
    predict.add_argument(
        "--model", default=None, help="model tag, or a model folder (default: the production model)"
    )
    predict.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the report and the PNGs, which mirror each input's path below the "
        "inputs' common parent folder (default: <home>/predictions/<time>)",
    )
    predict.add_argument(
        "--format",
        choices=["csv", "json"],
        default="csv",
        help="report.csv, or report.jsonl with one JSON object per line (default: csv)",
    )
    predict.add_argument(
        "--overlay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write <name>_overlay.png beside each <name>_mask.png (default: on)",
    )
    predict.add_argument(
        "--batch-size", type=int, default=8, help="images per forward pass (default: 8)"
    )
    predict.add_argument(
        "--score",
        action="store_true",
        help="the PATH is an MVTec-layout folder (test/<class>/...): compare the answers with its "
        "labels and masks and print the metrics defectflow evaluate prints",
    )
    predict.set_defaults(handler=cmd_predict)


def _load_predictor_for(model: str | None):
    """(predictor, description) of a model folder, a model tag, or (None) the production model."""
    from defectflow.artifacts import MODEL_INFO_FILE
    from defectflow.evaluation.champion import load_predictor
    from defectflow.registry import RegistryError, production_tag, resolve_tag, verify_model

    if model and (Path(model) / MODEL_INFO_FILE).is_file():
        return load_predictor(Path(model), model), model
    if model is None:
        model = production_tag()
        if model is None:
            raise RegistryError("no production model: give --model TAG or a model folder")
    tag = resolve_tag(model)
    return load_predictor(verify_model(tag), tag), tag


def cmd_predict(args) -> int:
    """Every file behind PATH... through the model: report, PNGs and a summary. Exit 0 when at
    least one image was inspected, 1 when none could be, 2 when the model cannot be loaded."""
    import time

    from tqdm import tqdm

    from defectflow.config import resolve_path
    from defectflow.inference.inspection import (
        ReportWriter,
        collect_inputs,
        inspect_files,
        summarize,
    )

    if args.batch_size < 1:
        print("defectflow: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.score and (len(args.paths) != 1 or not (Path(args.paths[0]) / "test").is_dir()):
        print(
            "defectflow: error: --score needs one MVTec-layout folder (with test/<class>/...)",
            file=sys.stderr,
        )
        return 2
    inputs = collect_inputs(args.paths)
    for argument in inputs.missing:
        print(f"defectflow: warning: {argument}: no such file, folder or match", file=sys.stderr)
    predictor, model = _load_predictor_for(args.model)
    out = args.out or resolve_path(os.environ["DEFECTFLOW_HOME"]) / "predictions" / time.strftime(
        "%Y%m%d-%H%M%S"
    )
    writer = ReportWriter(
        out / ("report.csv" if args.format == "csv" else "report.jsonl"),
        predictor.classes,
        args.format,
    )
    rows = []
    started = time.perf_counter()
    progress = tqdm(
        total=len(inputs.files), unit="img", desc="inspecting", file=sys.stderr, dynamic_ncols=True
    )
    try:
        for row in inspect_files(predictor, inputs.files, out, args.batch_size, args.overlay):
            writer.write(row)
            rows.append(row)
            progress.update()
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {len(rows)} of {len(inputs.files)} files done, all in the report",
            file=sys.stderr,
        )
    finally:
        progress.close()
        writer.close()
    summary = summarize(rows, len(inputs.files), time.perf_counter() - started)
    _print_inspection(summary, model, writer.path)
    if args.score and not summary["interrupted"]:
        _score_inspection(args, predictor, rows, out)
    if summary["interrupted"]:
        return 130
    return 0 if summary["inspected"] else 1


def _print_inspection(summary: dict, model: str, report: Path) -> None:
    print(
        f"\n{model}: {summary['inspected']} of {summary['files']} files inspected in {summary['seconds']:.1f} s "
        f"({summary['images_per_second'] or 0:.1f} images/s)"
    )
    counts = [[label, count] for label, count in summary["classes"].items()]
    if counts:
        print(table(["class", "images"], counts))
    if summary["inspected"]:
        print(
            f"defective: {summary['defective']} of {summary['inspected']} ({summary['defective_fraction']:.1%}); "
            f"uncertain: {summary['uncertain']}"
        )
    if summary["unreadable"]:
        print(f"not inspected: {len(summary['unreadable'])} files")
        for item in summary["unreadable"]:
            print(f"  {item['path']}: {item['error']}")
    print(f"report: {report}")


def _score_inspection(args, predictor, rows, out: Path) -> None:
    """--score: the inspected images of an MVTec-layout folder against its labels, with the
    same evaluation `defectflow evaluate` runs."""
    from defectflow.data.mvtec import labelled_samples
    from defectflow.evaluation.evaluate import evaluate

    samples = labelled_samples(Path(args.paths[0]), {Path(r.path).resolve() for r in rows if r.ok})
    unknown = sorted({s.label for s in samples} - set(predictor.classes))
    if unknown:
        print(f"\nnot scored: the folder has classes the model does not know: {', '.join(unknown)}")
        return
    if not samples:
        print("\nnot scored: no inspected image sits in the folder's MVTec layout")
        return
    result = evaluate(predictor, samples, args.batch_size)
    print(f"\nscored against the folder labels: {len(samples)} images")
    print(table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in result.headline().items()]))
    print(
        "\n"
        + table(
            ["class", "precision", "recall", "F1", "support"],
            [
                [c, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
                for c, r in result.metrics["per_class"].items()
            ],
        )
    )
    print(f"metrics: {result.save(out / 'score')}")
