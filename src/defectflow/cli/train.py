"""`defectflow train`, `defectflow reproduce`: the training pipeline flows, run here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from defectflow.cli.common import configurable


def add_commands(sub: argparse._SubParsersAction) -> None:
    train = configurable(sub.add_parser("train", help="run the training pipeline flow"))
    train.add_argument(
        "--run-id",
        default=None,
        help="run folder name; the id of an interrupted run resumes it (default: new)",
    )
    train.set_defaults(handler=cmd_train)
    reproduce = configurable(
        sub.add_parser(
            "reproduce",
            help="tune once, then train and evaluate on several split seeds; mean ± std table",
        )
    )
    reproduce.set_defaults(handler=cmd_reproduce)
    reproduce.add_argument(
        "--seeds", type=int, nargs="+", default=[42, 43, 44], help="data.split.seed values"
    )
    reproduce.add_argument("--out", type=Path, default=None, help="results folder")


def _run_pipeline(args, start) -> int:
    from defectflow.config import load_config
    from defectflow.data.validation import DataValidationError
    from defectflow.orchestration.runs import RunConflict

    load_config(args.config, args.overrides)  # fail fast, before Prefect starts, on a bad config
    try:
        summary = start()
    except (DataValidationError, RunConflict) as exc:
        print(f"defectflow: training stopped: {exc}", file=sys.stderr)
        return 1
    print("\nartifacts:")
    print(json.dumps(summary, indent=2))
    if summary.get("decision"):  # a rejected challenger is an outcome, not an error: exit 0
        print(f"\n{summary['decision']}")
    return 0


def cmd_train(args) -> int:
    def start():
        from defectflow.orchestration.flows.training import training_pipeline

        return training_pipeline(
            config=args.config, overrides=list(args.overrides), run_id=args.run_id
        )

    return _run_pipeline(args, start)


def cmd_reproduce(args) -> int:
    def start():
        from defectflow.orchestration.flows.reproduce import reproduce

        summary = reproduce(
            config=args.config,
            seeds=args.seeds,
            overrides=list(args.overrides),
            out_dir=str(args.out) if args.out else None,
        )
        print((Path(summary["out_dir"]) / "results.md").read_text())
        return summary

    return _run_pipeline(args, start)
