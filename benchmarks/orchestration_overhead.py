"""Prefect orchestration overhead: the training pipeline as a Prefect flow against the same
stages called directly, in one process, on tiny data. Goal: overhead <= 10 %.

    .venv/bin/python benchmarks/orchestration_overhead.py [--repeats 3] [--warmup 1]
        [--config tiny] [--api-url http://127.0.0.1:PORT/api] [--out JSON] [key=value ...]

Data: a synthetic MVTec-layout set written with the sizes of `configs/<config>.yaml`
(data.synth, as `defectflow data synth --config tiny` does) under
$DEFECTFLOW_HOME/benchmarks/orchestration/data. Config: `--config` (default tiny) with
`train.epochs=2 tune.max_trials=1 tune.epochs=1 package.build_bento=false gate.promote=false`
and `package.model_name=orchestration-bench`, then any key=value given. gate.promote=false:
nothing is ever promoted, so every run of either variant finds no production model and does
the same work (the store only gains candidates). State lives under
$DEFECTFLOW_HOME/benchmarks/orchestration (its own BentoML, Keras and Prefect folders).

(1) flow: `flows.training.training_pipeline(config, overrides)` as a Prefect flow, with a real
    `prefect server start` on 127.0.0.1 started before timing (server start-up is not
    counted), or the server of `--api-url`. Its task runs (read from the API afterwards) give a
    per-task breakdown: median seconds per task run, and the flow's wall time not spent inside
    task runs.
(2) direct: `direct_pipeline()` runs the body of flows/training.py's flow with each task
    called as its plain function (`without_prefect`): the same code, in the same order, with
    no task runs, no run logger and no artifacts sent (their Markdown and tables are still
    built). Both variants recompute every step (PREFECT_TASKS_REFRESH_CACHE=true): the
    cache of the flow would otherwise skip the scan and the validation.

Each variant runs `--warmup` untimed times first (TensorFlow graph tracing, first split of the
data version), then `--repeats` times, alternating which goes first. Printed, and written with
the provenance (machine, date, commit, load) to `--out` (default
`benchmarks/results/orchestration_overhead.json`): min / median / max wall seconds per
variant, per-stage medians, and overhead % = (median_flow - median_direct) / median_direct,
with PASS / FAIL against the goal. Not a test: run it by hand.

On 2 CPU cores the TensorFlow stages (tune, train, export) vary by several seconds from run to
run in either variant, more than Prefect costs; `outside_tasks_percent` (the flow's wall time
outside its task runs, over the direct median) is Prefect's share that no stage hides, and
the per-stage medians show each task run's bookkeeping. Use more --repeats for a tighter
median.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import timing  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

GOAL_PERCENT = 10.0
BASE_OVERRIDES = [
    "train.epochs=2",
    "tune.max_trials=1",
    "tune.epochs=1",
    "package.build_bento=false",
    "gate.promote=false",
    "package.model_name=orchestration-bench",
]


def _print(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


class Stopwatch:
    """Seconds per stage of one direct run, in order."""

    def __init__(self):
        self.stages: dict[str, float] = {}
        self.running = False

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def timed(self, name: str, fn):
        def run(*args, **kwargs):
            if self.running:  # inside another stage (check-data in validate-data): counted there
                return fn(*args, **kwargs)
            self.running = True
            try:
                with self(name):
                    return fn(*args, **kwargs)
            finally:
                self.running = False

        return run


@contextmanager
def without_prefect(watch: Stopwatch):
    """The pipeline's tasks as plain functions: in flows.training and the tasks modules, every
    Prefect task is replaced by its undecorated function (`.fn`, timed under the task's name),
    get_run_logger by a standard logger, and create_*_artifact by a no-op (the Markdown and
    tables are still built, as their arguments). Restored afterwards."""
    import importlib
    import logging

    from prefect import Task

    modules = [
        importlib.import_module(name)
        for name in (
            "defectflow.orchestration.flows.training",
            "defectflow.orchestration.tasks.data",
            "defectflow.orchestration.tasks.training",
            "defectflow.orchestration.tasks.evaluation",
            "defectflow.orchestration.tasks.export",
            "defectflow.orchestration.tasks.packaging",
            "defectflow.orchestration.tasks.runs",
        )
    ]
    saved = []
    for module in modules:
        for attr, value in list(vars(module).items()):
            if isinstance(value, Task):
                replacement = watch.timed(value.name, value.fn)
            elif attr == "get_run_logger":
                replacement = lambda: logging.getLogger("defectflow.direct")  # noqa: E731
            elif attr.startswith("create_") and attr.endswith("_artifact"):
                replacement = lambda *args, **kwargs: None  # noqa: E731
            else:
                continue
            saved.append((module, attr, value))
            setattr(module, attr, replacement)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def direct_pipeline(config: str, overrides: list[str], watch: Stopwatch | None = None) -> dict:
    """flows/training.py's training_pipeline body with its tasks called as plain functions (see
    `without_prefect`): the same code in the same order, no Prefect. Returns the flow's summary."""
    from defectflow.orchestration.flows.training import training_pipeline

    watch = watch or Stopwatch()
    with without_prefect(watch):
        state = training_pipeline.fn(config=config, overrides=overrides)
    return state.data


