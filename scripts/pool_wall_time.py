#!/usr/bin/env python3
"""Wall time of a tiny training run on the process pool and on the Docker pool, side by side.

    python scripts/pool_wall_time.py [--runs 2] [--out FILE.json]

For each pool: `defectflow up` (--pool process, then --pool docker with the local training
image, `make image-train`) in a fresh data dir on a free port, the synthetic tiny dataset
(configs/tiny.yaml's sizes) in it, then `--runs` runs of `training-pipeline` one after the
other (config tiny, 1 epoch, no tuner trials, promotion on), each timed from the trigger to
Completed; the server's start and end times of the flow run too (the difference is the
worker's pickup and, on the Docker pool, the container's start); `defectflow down`. Prints a
table and writes JSON. Needs a running Docker daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = """
import json, sys
from prefect.deployments import run_deployment
print(run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=0).id)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEFECTFLOW_", "BENTOML_", "PREFECT_", "KERAS_"))
    }
    env["DEFECTFLOW_HOME"] = str(home)
    return env


def api(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        me = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(me)
        rss[me] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo += children.get(current, [])
    return total / 2**20


class PeakMemory:
    """Samples, every second, the memory of the flow runs: the process worker's descendants
    (process pool) or the stack's flow-run containers (Docker pool, `docker stats`)."""

    def __init__(self, home: Path, pool: str):
        import threading

        self.home, self.pool, self.peak = home, pool, 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> float:
        state = json.loads((self.home / "stack" / "stack.json").read_text())
        if self.pool == "process":
            worker = state["processes"]["worker"]["pid"]
            return _tree_rss_mb(worker) - _tree_rss_mb_self(worker)
        from defectflow.orchestration.stack import STACK_LABEL, stack_id

        ids = subprocess.run(
            ["docker", "ps", "-q", "--filter", f"label={STACK_LABEL}={stack_id(self.home)}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        total = 0.0
        for cid in ids:
            usage = (
                subprocess.run(
                    ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", cid],
                    capture_output=True,
                    text=True,
                )
                .stdout.split("/")[0]
                .strip()
            )
            for unit, factor in (("GiB", 1024), ("MiB", 1), ("KiB", 1 / 1024)):
                if usage.endswith(unit):
                    total += float(usage[: -len(unit)]) * factor
        return total

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.peak = max(self.peak, self.sample())
            self.stop.wait(1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)


def _tree_rss_mb_self(pid: int) -> float:
    try:
        return (
            int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[21])
            * os.sysconf("SC_PAGE_SIZE")
            / 2**20
        )
    except OSError:
        return 0.0


def measure(pool: str, runs: int, image: str) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"defectflow-wall-{pool}-"))
    env = env_for(home)
    port = free_port()
    try:
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from defectflow.data.synthetic import generate_dataset; "
                "generate_dataset(sys.argv[1], image_size=64, n_train_good=12, n_test_good=3, "
                "n_per_defect=4, seed=0)",
                str(home / "data" / "tiny"),
            ],
            env=env,
            check=True,
            timeout=300,
        )
        up = [str(BIN / "defectflow"), "up", "--port", str(port), "--pool", pool]
        if pool == "docker":
            up += ["--docker-workers", "1", "--image", image]
        done = subprocess.run(up, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise SystemExit(f"defectflow up failed:\n{done.stdout}{done.stderr}")
        params = {
            "config": "tiny",
            "data_root": str(home / "data" / "tiny"),
            "overrides": ["tune.epochs=1", "train.epochs=1"],
            "tuner_trials": 0,
        }
        rows = []
        for _ in range(runs):
            memory = PeakMemory(home, pool).__enter__()
            start = time.monotonic()
            run_id = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    RUN,
                    "training-pipeline/training-pipeline",
                    json.dumps(params),
                ],
                env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            ).stdout.split()[-1]
            while True:
                run = api(f"http://127.0.0.1:{port}/api/flow_runs/{run_id}")
                if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                time.sleep(0.5)
            wall = time.monotonic() - start
            memory.__exit__()
            if run["state_type"] != "COMPLETED":
                raise SystemExit(f"{pool}: run {run_id} ended {run['state_type']}: {run['state']}")
            flow = (
                datetime.fromisoformat(run["end_time"]) - datetime.fromisoformat(run["start_time"])
            ).total_seconds()
            rows.append(
                {
                    "trigger_to_completed_s": round(wall, 1),
                    "flow_run_s": round(flow, 1),
                    "flow_run_peak_memory_mib": round(memory.peak),
                }
            )
            print(f"{pool}: {rows[-1]}", flush=True)
        return {
            "pool": pool,
            "runs": rows,
            "median_trigger_to_completed_s": statistics.median(
                r["trigger_to_completed_s"] for r in rows
            ),
            "median_flow_run_s": statistics.median(r["flow_run_s"] for r in rows),
            "peak_memory_mib": max(r["flow_run_peak_memory_mib"] for r in rows),
        }
    finally:
        subprocess.run([str(BIN / "defectflow"), "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--image", default="defectflow-train:latest")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {
        "command": " ".join(["python scripts/pool_wall_time.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "load_before": os.getloadavg()[0],
        "pools": [measure(pool, args.runs, args.image) for pool in ("process", "docker")],
    }
    print(
        "\n| pool | trigger → Completed (median s) | flow run start → end (median s) "
        "| flow run peak memory (MiB) |"
    )
    print("|---|---|---|---|")
    for row in results["pools"]:
        print(
            f"| {row['pool']} | {row['median_trigger_to_completed_s']:.1f} | "
            f"{row['median_flow_run_s']:.1f} | {row['peak_memory_mib']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
