"""The `defectflow` command.

    defectflow data synth   [--overwrite]          write the embedded synthetic dataset
    defectflow data preview [--out PNG]            grid of augmented image/mask pairs
    defectflow validate                            run the Great Expectations gate on data.root
    defectflow train        [--run-id ID]          run the training pipeline (a Prefect flow)
    defectflow reproduce    [--seeds 42 43 44]     the pipeline on several split seeds: results table
    defectflow evaluate     [--model TAG] [--json] evaluate a stored model (default: production) on data.root
    defectflow evaluate     RUN_DIR                calibrate thresholds (val) and evaluate (test) a run's model
    defectflow evaluate     --leave-one-out        train without each defect type: is it still flagged?
    defectflow predict      PATH... [--model TAG]  inspect image files and folders: report, masks, overlays
    defectflow models       list | history | show TAG | promote TAG | rollback | archive TAG
    defectflow serve        [--bento TAG]          serve a Bento over HTTP (BentoML)
    defectflow review       list | show ID | accept ID --label CLASS | discard ID
    defectflow up | down | status                  the local Prefect server, work pools and worker
    defectflow deploy       [--cron EXPR]          serve the pipeline as a deployment of a Prefect server

data, validate, train and reproduce take `--config NAME` (a file in configs/) and trailing
`key=value` overrides; evaluate takes the overrides too (over a stored model's own config, or
with --leave-one-out over --config).

The package (not shown by --help): the top layer. One module per command group (`data`,
`train`, `evaluate`, `predict`, `models`, `serve`, `stack`), each with `add_commands(sub)`
that adds its subcommands, their arguments beside their handlers (`set_defaults(handler=...)`);
`common` holds what several groups share. Here a command only parses, calls and prints: the
logic belongs in the packages below.

May import: everything (orchestration, training, evaluation, data, serving, inference, models
and the foundations). No package imports the CLI. Imports of the packages below stay inside
the handlers, so that `defectflow --help` starts without TensorFlow.
"""

from __future__ import annotations

import argparse
import sys

from defectflow.cli import data, evaluate, models, predict, serve, stack, train
from defectflow.environment import configure_environment

#: The command groups, in the order `defectflow --help` lists their commands.
GROUPS = (data, train, evaluate, predict, models, serve, stack)

#: The command overview of `defectflow --help`: the docstring without the package notes.
USAGE = __doc__[: __doc__.index("The package (not shown by --help)")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectflow", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_environment()
    from defectflow.config import ConfigError
    from defectflow.data.mvtec import DatasetError
    from defectflow.registry import RegistryError

    try:
        return args.handler(args)
    except (ConfigError, DatasetError, FileExistsError, RegistryError) as exc:
        print(f"defectflow: error: {exc}", file=sys.stderr)
        return 2