def flow_pipeline(config: str, overrides: list[str]) -> tuple[dict, str]:
    """The Prefect flow; its summary and flow run id."""
    from defectflow.orchestration.flows.training import training_pipeline

    state = training_pipeline(config=config, overrides=overrides, return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"flow run ended {state.name}: {state.message}")
    return state.result(), str(state.state_details.flow_run_id)


def task_breakdown(flow_run_id: str) -> dict[str, float]:
    """Seconds each task run of the flow run spent Running, by task name (from the API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    seconds: dict[str, float] = {}
    for run in runs:
        if run.task_inputs.get("__parents__"):
            continue  # a task run inside another (check-data in validate-data): counted in its parent
        name = run.name.rsplit("-", 1)[0]  # "train-model-a1b" -> "train-model"
        seconds[name] = seconds.get(name, 0.0) + run.total_run_time.total_seconds()
    return seconds


@contextmanager
def prefect_server(home: Path):
    """A Prefect server on a free 127.0.0.1 port (defectflow.orchestration.stack, no worker: the flow runs in
    this process), stopped afterwards; yields its API URL."""
    from defectflow.orchestration import stack

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    state = stack.up(
        home, port=port, deploy=False, worker=False, say=lambda line: print(line, file=sys.stderr)
    )
    print(
        f"prefect server at {state.ui_url} ready in {time.monotonic() - start:.1f} s",
        file=sys.stderr,
    )
    try:
        yield state.api_url
    finally:
        stack.down(home, say=lambda line: print(line, file=sys.stderr))


def _stats(values: list[float]) -> dict:
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
        "runs": [round(v, 2) for v in values],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Prefect flow vs direct calls: orchestration overhead"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per variant first (default 1)"
    )
    parser.add_argument("--config", default="tiny", help="config name (default tiny)")
    parser.add_argument(
        "--api-url", default=None, help="an existing Prefect API (default: start a server)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides")
    timing.add_out_option(parser, "orchestration_overhead", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("orchestration_overhead", argv, args)

    home = Path(os.environ.get("DEFECTFLOW_HOME", REPO_ROOT / ".defectflow")).expanduser().resolve()
    bench = home / "benchmarks" / "orchestration"
    bench.mkdir(parents=True, exist_ok=True)
    # Own state folders, set before Prefect, BentoML or Keras is imported; runs go under bench/.
    os.environ.update(
        BENTOML_HOME=str(bench / "bentoml"),
        KERAS_HOME=str(bench / "keras"),
        PREFECT_HOME=str(bench / "prefect"),
        # The same work in both variants: no task result is taken from the cache.
        PREFECT_TASKS_REFRESH_CACHE="true",
    )
    configure_environment(home)
    os.chdir(REPO_ROOT)

    from defectflow.config import load_config
    from defectflow.data.synthetic import generate_dataset

    synth = load_config(args.config).data.synth
    data_root = bench / "data" / "capsule"
    if not (data_root / "train").is_dir():
        generate_dataset(
            data_root,
            image_size=synth.image_size,
            n_train_good=synth.n_train_good,
            n_test_good=synth.n_test_good,
            n_per_defect=synth.n_per_defect,
            seed=synth.seed,
        )
    overrides = [
        f"data.root={data_root}",
        f"paths.runs={bench / 'runs'}",
        *BASE_OVERRIDES,
        *args.overrides,
    ]
    _print(
        {
            "what": "setup",
            "config": args.config,
            "overrides": overrides,
            "data": str(data_root),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "cpus": os.cpu_count(),
            "code": str(Path(sys.modules["defectflow"].__file__).parent),
        }
    )

    with prefect_server(bench) if args.api_url is None else _given(args.api_url) as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        times: dict[str, list[float]] = {"flow": [], "direct": []}
        stages: dict[str, dict[str, list[float]]] = {"flow": {}, "direct": {}}
        flow_outside_tasks: list[float] = []
        schedule = [("warmup", i) for i in range(args.warmup)] + [
            ("timed", i) for i in range(args.repeats)
        ]
        for kind, i in schedule:
            order = ("flow", "direct") if i % 2 == 0 else ("direct", "flow")
            for variant in order:
                watch = Stopwatch()
                start = time.perf_counter()
                if variant == "flow":
                    summary, flow_run_id = flow_pipeline(args.config, overrides)
                else:
                    summary = direct_pipeline(args.config, overrides, watch)
                seconds = time.perf_counter() - start
                row = {
                    "what": kind,
                    "variant": variant,
                    "i": i,
                    "seconds": round(seconds, 2),
                    "model": summary["model_tag"],
                    "accuracy": round(summary["metrics"]["accuracy"], 4),
                }
                if kind == "timed":
                    times[variant].append(seconds)
                    per_stage = watch.stages if variant == "direct" else task_breakdown(flow_run_id)
                    for name, value in per_stage.items():
                        stages[variant].setdefault(name, []).append(value)
                    if variant == "flow":
                        flow_outside_tasks.append(seconds - sum(per_stage.values()))
                        row["outside_tasks_s"] = round(flow_outside_tasks[-1], 2)
                _print(row)

    if not args.repeats:
        return 0
    median_flow = statistics.median(times["flow"])
    median_direct = statistics.median(times["direct"])
    overhead = 100.0 * (median_flow - median_direct) / median_direct
    per_stage = {
        name: {
            "direct_s": round(statistics.median(stages["direct"].get(name, [0.0])), 2),
            "flow_task_s": round(statistics.median(stages["flow"].get(name, [0.0])), 2),
        }
        for name in stages["direct"]
    }
    result = {
        "what": "orchestration overhead",
        "goal_percent": GOAL_PERCENT,
        "flow": _stats(times["flow"]),
        "direct": _stats(times["direct"]),
        "overhead_percent": round(overhead, 1),
        "overhead_seconds": round(median_flow - median_direct, 2),
        "verdict": "PASS" if overhead <= GOAL_PERCENT else "FAIL",
        "flow_outside_tasks_s": _stats(flow_outside_tasks),
        # Prefect's own time that no stage can hide: flow wall time outside its task runs.
        "outside_tasks_percent": round(
            100.0 * statistics.median(flow_outside_tasks) / median_direct, 1
        ),
        "stages_median": per_stage,
        "config": args.config,
        "overrides": overrides,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cpus": os.cpu_count(),
    }
    _print(result)
    record["result"] = result
    rows = [
        timing.row(
            "flow over direct calls, medians (%)",
            result["overhead_percent"],
            f"<= {GOAL_PERCENT:g}",
            overhead <= GOAL_PERCENT,
        ),
        timing.row("Prefect flow, wall min / median / max (s)", _spread(result["flow"])),
        timing.row(
            "the same tasks as plain functions, min / median / max (s)", _spread(result["direct"])
        ),
        timing.row(
            "flow time outside its task runs, median (s)",
            result["flow_outside_tasks_s"]["median"],
        ),
        timing.row(
            "flow time outside its task runs / direct median (%)", result["outside_tasks_percent"]
        ),
        timing.row(
            "timed runs per variant (after warm-up runs)", f"{args.repeats} ({args.warmup})"
        ),
    ]
    timing.finish(record, rows, args.out)
    print(
        f"flow   min/median/max {result['flow']['min']}/{result['flow']['median']}/{result['flow']['max']} s\n"
        f"direct min/median/max {result['direct']['min']}/{result['direct']['median']}/{result['direct']['max']} s\n"
        f"overhead {overhead:+.1f} % of the direct median (goal <= {GOAL_PERCENT:g} %): {result['verdict']}",
        file=sys.stderr,
    )
    return 0


def _spread(stats: dict) -> str:
    return f"{stats['min']} / {stats['median']} / {stats['max']}"


@contextmanager
def _given(api_url: str):
    yield api_url


if __name__ == "__main__":
    sys.exit(main())
