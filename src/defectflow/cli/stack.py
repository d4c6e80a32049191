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
    up.add_argument(
        "--pool",
        choices=("process", "docker"),
        default="process",
        help="where training-pipeline and nightly-retrain run: a process worker here (default), "
        "or Docker workers starting a container of the training image per flow run "
        "(`make image-train`; the data dir is mounted at its own path)",
    )
    up.add_argument(
        "--docker-workers",
        type=int,
        default=1,
        metavar="N",
        help="with --pool docker: Docker workers to start, each running one flow run at a time",
    )
    up.add_argument(
        "--image",
        default="defectflow-train:latest",
        help="with --pool docker: the local training image (never pulled)",
    )
    up.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default=None,
        help="the Prefect server's database: SQLite under PREFECT_HOME (default), or a "
        "PostgreSQL cluster (Debian's postgresql) started under <data dir>/postgres",
    )
    up.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="a PostgreSQL someone else runs, postgresql://user:password@host:port/database "
        "(the database is created when missing)",
    )
    up.add_argument(
        "--server-url",
        default=None,
        metavar="URL",
        help="configure the Prefect server at URL (pools, deployments, zombie detection) "
        "instead of starting one",
    )
    up.add_argument(
        "--docker-network",
        default=None,
        metavar="NAME",
        help="with --pool docker: the Docker network of flow-run containers (default: the host's)",
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
    if args.database_url and args.database == "sqlite":
        print(
            "defectflow: error: --database sqlite and --database-url: choose one", file=sys.stderr
        )
        return 2
    try:
        state = stack.up(
            home,
            args.host,
            args.port,
            worker=not args.no_worker,
            pool=args.pool,
            docker_workers=args.docker_workers,
            image=args.image,
            database=args.database or ("postgres" if args.database_url else "sqlite"),
            database_url=args.database_url,
            server_url=args.server_url,
            docker_network=args.docker_network,
        )
        # Later commands of this project (same PREFECT_HOME) then run against this server.
        stack.use_server(state.api_url)
    except stack.StackError as exc:
        print(f"defectflow: error: {exc}", file=sys.stderr)
        return 1
    on_docker = (
        f"training-pipeline and nightly-retrain on the Docker pool {stack.DOCKER_POOL} "
        f"(image {args.image})\n"
        if args.pool == "docker"
        else ""
    )
    print(
        f"\nPrefect UI: {state.ui_url}\nAPI: {state.api_url} (set in the project's Prefect profile)\n"
        f"deployments: training-pipeline, nightly-retrain (02:00 UTC), evaluate, promote, training-pipeline-gpu\n"
        f"{on_docker}"
        + ("" if args.server_url else f"database: {state.database['kind']}\n")
        + "stop with `make down` (defectflow down)"
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
        print(
            f"pool {info['pool']}, database {info['database']['kind']}, "
            f"flow-run containers {info['containers']}"
        )
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
