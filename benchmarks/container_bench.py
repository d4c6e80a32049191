"""Container benchmark: the serving container as shipped, beside `bentoml serve` in the venv and
the model in process, in one run (ratios, not absolute times).

    .venv/bin/python benchmarks/container_bench.py [BENTO_TAG] [--requests 100] [--warmup 10]
        [--concurrency 32] [--concurrent-requests 640] [--out JSON] [--keep-image]

BENTO_TAG: a Bento in the BentoML store (default: a fresh Bento of the registry's production
model in $DEFECTFLOW_HOME, what `make demo` trains: `scripts/container.py` production_bento). The
model is served as users serve it by default (what its model.json chose, e.g. TFLite in process
with its anomaly head; default serve settings): nothing is changed. The script builds the
image `defectflow-bench:<bento version>` as `make container` does (`scripts/container.py`
build_image: `bentoml containerize` on the local Debian base image, slimmed and flattened;
dockerd is started for the run when none answers, and stopped after), runs it on a free
127.0.0.1 port (`run_container`), and starts `bentoml serve BENTO_TAG` from the venv on another
(own process group, default settings, always stopped). The image is removed at the end unless
`--keep-image`. Image: the 512x512 capsule test image beside the repository when present, else a
synthetic 512x512 PNG (`serve_bench.sample_image`).

Measured, in this order:
1. concurrency 1, taking turns (one call each, the order alternating every round, after
   `--warmup` calls of each; `timing.take_turns`), so a load change hits all four alike:
   in process end to end (`Predictor.load(model folder).predict_bytes(png)` + `to_json` +
   `json.dumps`: decode -> answer JSON), the bare forward pass at batch 1 on an image already at
   the model's input size, POST /predict to the venv server, POST /predict to the container;
   `--requests` timed calls of each: p50/p99;
2. `--concurrency` asynchronous httpx clients, `--concurrent-requests` POST /predict in all,
   against the venv server, then against the container: images/s, p50/p99, errors.
Every HTTP answer is checked after its phase's clock stops (`scripts/container.py`
answer_problems: class, probabilities summing to 1, binary mask at the image's size, anomaly
score; and the Bento's model): a faulty answer counts as an error, not as a latency.
Also: the image's size, `docker run` to /readyz seconds, the venv server's start to /readyz,
both servers' RSS (process tree, host view) after warm-up and after the load.

Goals (2 cores): container /predict p50 at concurrency 1 <= 1.15 x the in-process end-to-end
p50; >= 60 images/s at 32 clients (venv server and container); zero errors. The ratios venv /
in process and container / venv are reported beside them. The HTTP client and the in-process
model run on the same cores as the servers (127.0.0.1). Other jobs share the machine: the
1-minute load average at the start and the end, and per phase the cores busy outside this
benchmark's processes (the container's processes and its docker-proxy count as ours, dockerd
does not). Prints JSON lines and a table; writes all figures, the goals and the provenance
(machine, date, commit, load) to `--out` (default `benchmarks/results/container_bench.json`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench  # noqa: E402
import timing  # noqa: E402
from serve_bench import (  # noqa: E402
    BIN,
    MB,
    REPO_ROOT,
    CpuShare,
    InProcess,
    _print,
    _stats,
    concurrent,
    tree_memory,
)
from timing import take_turns  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "defectflow_container", REPO_ROOT / "scripts" / "container.py"
)
container = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = container  # dataclasses look their module up there
_spec.loader.exec_module(container)

GOAL_CONTAINER_OVER_IN_PROCESS = 1.15
GOAL_IMAGES_PER_S = serve_bench.GOAL_IMAGES_PER_S
IMAGE_REPOSITORY = "defectflow-bench"


def answer_check(height: int, width: int, model_tag: str):
    """check(response) -> None, or what is wrong with a /predict answer for the benchmark image."""

    def check(response) -> str | None:
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        try:
            answer = response.json()
        except ValueError:
            return "not JSON"
        if not isinstance(answer, dict):
            return "not a JSON object"
        try:
            problems = container.answer_problems(answer, height, width)
        except Exception as exc:  # an answer malformed beyond what answer_problems expects
            problems = [f"unreadable answer: {type(exc).__name__}"]
        if answer.get("model") != model_tag:
            problems.append(f"served model {answer.get('model')!r}, not {model_tag}")
        return "; ".join(problems)[:160] or None

    return check


def resolve_bento(tag: str | None) -> str:
    """The exact tag of `tag` in the store, or a fresh Bento of the production model."""
    if tag is None:
        return container.production_bento()
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return str(bentoml.get(tag).tag)
    except NotFound:
        sys.exit(
            f"no Bento {tag} in the BentoML store {os.environ['BENTOML_HOME']} (`bentoml list`)"
        )


def docker_proxy_pids(port: int) -> list[int]:
    """The docker-proxy processes forwarding 127.0.0.1:`port` (the published port's path)."""
    if serve_bench.psutil is None:
        return []
    pids = []
    for process in serve_bench.psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if process.info.get("name") == "docker-proxy" and str(port) in cmdline:
            pids.append(process.pid)
    return pids


def container_pids(docker, running) -> list[int]:
    """Host pids to account the container by: its main process (the tree below it) and its
    docker-proxy."""
    main = int(docker.out("inspect", "--format", "{{.State.Pid}}", running.name))
    return [main, *docker_proxy_pids(int(running.url.rsplit(":", 1)[1]))]


def bench_turns(
    model: InProcess, urls: dict[str, str], png: bytes, check, args, cpu: CpuShare
) -> dict:
    """Concurrency 1, in turns: in process end to end, bare forward, POST /predict to each server."""
    import httpx

    files = serve_bench._files(png)
    answers: dict[str, list] = {name: [] for name in urls}

    def post(name: str, client):
        def call() -> None:
            try:
                answers[name].append(client.post(f"{urls[name]}/predict", files=files()))
            except httpx.HTTPError as exc:
                answers[name].append(exc)

        return call

    with contextlib.ExitStack() as stack:
        clients = {name: stack.enter_context(httpx.Client(timeout=120)) for name in urls}
        calls = {
            "in_process_e2e": model.endpoint_work,
            "bare_forward": model.bare_forward,
            **{f"{name}_http": post(name, clients[name]) for name in urls},
        }
        with cpu.phase("concurrency 1, in turns"):
            times = take_turns(calls, args.requests, args.warmup)
    result: dict = {
        "in_process_e2e": _stats(times["in_process_e2e"]),
        "bare_forward": _stats(times["bare_forward"]),
    }
    for name in urls:
        ok, errors = [], {}
        # take_turns makes the warm-up calls first: the timed answers are the last `requests`.
        for ms, response in zip(times[f"{name}_http"], answers[name][args.warmup :], strict=True):
            problem = (
                type(response).__name__ if isinstance(response, Exception) else check(response)
            )
            if problem:
                errors[problem] = errors.get(problem, 0) + 1
            else:
                ok.append(ms)
        warmup_errors = sum(
            1 for r in answers[name][: args.warmup] if isinstance(r, Exception) or check(r)
        )
        result[f"{name}_http"] = {
            **_stats(ok),
            "errors": sum(errors.values()),
            "error_kinds": errors,
            "warmup_errors": warmup_errors,
        }
    for name, what in (
        (
            "in_process_e2e",
            "in process: predict_bytes + to_json + json.dumps (decode -> answer JSON)",
        ),
        ("bare_forward", "in process: bare forward, batch 1, image at input size"),
        *((f"{name}_http", f"HTTP POST /predict to the {name} server") for name in urls),
    ):
        _print({"what": f"{what}, concurrency 1, in turns", **result[name]})
    return result


def goals(results: dict, concurrency: int) -> list[dict]:
    """Every figure with its goal (None: reported, no goal) and whether it was met."""
    c1 = results["concurrency_1"]
    e2e, bare = c1["in_process_e2e"]["p50_ms"], c1["bare_forward"]["p50_ms"]
    venv, box = c1["venv_http"], c1["container_http"]
    ratio = round(box["p50_ms"] / e2e, 3) if box.get("p50_ms") else None
    rows = [
        ("in process end to end p50, c1 (decode -> answer JSON) (ms)", e2e, None, None),
        ("in process end to end p99, c1 (ms)", c1["in_process_e2e"]["p99_ms"], None, None),
        ("bare forward p50, batch 1 (ms)", bare, None, None),
        ("bare forward p99, batch 1 (ms)", c1["bare_forward"]["p99_ms"], None, None),
        ("venv bentoml serve /predict p50, c1 (ms)", venv.get("p50_ms"), None, None),
        ("venv bentoml serve /predict p99, c1 (ms)", venv.get("p99_ms"), None, None),
        ("container /predict p50, c1 (ms)", box.get("p50_ms"), None, None),
        ("container /predict p99, c1 (ms)", box.get("p99_ms"), None, None),
        (
            "container p50 / in process end to end p50",
            ratio,
            f"<= {GOAL_CONTAINER_OVER_IN_PROCESS}",
            ratio is not None and ratio <= GOAL_CONTAINER_OVER_IN_PROCESS,
        ),
        (
            "venv p50 / in process end to end p50",
            round(venv["p50_ms"] / e2e, 3) if venv.get("p50_ms") else None,
            None,
            None,
        ),
        (
            "container p50 / venv p50",
            round(box["p50_ms"] / venv["p50_ms"], 3)
            if box.get("p50_ms") and venv.get("p50_ms")
            else None,
            None,
            None,
        ),
        ("in process end to end p50 / bare forward p50", round(e2e / bare, 2), None, None),
        (
            "errors, c1 (venv + container)",
            venv["errors"] + box["errors"],
            "0",
            venv["errors"] + box["errors"] == 0,
        ),
    ]
    for name, label in (("venv", "venv bentoml serve"), ("container", "container")):
        cc = results[f"{name}_concurrent"]
        rows += [
            (
                f"{label} /predict, c{concurrency} (images/s)",
                cc["images_per_s"],
                f">= {GOAL_IMAGES_PER_S:g}",
                cc["images_per_s"] >= GOAL_IMAGES_PER_S,
            ),
            (f"{label} /predict p50, c{concurrency} (ms)", cc.get("p50_ms"), None, None),
            (f"{label} /predict p99, c{concurrency} (ms)", cc.get("p99_ms"), None, None),
            (f"{label} errors, c{concurrency}", cc["errors"], "0", cc["errors"] == 0),
        ]
    venv_rate = results["venv_concurrent"]["images_per_s"]
    rows += [
        (
            f"container / venv images/s, c{concurrency}",
            round(results["container_concurrent"]["images_per_s"] / venv_rate, 3)
            if venv_rate
            else None,
            None,
            None,
        ),
        ("image size (MB)", results["image"]["size_mb"], None, None),
        (
            "bentoml containerize alone, before slimming (MB)",
            results["image"]["containerize_size_mb"],
            None,
            None,
        ),
        (
            "image build (s), base image "
            + ("built in this run" if results["image"]["base_built_now"] else "already present"),
            results["image"]["build_s"],
            None,
            None,
        ),
        ("docker run to /readyz (s)", results["image"]["run_to_ready_s"], None, None),
        (
            "venv bentoml serve start to /readyz (s)",
            results["venv"]["start_to_ready_s"],
            None,
            None,
        ),
    ]
    memory = results["memory"]
    for name, label in (
        ("venv", "venv server"),
        ("container", "container (with its docker-proxy)"),
    ):
        rows.append(
            (
                f"{label} RSS after warm-up -> after load (MB, host view)",
                f"{memory[f'{name}_after_warmup']['rss_mb']} -> {memory[f'{name}_after_load']['rss_mb']}",
                None,
                None,
            )
        )
    return [{"figure": f, "measured": m, "goal": g, "met": met} for f, m, g, met in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "bento_tag",
        nargs="?",
        help="a Bento in the store (default: a fresh Bento of the registry's production model)",
    )
    parser.add_argument(
        "--requests", type=int, default=100, help="timed calls of each at concurrency 1"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls of each first")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--concurrent-requests",
        type=int,
        default=640,
        help="requests to each server at --concurrency",
    )
    timing.add_out_option(parser, "container_bench", argv is None)
    parser.add_argument(
        "--keep-image", action="store_true", help="keep the benchmark's image (default: removed)"
    )
    args = parser.parse_args(argv)
    if args.requests < 100:
        print(
            f"note: --requests {args.requests} < 100: p99 at concurrency 1 rests on few samples",
            flush=True,
        )

    home = configure_environment()
    png, image_source = serve_bench.sample_image(None)
    import cv2
    import numpy as np

    height, width = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
    cpu = CpuShare()
    results = timing.start("container_bench", argv, args)
    provenance = results["provenance"]
    results.update(
        {
            "psutil": serve_bench.psutil is not None,
            # A fresh Bento packs the working tree: tracked serving files that differ from the commit.
            "serving_files_modified": timing.git(
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "service.py",
                "bentofile.yaml",
                "src/defectflow",
            ).splitlines(),
            "input": {"source": image_source, "bytes": len(png), "width": width, "height": height},
        }
    )
    _print(
        {
            "what": "setup",
            "cpus": provenance["machine"]["cores"],
            "load_avg_1m_start": provenance["load_avg_before"][0],
            "git_commit": provenance["git_commit"],
            "serving_files_modified": results["serving_files_modified"],
            **results["input"],
        }
    )

    bento = resolve_bento(args.bento_tag)
    from defectflow import registry

    model_tag = container._bento_model(bento, None)
    model_dir = registry.model_dir(model_tag)
    results["model"] = {
        "bento": bento,
        "tag": model_tag,
        "path": str(model_dir),
        "fresh_bento": not args.bento_tag,
    }
    _print({"what": "model", **results["model"]})
    check = answer_check(height, width, model_tag)
    image = f"{IMAGE_REPOSITORY}:{bento.split(':', 1)[1]}"
    state = container._state_dir()

    try:
        with (
            container.engine(state) as docker,
            tempfile.TemporaryDirectory(prefix="defectflow-container-bench-") as tmp,
        ):
            tmp = Path(tmp)
            try:
                base = container.ensure_base_image(docker, container.bentofile_base_image())
                built = container.build_image(
                    docker, bento, image, log_file=state / "container_bench-containerize.log"
                )
                results["image"] = {
                    "image": image,
                    "size_mb": round(built["size"] / MB, 1),
                    "containerize_size_mb": round(built["containerize_size"] / MB, 1),
                    "build_s": round(built["seconds"], 1),
                    "base": base["image"],
                    "base_built_now": base["built"],
                    "docker_buildkit": docker.buildkit,
                    "dockerd_started_here": docker.started_daemon,
                }
                _print({"what": "image built", **results["image"]})

                with container.run_container(docker, image) as running:
                    results["image"]["run_to_ready_s"] = round(running.ready_seconds, 1)
                    _print(
                        {
                            "what": "container ready",
                            "url": running.url,
                            "run_to_ready_s": results["image"]["run_to_ready_s"],
                        }
                    )
                    port = serve_bench.free_port()
                    env = serve_bench.server_env(home)
                    env["BENTOML_HOME"] = os.environ["BENTOML_HOME"]  # the store holding the Bento
                    command = [
                        str(BIN / "bentoml"),
                        "serve",
                        bento,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ]
                    # Served from an empty folder: the Bento's own files, not the checkout's.
                    (tmp / "cwd").mkdir()
                    with serve_bench.server(
                        command, env, tmp / "venv.log", "/readyz", port, cwd=tmp / "cwd"
                    ) as (venv_url, proc, ready_s):
                        results["venv"] = {"start_to_ready_s": ready_s}
                        _print(
                            {
                                "what": "venv bentoml serve ready",
                                "url": venv_url,
                                "start_to_ready_s": ready_s,
                            }
                        )
                        box_pids = container_pids(docker, running)
                        cpu.roots += [proc.pid, *box_pids]
                        results["image"]["host_pids"] = box_pids
                        results.update(
                            measure(
                                args,
                                png,
                                check,
                                model_dir,
                                cpu,
                                {
                                    "venv": (venv_url, [proc.pid]),
                                    "container": (running.url, box_pids),
                                },
                            )
                        )
            finally:
                if not args.keep_image:
                    docker("rmi", "--force", image, check=False)
                    _print({"what": "image removed", "image": image})
    except container.EngineUnavailable as exc:
        print(f"container engine unavailable: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    results["cpu_share"] = cpu.phases
    results["busy"] = serve_bench.busy_note(provenance["load_avg_before"][0], cpu.phases)
    rows = goals(results, args.concurrency)
    timing.finish(results, rows, args.out)
    print_table(results, rows)
    return 0


def _memory(pids: list[int]) -> dict:
    """RSS (and PSS) in MB summed over the process trees of `pids`."""
    rows = [tree_memory(pid) for pid in pids]
    return {
        "rss_mb": round(sum(r["rss_mb"] for r in rows), 1),
        "pss_mb": round(sum(r.get("pss_mb", 0) for r in rows), 1),
        "n_processes": sum(r["n_processes"] for r in rows),
        "processes": [p for r in rows for p in r["processes"]],
    }


def measure(
    args,
    png: bytes,
    check,
    model_dir: Path,
    cpu: CpuShare,
    servers: dict[str, tuple[str, list[int]]],
) -> dict:
    """The two phases against the running servers ({name: (url, host pids)}), the model in process."""
    files = serve_bench._files(png)
    urls = {name: url for name, (url, _) in servers.items()}
    result: dict = {}
    # Warm-up: a burst at full concurrency on each (threads, connections, first allocations).
    for name, url in urls.items():
        warm = concurrent(
            f"{url}/predict", files, args.concurrency, count=args.concurrency, check=check
        )
        _print(
            {
                "what": f"warm-up burst, {name}",
                "requests": warm["requests"],
                "errors": warm["errors"],
                "error_kinds": warm["error_kinds"],
            }
        )
    time.sleep(2)
    for name, (_, pids) in servers.items():
        memory = _memory(pids)
        _print({"what": f"{name} server memory after warm-up (host view)", **memory})
        result.setdefault("memory", {})[f"{name}_after_warmup"] = memory

    model = InProcess(model_dir, png)
    result["in_process"] = {
        "format": model.predictor.format,
        "load_s": model.load_s,
        "input_size": model.predictor.info.input_size,
        "anomaly_head": model.predictor.has_anomaly_head,
    }
    _print({"what": "in-process model", **result["in_process"]})
    result["concurrency_1"] = bench_turns(model, urls, png, check, args, cpu)

    for name, url in urls.items():
        with cpu.phase(f"{name} c{args.concurrency}"):
            cc = concurrent(
                f"{url}/predict",
                files,
                args.concurrency,
                count=args.concurrent_requests,
                phase="concurrent",
                check=check,
            )
        result[f"{name}_concurrent"] = cc
        _print(
            {
                "what": f"HTTP POST /predict to the {name} server, concurrency {args.concurrency}",
                **cc,
            }
        )
    for name, (_, pids) in servers.items():
        result["memory"][f"{name}_after_load"] = _memory(pids)
    return result


def print_table(results: dict, rows: list[dict]) -> None:
    serve_bench.print_goal_rows(rows)
    print(
        f"\nserved: {results['model']['tag']} (Bento {results['model']['bento']}) as "
        f"{results['in_process']['format']}; image {results['image']['image']}"
        f"{' (kept)' if results['settings']['keep_image'] else ' (removed)'}"
    )
    print(
        serve_bench.machine_line(results)
        + "; cores busy in other jobs per phase: "
        + ", ".join(f"{k} {v['other_jobs_cores']}" for k, v in results["cpu_share"].items())
    )
    if results["busy"]:
        print(
            f"NOTE: the machine was busy with other jobs ({results['busy']}): latencies and throughput are "
            "lower than on an idle machine."
        )
    missed = [r["figure"] for r in rows if r["met"] is False]
    print(f"goals missed: {', '.join(missed)}" if missed else "all goals met")


if __name__ == "__main__":
    sys.exit(main())
