"""`defectflow evaluate`: a stored model, a run's model, or the leave-one-defect-type-out study."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from defectflow.cli.common import table


def add_commands(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a stored model (default: production) on the test split of data.root "
        "(the model's own config, then key=value overrides), or the model of a run folder; "
        "writes a report",
    )
    evaluate.add_argument(
        "targets",
        nargs="*",
        metavar="RUN_DIR | key=value",
        help="a run folder, or config overrides such as data.root=/path",
    )
    evaluate.add_argument("--model", default=None, help="model tag (default: the production model)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument("--out", type=Path, default=None, help="report folder")
    evaluate.add_argument(
        "--no-calibrate",
        action="store_true",
        help="with a run folder: keep the thresholds the model has",
    )
    evaluate.add_argument(
        "--leave-one-out",
        action="store_true",
        help="for each defect type: train without it (config --config + key=value overrides; "
        "keep the budget small) and measure how many of its images are still flagged",
    )
    evaluate.add_argument(
        "--config",
        default="default",
        help="with --leave-one-out: config name in configs/ (default: default)",
    )
    evaluate.add_argument(
        "--types",
        nargs="+",
        default=None,
        metavar="TYPE",
        help="with --leave-one-out: only these defect types (default: all)",
    )
    evaluate.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args) -> int:
    """A stored model (read-only) or a run's model (thresholds redone on val), on a test split."""
    run_dirs = [Path(t) for t in args.targets if "=" not in t]
    overrides = [t for t in args.targets if "=" in t]
    if args.leave_one_out:
        if run_dirs or args.model:
            print(
                "defectflow: error: --leave-one-out trains its own models: give key=value overrides, not a run "
                "folder or --model",
                file=sys.stderr,
            )
            return 2
        return _evaluate_leave_one_out(args, overrides)
    if len(run_dirs) > 1 or (run_dirs and args.model):
        print("defectflow: error: give one run folder, or --model TAG, not both", file=sys.stderr)
        return 2
    if run_dirs:
        return _evaluate_run(args, run_dirs[0], overrides)
    return _evaluate_stored_model(args, overrides)


def _evaluate_run(args, run: Path, overrides: list[str]) -> int:
    """The run's model on the run's own split: thresholds from val, figures on test."""
    from defectflow.config import from_yaml
    from defectflow.data.split import read_manifest, select
    from defectflow.evaluation.calibration import calibrate_model
    from defectflow.evaluation.champion import write_assessment_report
    from defectflow.evaluation.evaluate import evaluate_model_dir

    if overrides:
        print(
            "defectflow: error: a run folder is evaluated on its own split: no key=value overrides",
            file=sys.stderr,
        )
        return 2
    missing = [
        p
        for p in (run / "config.yaml", run / "manifest.csv", run / "model" / "model.json")
        if not p.exists()
    ]
    if missing:
        print(
            f"defectflow: error: {run} is not a finished run folder (missing {', '.join(map(str, missing))})",
            file=sys.stderr,
        )
        return 2
    cfg = from_yaml((run / "config.yaml").read_text())
    rows = read_manifest(run / "manifest.csv")
    if not args.no_calibrate:  # whatever the run did: this command is how thresholds are redone
        thresholds = calibrate_model(
            run / "model",
            select(rows, "val"),
            cfg.train.batch_size,
            run / "calibration.json",
            cfg.eval.temperature_scaling,
            cfg.eval.accept_target_accuracy,
            cfg.anomaly.false_alarm_rate,
            cfg.eval.anomaly_agreement,
        )
        if not args.json:
            print(thresholds.markdown() + "\n")
    result = evaluate_model_dir(
        run / "model",
        select(rows, "test"),
        run / "evaluation",
        cfg.train.batch_size,
        cfg.eval.plot_count,
    )
    report = write_assessment_report(
        args.out or run / "report",
        result,
        None,
        None,
        f"run {run.name}",
        history_file=run / "model" / "training.json",
    )
    _print_evaluation(
        args,
        {"model": str(run / "model"), "stage": None, "data_root": cfg.data.root},
        result,
        None,
        report,
    )
    return 0


def _evaluate_leave_one_out(args, overrides: list[str]) -> int:
    """The leave-one-defect-type-out table, into --out (default: <home>/leave_one_out)."""
    from defectflow.config import load_config, resolve_path
    from defectflow.training.leave_one_out import leave_one_out, markdown

    cfg = load_config(args.config, overrides)
    out = args.out or resolve_path(cfg.paths.home) / "leave_one_out"
    summary = leave_one_out(cfg, out, args.types)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(markdown(summary))
        print(f"\ntable: {out / 'leave_one_out.md'}, chart: {out / 'leave_one_out.png'}")
    return 0


def _evaluate_stored_model(args, overrides: list[str]) -> int:
    """Never writes to the store: figures and the report go to --out."""
    from defectflow.evaluation.champion import assess_stored_model

    a = assess_stored_model(args.model, overrides, args.out)
    _print_evaluation(
        args,
        {"model": a.tag, "stage": a.stage, "data_root": a.data_root},
        a.result,
        a.champion and {"model": a.champion_tag, "metrics": a.champion.headline()},
        a.report,
        a.decision,
    )
    return 0


def _print_evaluation(
    args, about: dict, result, champion: dict | None, report: dict, decision=None
) -> None:
    headline = result.headline()
    if args.json:
        print(
            json.dumps(
                {
                    **about,
                    "n_images": result.metrics["n_images"],
                    "metrics": headline,
                    "per_class": result.metrics["per_class"],
                    "confusion_matrix": result.metrics["confusion_matrix"],
                    "champion": champion,
                    "gate": decision.to_dict() if decision else None,
                    "report": {k: str(v) for k, v in report.items()},
                },
                indent=2,
            )
        )
        return
    print(
        f"{about['model']} ({about['stage'] or 'run model'}) on {result.metrics['n_images']} test images "
        f"of {about['data_root']}"
    )
    rows = [
        [k, f"{v:.4f}"]
        + (
            [f"{champion['metrics'][k]:.4f}", f"{v - champion['metrics'][k]:+.4f}"]
            if champion
            else []
        )
        for k, v in headline.items()
    ]
    headers = ["metric", "value"] + (["production", "difference"] if champion else [])
    print(table(headers, rows))
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
    m = result.metrics
    if "anomaly_threshold" in m:
        alone = m["classifier_only"]
        print(
            f"\nanomaly score > {m['anomaly_threshold']:.4f}: AUROC {m['anomaly_auroc']:.4f}, combined "
            f"{m['detection_auroc']:.4f}; {m['unknown_defect_answers']} unknown_defect answers; false alarms "
            f"{m['false_alarm_rate']:.3f} (classifier alone {alone['false_alarm_rate']:.3f}); classifier alone: "
            f"accuracy {alone['accuracy']:.4f}, defect Dice {alone['defect_dice']:.4f}"
        )
    if decision is not None:
        print(f"\nagainst production {champion['model']}: {decision.message}")
    print(f"\nreport: {report['html']}")
