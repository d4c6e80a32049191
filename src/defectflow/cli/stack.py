"""`defectflow up`, `down`, `status`: the local Prefect stack; `defectflow deploy`: the training
pipeline served as a deployment of a Prefect server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser(
        "up",
        help="start a Prefect server, work pools, the deployments of prefect.yaml and a "
        "worker on this machine (only what is not running yet)",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=4200)
    up.add_argument(
        "--no-worker", action="store_true", help="start no worker (e.g. workers run elsewhere)"
    )
    up.set_defaults(handler=cmd_up)
    down = sub.add_parser("down", help="stop the server and worker `defectflow up` started")
    down.set_defaults(handler=cmd_down)
    status = sub.add_parser("status", help="what `defectflow up` started, and whether it runs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)
    deploy = sub.add_parser("deploy", help="serve the training pipeline as a Prefect deployment")
    deploy.add_argument("--name", default="training-pipeline", help="deployment name")
    deploy.add_argument("--cron", default=None, help="schedule, e.g. '0 2 * * *' (default: none)")
    deploy.set_defaults(handler=cmd_deploy)


def cmd_up(args) -> int:
    from defectflow.orchestration import stack

    home = Path(os.environ["DEFECTFLOW_HOME"])
    try:
        state = stack.up(home, args.host, args.port, worker=not args.no_worker)
        # Later commands of this project (same PREFECT_HOME) then run against this server.
        stack.use_server(state.api_url)
    except stack.StackError as exc:
        print(f"defectflow: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"\nPrefect UI: {state.ui_url}\nAPI: {state.api_url} (set in the project's Prefect profile)\n"
        f"deployments: training-pipeline, nightly-retrain (02:00 UTC), evaluate, promote, training-pipeline-gpu\n"
        "stop with `make down` (defectflow down)"
    )
    return 0


def cmd_down(args) -> int:
    from defectflow.orchestration import stack

    stack.down(Path(os.environ["DEFECTFLOW_HOME"]))
    stack.use_server(None)
    return 0


def cmd_status(args) -> int:
    from defectflow.orchestration import stack

    info = stack.status(Path(os.environ["DEFECTFLOW_HOME"]))
    if args.json:
        print(json.dumps(info, indent=2))
    elif not info["running"]:
        print("not running (start with `make up`)")
    else:
        print(f"UI {info['ui_url']} ({'healthy' if info['healthy'] else 'NOT answering'})")
        for name, p in info["processes"].items():
            print(
                f"{name}: pid {p['pid']} {'running' if p['running'] else 'NOT running'}, log {p['log']}"
            )
    return 0


def cmd_deploy(args) -> int:
    """Blocks, running flow runs that the Prefect server at PREFECT_API_URL schedules."""
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "defectflow: error: PREFECT_API_URL is not set: start a server (`prefect server start`) "
            "and export PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    from defectflow.orchestration.flows.training import training_pipeline

    training_pipeline.serve(
        name=args.name,
        cron=args.cron,
        tags=["defectflow"],
        description="Validate, tune, train, evaluate, gate and package a defect model.",
    )
    return 0
