"""Serving benchmark: the defectflow service over HTTP on 127.0.0.1 against its bare model, its
goals, and a ConvNeXt-Tiny + U-Net baseline served side by side, all in one run.

    .venv/bin/python benchmarks/serve_bench.py [MODEL_DIR] [--image PNG]
        [--serving-format auto|keras|tflite] [--requests 120] [--concurrency 32]
        [--concurrent-requests 640] [--load-seconds 60] [--baseline-requests 30] [--no-baseline]
        [--out JSON] [--logs DIR]

MODEL_DIR: a trained model folder (default: `$DEFECTFLOW_HOME/runs/capsule-seed44/model`, the
256-px capsule model, when present). It is copied to a temporary folder and only the copy is
touched: model.keras re-saved without optimizer state (as `save_artifact` writes it) and, when
the folder has no model.tflite, exported as the pipeline does (`defectflow.training.export.export_compact`
on the run's test split, `configs/default.yaml` export section: TFLite float16, served when it
passes parity and is faster; without the run's manifest the export is served unchecked). The
copy is saved into a temporary DEFECTFLOW_HOME model store, promoted, and
`bentoml serve service:DefectInspection` runs from the repository root on a free 127.0.0.1 port
(own process group, always stopped) with DEFECTFLOW_MODEL_TAG pinned to it.
Image: a 512x512 capsule test image (`../shared/data/mvtec_capsule/capsule/test/crack/000.png`
beside the repository) when present, else a synthetic 512x512 PNG; nothing is copied here.

Measured, in this order (each HTTP phase after untimed warm-up requests):
1. in process, the format the service loads (`Predictor.load(model_dir)`), taking turns: the
   bare forward pass at batch 1 (`Predictor.raw_outputs` on an image already at the model's
   input size), `predict_arrays` on the decoded image, `predict_bytes` + `to_json` + JSON (the
   endpoint's work), and the same split into stages (decode, resize, forward, mask resize and
   threshold, mask PNG + base64, JSON);
2. the server: start-to-ready time; RSS of its whole process tree (sum over processes; PSS too,
   which counts pages shared between them once) at idle after warm-up, sampled every second
   during the load phases, and after them; GET /livez at concurrency 1 (the bare round trip);
   POST /predict at concurrency 1 (`--requests`, p50/p99) in turns with the in-process bare
   forward pass, which is the goal's reference (a load change hits both alike); POST /predict
   at `--concurrency` (asynchronous httpx clients, `--concurrent-requests` requests: p50/p99 and
   images/s) with the requests per forward call the model service's adaptive batcher merged
   (BentoML's `adaptive_batch_size` histogram on /metrics); POST /predict_batch (repeated
   multipart field `images`, `--batch-images` per call) when /docs.json lists it, else a note;
   per phase, where the server spends the time, from its log (requests carry their phase in
   X-Request-ID): the HTTP service's access-log time, the /predict handler's own latency (its
   JSON line) and the model service's /forward access-log time;
3. a `--load-seconds` load run at `--concurrency` clients: errors, p50/p99, p99/p50, images/s,
   server RSS right before and right after (growth %) and its least-squares trend;
4. the baseline (`benchmarks/baseline_convnext_app.py`: ConvNeXt-Tiny + U-Net at 512x512,
   random weights, plain FastAPI under uvicorn with 1 worker, same /predict contract), started
   next to the still running service: both answer `--baseline-requests` requests at
   concurrency 1 in turns (one baseline request, then one defectflow request), so a load change
   on the shared machine hits both alike; ratio = baseline p50 / defectflow p50.

Goals: HTTP /predict p50 at concurrency 1 <= 1.3 x bare forward p50; >= 60 images/s at
concurrency 32; server RSS <= 500 MB (10^6 bytes; judged on the largest value seen); baseline
p50 / defectflow p50 >= 5; load run: zero errors, p99 <= 5 x p50, RSS growth <= 5 %.
The HTTP client runs on the same 2 cores as the server (127.0.0.1), as any local client would.
Other jobs share this machine: the 1-minute load average is printed at the start and the end,
and for every phase the CPU cores busy outside this benchmark's own processes (/proc/stat minus
the benchmark's and servers' CPU time); the output says so when that is high. Prints JSON lines
and a table; writes all figures, the goals and the provenance (machine, date, commit, load) to
`--out` (default `benchmarks/results/serve_bench.json`); `--logs DIR` keeps the servers' logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import timing  # noqa: E402
from timing import take_turns  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402

DEFAULT_IMAGE = (
    REPO_ROOT.parent
    / "shared"
    / "data"
    / "mvtec_capsule"
    / "capsule"
    / "test"
    / "crack"
    / "000.png"
)
BIN = Path(sys.executable).parent
MB = 1e6

REQUEST_ID_PREFIX = "serve-bench-"

GOAL_HTTP_OVER_FORWARD = 1.3
GOAL_IMAGES_PER_S = 60.0
GOAL_RSS_MB = 500.0
GOAL_BASELINE_RATIO = 5.0
GOAL_TAIL_RATIO = 5.0
GOAL_RSS_GROWTH_PCT = 5.0
#: Cores busy outside this benchmark above which its figures are flagged as taken under load.
BUSY_OTHERS_CORES = 0.5

_SAVE_AND_PROMOTE = """
import json, sys
from pathlib import Path
from defectflow.environment import configure_environment
configure_environment()
from defectflow import registry
tag = registry.save_model(Path(sys.argv[1]), "defectflow", {"benchmark": "serve_bench", "source": sys.argv[2]})
registry.promote(tag, reason="serve_bench: temporary store")
print(json.dumps({"tag": tag, "path": str(registry.model_dir(tag))}))
"""


def _print(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def _stats(ms: list[float]) -> dict:
    import numpy as np

    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "min_ms": round(min(ms), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


# --- processes: tree, memory, CPU (psutil when installed, else /proc) ---------------------------

try:
    import psutil
except ImportError:  # pragma: no cover - psutil comes with BentoML
    psutil = None

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: What reading a process that exited meanwhile raises.
_PROCESS_GONE = (OSError, LookupError, *((psutil.Error,) if psutil is not None else ()))


def _tree_pids(root: int) -> list[int]:
    """`root` and all its descendants, alive now."""
    if psutil is not None:
        try:
            return [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]
        except psutil.NoSuchProcess:
            return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            pids.append(pid)
            todo += children.get(pid, [])
    return pids


def _rss_bytes(pid: int) -> int:
    if psutil is not None:
        return psutil.Process(pid).memory_info().rss
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _pss_bytes(pid: int) -> int:
    if psutil is not None:
        return psutil.Process(pid).memory_full_info().pss
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int) -> float:
    if psutil is not None:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _name(pid: int) -> str:
    try:
        args = [
            c.decode(errors="replace")
            for c in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if c
        ]
    except OSError:
        return "?"
    name = " ".join(Path(a).name if i < 2 else a for i, a in enumerate(args[:4]))
    if "--service-name" in args[:-1]:  # a BentoML worker: which service it runs
        name += f" [{args[args.index('--service-name') + 1]}]"
    return name[:160]


def tree_memory(root: int, with_pss: bool = True) -> dict:
    """RSS (and PSS) in MB summed over the process tree of `root`, with each process's RSS."""
    processes, rss, pss = [], 0, 0
    for pid in _tree_pids(root):
        try:
            process_rss = _rss_bytes(pid)
            pss += _pss_bytes(pid) if with_pss else 0
        except _PROCESS_GONE:
            continue  # exited meanwhile
        rss += process_rss
        processes.append({"pid": pid, "rss_mb": round(process_rss / MB, 1), "cmd": _name(pid)})
    row = {"rss_mb": round(rss / MB, 1), "n_processes": len(processes), "processes": processes}
    if with_pss:
        row["pss_mb"] = round(pss / MB, 1)
    return row


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process) since boot."""
    if psutil is not None:
        times = psutil.cpu_times()
        return (
            sum(times)
            - times.idle
            - getattr(times, "iowait", 0.0)
            - getattr(times, "guest", 0.0)
            - getattr(times, "guest_nice", 0.0)
        )
    user, nice, system, _idle, _iowait, irq, softirq, steal, *_ = map(
        int, Path("/proc/stat").read_text().split()[1:11]
    )
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class CpuShare:
    """Per phase: cores busy machine-wide, in this benchmark's processes (of which this one, the
    client and in-process model, and the servers), and elsewhere."""

    def __init__(self) -> None:
        self.roots: list[int] = [os.getpid()]
        self.phases: dict[str, dict] = {}

    def _ours(self) -> dict[int, float]:
        seconds = {}
        for root in self.roots:
            for pid in [root] if root == os.getpid() else _tree_pids(root):
                try:
                    seconds[pid] = _cpu_seconds(pid)
                except _PROCESS_GONE:
                    continue
        return seconds

    @contextmanager
    def phase(self, name: str):
        ours_before, busy_before, started = (
            self._ours(),
            _machine_busy_seconds(),
            time.perf_counter(),
        )
        yield
        wall = time.perf_counter() - started
        ours_after, busy_after = self._ours(), _machine_busy_seconds()
        ours = sum(ours_after[pid] - ours_before.get(pid, 0.0) for pid in ours_after)
        client = ours_after.get(os.getpid(), 0.0) - ours_before.get(os.getpid(), 0.0)
        busy = busy_after - busy_before
        row = {
            "wall_s": round(wall, 1),
            "machine_busy_cores": round(busy / wall, 2),
            "benchmark_cores": round(ours / wall, 2),
            "of_which_this_process_cores": round(client / wall, 2),
            "other_jobs_cores": round(max(busy - ours, 0.0) / wall, 2),
            "load_avg_1m": timing.load_avg()[0],
        }
        self.phases[name] = row
        _print({"what": "cpu share", "phase": name, **row})


def busy_note(load_avg_start: float, phases: dict[str, dict]) -> str:
    """Why the figures were taken on a busy machine (a 1-minute load average >= 1 at the start,
    other jobs' cores per `CpuShare` phase); empty when it was not."""
    busy_phases = {
        k: v["other_jobs_cores"]
        for k, v in phases.items()
        if v["other_jobs_cores"] >= BUSY_OTHERS_CORES
    }
    busy = []
    if load_avg_start >= 1.0:
        busy.append(f"1-minute load average {load_avg_start} before the benchmark started")
    if busy_phases:
        busy.append(
            "other jobs kept "
            + ", ".join(f"{v} cores busy during {k}" for k, v in busy_phases.items())
        )
    return "; ".join(busy)


# --- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> float:
    """Seconds until `url` answers 200; SystemExit if the process dies or time runs out."""
    import httpx

    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            sys.exit(
                f"{' '.join(map(str, proc.args[:4]))} exited {proc.returncode} before answering {url}:\n"
                + _log_tail(log)
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        if time.monotonic() - start > timeout:
            sys.exit(f"{url} did not answer within {timeout:.0f} s:\n" + _log_tail(log))
        time.sleep(0.25)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, with its whole process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def server(
    command: list[str],
    env: dict[str, str],
    log: Path,
    ready_path: str,
    port: int,
    timeout: float = 300,
    cwd: Path = REPO_ROOT,
):
    """Run `command` in `cwd` (own process group, output to `log`) until its `ready_path`
    answers; yields (url, process, seconds to ready); always stopped."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        seconds = wait_ready(url + ready_path, proc, timeout, log)
        yield url, proc, round(seconds, 1)
    finally:
        stop(proc)


def server_env(home: Path, model_tag: str | None = None) -> dict[str, str]:
    """This environment without any DEFECTFLOW_/BENTOML_/PREFECT_/KERAS_ setting (so no API token
    or serve overrides apply), on the temporary DEFECTFLOW_HOME."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEFECTFLOW_", "BENTOML_", "PREFECT_", "KERAS_"))
    }
    env.update(
        DEFECTFLOW_HOME=str(home),
        BENTOML_HOME=str(home / "bentoml"),
        KERAS_HOME=str(home / "keras"),
        PREFECT_HOME=str(home / "prefect"),
        BENTOML_DO_NOT_TRACK="true",
        DO_NOT_TRACK="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
    )
    if model_tag:
        env["DEFECTFLOW_MODEL_TAG"] = model_tag
    return env


# --- HTTP load -----------------------------------------------------------------------------------


def _answer_ok(response, images: int) -> str | None:
    """None when `response` is a 200 with `images` predictions, else what is wrong with it."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    if images == 1:
        return None if isinstance(body, dict) and "class" in body else "no class in answer"
    answers = (
        body
        if isinstance(body, list)
        else next((v for v in body.values() if isinstance(v, list)), None)
    )
    return None if answers is not None and len(answers) == images else f"not {images} predictions"


def _request_id(phase: str, number: int) -> dict:
    """The X-Request-ID header that tags a request with its phase (the service logs it)."""
    return {"x-request-id": f"{REQUEST_ID_PREFIX}{phase}-{number}"}


def sequential(
    url: str, files, repeats: int, warmup: int, method: str = "POST", phase: str = "warmup"
) -> list[float]:
    """ms per request, one at a time, after `warmup` untimed ones; SystemExit on a failed answer."""
    import httpx

    times = []
    with httpx.Client(timeout=120) as client:
        for i in range(warmup + repeats):
            headers = _request_id(phase if i >= warmup else "warmup", i)
            start = time.perf_counter()
            response = (
                client.post(url, files=files(), headers=headers)
                if method == "POST"
                else client.get(url, headers=headers)
            )
            elapsed = (time.perf_counter() - start) * 1000
            problem = (
                _answer_ok(response, 1)
                if method == "POST"
                else (None if response.status_code == 200 else f"HTTP {response.status_code}")
            )
            if problem:
                sys.exit(f"{method} {url}: {problem}: {response.text[:500]}")
            if i >= warmup:
                times.append(elapsed)
    return times


async def _concurrent(
    url: str,
    files,
    images_per_request: int,
    concurrency: int,
    count: int | None,
    seconds: float | None,
    phase: str,
    check=None,
) -> dict:
    import httpx

    latencies: list[float] = []
    errors: Counter = Counter()
    to_check: list[tuple[float, object]] = []  # (ms, response) for `check`, after the clock stops
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        started = time.perf_counter()
        deadline = started + seconds if seconds else None

        async def client_loop() -> None:
            nonlocal issued
            while (count is None or issued < count) and (
                deadline is None or time.perf_counter() < deadline
            ):
                issued += 1
                headers = _request_id(phase, issued)
                start = time.perf_counter()
                try:
                    response = await client.post(url, files=files(), headers=headers)
                    problem = _answer_ok(response, images_per_request) if check is None else None
                except httpx.HTTPError as exc:
                    problem = type(exc).__name__
                if problem:
                    errors[problem] += 1
                elif check is None:
                    latencies.append((time.perf_counter() - start) * 1000)
                else:
                    to_check.append(((time.perf_counter() - start) * 1000, response))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    for ms, response in to_check:
        problem = check(response)
        if problem:
            errors[problem] += 1
        else:
            latencies.append(ms)
    return {
        "concurrency": concurrency,
        "requests": issued,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "wall_s": round(wall, 2),
        "images_per_s": round(len(latencies) * images_per_request / wall, 1),
        "requests_per_s": round(len(latencies) / wall, 1),
        **_stats(latencies),
    }


def concurrent(
    url: str,
    files,
    concurrency: int,
    count: int | None = None,
    seconds: float | None = None,
    images_per_request: int = 1,
    phase: str = "warmup",
    check=None,
) -> dict:
    """`concurrency` clients posting back to back, `count` requests in all or for `seconds`.
    `check(response)` (None, or what is wrong with it) replaces the default answer check and
    runs after the load, outside the timed requests; the answers it faults count as errors."""
    return asyncio.run(
        _concurrent(url, files, images_per_request, concurrency, count, seconds, phase, check)
    )


def adaptive_batches(url: str) -> dict | None:
    """Forward calls the model service's adaptive batcher has made so far and the calls to it
    they merged (BentoML's `adaptive_batch_size` histogram on /metrics: requests per batch, not
    images; a /predict_batch call is one request), or None when /metrics does not show it."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    totals = {"batches": 0.0, "requests": 0.0}
    found = False
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if line.startswith("#") or "adaptive_batch_size" not in name:
            continue
        if name.endswith("_count") or name.endswith("_sum"):
            found = True
            totals["batches" if name.endswith("_count") else "requests"] += float(
                line.rsplit(" ", 1)[1]
            )
    return totals if found else None


def batching_during(before: dict | None, after: dict | None) -> dict:
    if before is None or after is None:
        return {"note": "/metrics shows no adaptive_batch_size histogram"}
    batches, requests = after["batches"] - before["batches"], after["requests"] - before["requests"]
    return {
        "forward_calls": int(batches),
        "requests_merged": int(requests),
        "mean_requests_per_forward_call": round(requests / batches, 2) if batches else None,
    }


_ACCESS_LINE = re.compile(r"path=(/[\w/]+)[,)].*\(status=(\d+)[^)]*\) ([\d.]+)ms")


def server_side_latency(log: Path) -> dict[str, dict]:
    """Per phase, from the service's log: `handler` (its JSON line per request: upload received
    to answer ready), `entry` (BentoML's access log of the HTTP service: the request as the
    server handled it, multipart parsing included) and `model_forward` (the access log of the
    model service's /forward: the forward pass as that service handled it, batching wait
    included). Requests carry their phase in X-Request-ID; access lines, which do not, count for
    the phase of the nearest prediction line (the one before an /predict line, the one after a
    /forward line; phases run one after the other, so only their edges can be misplaced)."""
    by_phase: dict[str, dict[str, list[float]]] = {}
    pending_forward: list[float] = []
    phase = None
    for line in log.read_text(errors="replace").splitlines():
        access = _ACCESS_LINE.search(line) if "(scheme=" in line else None
        if access:
            path, status, ms = access.group(1), int(access.group(2)), float(access.group(3))
            if status != 200:
                continue
            if path == "/forward":
                pending_forward.append(ms)
            elif path in ("/predict", "/predict_batch") and phase:
                by_phase[phase].setdefault("entry", []).append(ms)
            continue
        start = line.find("{")
        if start < 0 or '"prediction"' not in line:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        request_id = str(record.get("request_id", ""))
        if record.get("status") != 200 or not request_id.startswith(REQUEST_ID_PREFIX):
            phase = None
            continue
        phase = request_id[len(REQUEST_ID_PREFIX) :].split("/")[0].rsplit("-", 1)[0]
        figures = by_phase.setdefault(phase, {})
        figures.setdefault("model_forward", []).extend(pending_forward)
        pending_forward = []
        if "/" not in request_id or request_id.endswith("/0"):
            # /predict_batch logs each image with the call's latency: count the call once
            figures.setdefault("handler", []).append(float(record["latency_ms"]))
    return {
        name: {kind: _stats(ms) for kind, ms in figures.items()}
        for name, figures in by_phase.items()
        if name != "warmup"
    }


def _slope_per_minute(samples: list[float], interval_s: float) -> float | None:
    """Least-squares slope of evenly spaced samples, per minute (a steady climb vs a plateau)."""
    import numpy as np

    if len(samples) < 3:
        return None
    return round(float(np.polyfit(np.arange(len(samples)) * interval_s / 60, samples, 1)[0]), 2)


class MemorySampler:
    """Samples the RSS of a process tree every `interval` seconds in a thread."""

    def __init__(self, root: int, interval: float = 1.0) -> None:
        self.root, self.interval, self.samples = root, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(tree_memory(self.root, with_pss=False)["rss_mb"])

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --- inputs ------------------------------------------------------------------------------------


def sample_image(path: Path | None) -> tuple[bytes, str]:
    """PNG bytes of the benchmark image and where they came from (never copied anywhere)."""
    import cv2
    import numpy as np

    path = path or (DEFAULT_IMAGE if DEFAULT_IMAGE.is_file() else None)
    if path is not None:
        if not path.is_file():
            sys.exit(f"--image {path}: no such file")
        return path.read_bytes(), str(path)
    # A capsule-like 512x512 picture: a two-tone capsule on grey with a dark crack.
    rng = np.random.default_rng(0)
    image = np.full((512, 512, 3), 60, np.uint8) + rng.integers(0, 8, (512, 512, 3), dtype=np.uint8)
    cv2.ellipse(image, (256, 256), (200, 90), 0, 0, 360, (40, 160, 200), -1)
    cv2.ellipse(image, (256, 256), (200, 90), 0, 90, 270, (230, 230, 230), -1)
    cv2.line(image, (300, 200), (340, 280), (20, 20, 20), 3)
    ok, png = cv2.imencode(".png", image)
    assert ok
    return png.tobytes(), f"synthetic 512x512 PNG (no capsule image at {DEFAULT_IMAGE})"


def prepare_model(model_dir: Path, work: Path, serving_format: str) -> dict:
    """Copy `model_dir` to `work`, re-save model.keras without optimizer state, export TFLite when
    missing and set the serving format; returns what was done."""
    import keras

    import defectflow.models.losses  # noqa: F401  (custom objects model.keras names)
    import defectflow.models.unet  # noqa: F401
    from defectflow.artifacts import TFLITE_FILE, ModelInfo
    from defectflow.config import load_config
    from defectflow.data.split import read_manifest, select
    from defectflow.training.export import export_compact, export_tflite

    shutil.copytree(model_dir, work)
    done: dict = {
        "model_dir": str(model_dir),
        "keras_mb_original": round((work / "model.keras").stat().st_size / MB, 1),
    }
    keras.saving.load_model(work / "model.keras", compile=False).save(work / "model.keras")
    done["keras_mb"] = round((work / "model.keras").stat().st_size / MB, 1)
    if not (work / TFLITE_FILE).exists() and serving_format != "keras":
        manifest = model_dir.parent / "manifest.csv"
        samples = select(read_manifest(manifest), "test") if manifest.is_file() else []
        samples = [s for s in samples if Path(s.path).is_file()]
        started = time.perf_counter()
        if samples and serving_format == "auto":
            summary = export_compact(work, samples, load_config("default").export)
            done["export"] = {
                "how": f"export_compact on {len(samples)} test images of {manifest}",
                "format": summary["format"],
                "reason": summary["reason"],
                "tflite_mb": summary["tflite"]["size_mb"],
                "parity_passed": summary["parity"]["passed"],
                "latency_batch1_p50_ms": {
                    k: v["p50_ms"] for k, v in summary["latency_batch1"].items()
                },
            }
        else:
            quantization = load_config("default").export.quantization
            path = export_tflite(work, quantization)
            done["export"] = {
                "how": f"export_tflite {quantization}"
                + (
                    ""
                    if serving_format == "tflite"
                    else f" (parity not checked: no test images from {manifest})"
                ),
                "tflite_mb": round(path.stat().st_size / MB, 2),
            }
        done["export"]["seconds"] = round(time.perf_counter() - started, 1)
    info = ModelInfo.load(work)
    if serving_format in ("keras", "tflite") or (
        serving_format == "auto" and "export" in done and "format" not in done["export"]
    ):
        info.serving_format = "keras" if serving_format == "keras" else "tflite"
        info.save(work)
    done["serving_format"] = ModelInfo.load(work).serving_format
    return done


def save_and_promote(work: Path, home: Path, source: str) -> dict:
    """Save the copy into the temporary store and promote it, in a subprocess on that store."""
    done = subprocess.run(
        [sys.executable, "-c", _SAVE_AND_PROMOTE, str(work), source],
        env=server_env(home),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        sys.exit(f"saving the model into the temporary store failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- in process --------------------------------------------------------------------------------


class InProcess:
    """The model as the service loads it (`Predictor.load(model_dir)`: the format model.json
    names), in this process, and the image decoded and at the model's input size."""

    def __init__(self, model_dir: Path, image: bytes) -> None:
        from defectflow.inference.predictor import Predictor
        from defectflow.inference.preprocessing import decode_image, prepare_image

        started = time.perf_counter()
        self.predictor = Predictor.load(model_dir)
        self.load_s = round(time.perf_counter() - started, 2)
        self.image = image
        self.rgb = decode_image(image)
        size = self.predictor.info.input_size
        self.at_input_size = prepare_image(self.rgb, size).round().clip(0, 255).astype("uint8")

    def bare_forward(self) -> None:
        """The model call only: `raw_outputs` at batch 1 on an image already at input size."""
        self.predictor.raw_outputs([self.at_input_size], 1)

    def predict_arrays(self) -> None:
        self.predictor.predict_arrays([self.rgb], 1)

    def endpoint_work(self) -> None:
        """What /predict computes for an upload: decode, resize, forward, mask, PNG, JSON."""
        json.dumps(self.predictor.predict_bytes(self.image).to_json())

    def stages(self) -> dict[str, float]:
        """ms per stage of the endpoint's work."""
        from defectflow.inference.postprocessing import postprocess
        from defectflow.inference.preprocessing import decode_image, prepare_image

        info = self.predictor.info
        t0 = time.perf_counter()
        decoded = decode_image(self.image)
        t1 = time.perf_counter()
        batch = prepare_image(decoded, info.input_size)[None]
        t2 = time.perf_counter()
        outputs = self.predictor.backend(batch)
        t3 = time.perf_counter()
        anomaly = outputs.get("anomaly")
        prediction = postprocess(
            outputs["class"][0],
            outputs["mask"][0],
            decoded.shape[:2],
            info.policy,
            anomaly_map=None if anomaly is None else anomaly[0],
        )
        t4 = time.perf_counter()
        body = prediction.to_json()
        t5 = time.perf_counter()
        json.dumps(body)
        t6 = time.perf_counter()
        marks = (t0, t1, t2, t3, t4, t5, t6)
        return {
            name: (b - a) * 1000 for name, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True)
        }


STAGES = (
    "decode",
    "resize_to_input",
    "forward",
    "mask_resize_threshold",
    "mask_png_base64",
    "json_dumps",
)


def bench_in_process(model: InProcess, repeats: int, warmup: int) -> dict:
    """Bare forward, the full paths and the per-stage breakdown, taking turns."""
    stage_ms: dict[str, list[float]] = {}

    def stages() -> None:
        for name, ms in model.stages().items():
            stage_ms.setdefault(name, []).append(ms)

    times = take_turns(
        {
            "bare_forward": model.bare_forward,
            "predict_arrays": model.predict_arrays,
            "endpoint_work": model.endpoint_work,
            "stages": stages,
        },
        repeats,
        warmup,
    )
    result = {
        "format": model.predictor.format,
        "load_s": model.load_s,
        "input_size": model.predictor.info.input_size,
        "image_hw": list(model.rgb.shape[:2]),
    }
    for name, what in (
        ("bare_forward", "bare forward, batch 1 (raw_outputs on an image at input size)"),
        ("predict_arrays", "predict_arrays (resize, forward, mask at input size)"),
        ("endpoint_work", "predict_bytes + to_json + json.dumps (the endpoint's work)"),
    ):
        result[name] = _stats(times[name])
        _print({"what": f"in process: {what}", "format": model.predictor.format, **result[name]})
    result["stages_p50_ms"] = {
        name: round(statistics.median(ms[warmup:]), 2) for name, ms in stage_ms.items()
    }
    _print({"what": "in process: stages, p50 ms", **result["stages_p50_ms"]})
    return result


# --- HTTP phases -------------------------------------------------------------------------------


def _files(image: bytes):
    return lambda: {"image": ("capsule.png", image, "image/png")}


def _batch_files(image: bytes, images: int, field: str = "images"):
    return lambda: [(field, (f"capsule-{i}.png", image, "image/png")) for i in range(images)]


def find_batch_endpoint(url: str) -> dict:
    """/predict_batch as /docs.json describes it (its multipart field), or why it is absent."""
    import httpx

    try:
        spec = httpx.get(f"{url}/docs.json", timeout=10).json()
    except (httpx.HTTPError, ValueError) as exc:
        return {
            "present": False,
            "note": f"/docs.json unreadable ({exc}); /predict_batch not benchmarked",
        }
    post = spec.get("paths", {}).get("/predict_batch", {}).get("post")
    if not post:
        return {
            "present": False,
            "note": "the service has no POST /predict_batch (not in /docs.json)",
        }
    schema = (
        post.get("requestBody", {})
        .get("content", {})
        .get("multipart/form-data", {})
        .get("schema", {})
    )
    if "$ref" in schema:
        schema = (
            spec.get("components", {}).get("schemas", {}).get(schema["$ref"].rsplit("/", 1)[-1], {})
        )
    fields = list(schema.get("properties", {}))
    field = "images" if "images" in fields or not fields else fields[0]
    return {"present": True, "field": field, "fields": fields}


def bench_defectflow(
    url: str, proc: subprocess.Popen, image: bytes, args, cpu: CpuShare, model: InProcess
) -> dict:
    import httpx

    result: dict = {}
    try:
        result["metadata"] = httpx.get(f"{url}/metadata", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        result["metadata"] = None
    files = _files(image)
    # Warm-up: one at a time, then bursts at full concurrency (every batch size the batcher may form).
    sequential(f"{url}/predict", files, 0, args.warmup)
    concurrent(f"{url}/predict", files, args.concurrency, count=2 * args.concurrency)
    time.sleep(2)
    result["rss_idle_after_warmup"] = tree_memory(proc.pid)
    _print({"what": "server memory, idle after warm-up", **result["rss_idle_after_warmup"]})

    result["livez_c1"] = _stats(sequential(f"{url}/livez", files, args.requests, 5, method="GET"))
    _print({"what": "HTTP GET /livez, concurrency 1 (the bare round trip)", **result["livez_c1"]})
    # Concurrency 1 in turns with the bare forward pass in this process (the server idles meanwhile).
    calls = 0

    def http_predict() -> None:
        nonlocal calls
        calls += 1
        headers = _request_id("c1" if calls > 3 else "warmup", calls)
        response = client.post(f"{url}/predict", files=files(), headers=headers)
        if _answer_ok(response, 1):
            sys.exit(f"POST {url}/predict: {_answer_ok(response, 1)}: {response.text[:500]}")

    with cpu.phase("predict c1"), httpx.Client(timeout=120) as client:
        times = take_turns(
            {"bare_forward": model.bare_forward, "http_predict": http_predict}, args.requests, 3
        )
    result["bare_forward_in_turns"] = _stats(times["bare_forward"])
    result["predict_c1"] = _stats(times["http_predict"])
    _print(
        {
            "what": "in process: bare forward, batch 1, in turns with HTTP /predict",
            **result["bare_forward_in_turns"],
        }
    )
    _print({"what": "HTTP POST /predict, concurrency 1", **result["predict_c1"]})

    batches_before = adaptive_batches(url)
    with cpu.phase(f"predict c{args.concurrency}"), MemorySampler(proc.pid) as memory:
        result["predict_concurrent"] = concurrent(
            f"{url}/predict",
            files,
            args.concurrency,
            count=args.concurrent_requests,
            phase="concurrent",
        )
    result["predict_concurrent"]["rss_peak_mb"] = max(memory.samples, default=None)
    result["predict_concurrent"]["adaptive_batching"] = batching_during(
        batches_before, adaptive_batches(url)
    )
    _print(
        {
            "what": f"HTTP POST /predict, concurrency {args.concurrency}",
            **result["predict_concurrent"],
        }
    )

    batch = find_batch_endpoint(url)
    if batch["present"]:
        images = args.batch_images
        batch_files = _batch_files(image, images, batch["field"])
        sequential_ok = concurrent(
            f"{url}/predict_batch", batch_files, 1, count=2, images_per_request=images
        )
        if sequential_ok["errors"]:
            batch["note"] = f"/predict_batch answered with errors: {sequential_ok['error_kinds']}"
        else:
            batches_before = adaptive_batches(url)
            with cpu.phase("predict_batch"), MemorySampler(proc.pid) as memory:
                batch.update(
                    concurrent(
                        f"{url}/predict_batch",
                        batch_files,
                        args.batch_concurrency,
                        count=max(1, args.concurrent_requests // images),
                        images_per_request=images,
                        phase="batch",
                    )
                )
            batch.update(
                images_per_request=images,
                rss_peak_mb=max(memory.samples, default=None),
                adaptive_batching=batching_during(batches_before, adaptive_batches(url)),
            )
    result["predict_batch"] = batch
    _print({"what": "HTTP POST /predict_batch", **batch})

    time.sleep(2)
    result["rss_before_load"] = tree_memory(proc.pid)
    batches_before = adaptive_batches(url)
    with cpu.phase(f"load run {args.load_seconds:g} s"), MemorySampler(proc.pid) as memory:
        result["load_run"] = concurrent(
            f"{url}/predict", files, args.concurrency, seconds=args.load_seconds, phase="load"
        )
    result["rss_after_load"] = tree_memory(proc.pid)
    load = result["load_run"]
    load["adaptive_batching"] = batching_during(batches_before, adaptive_batches(url))
    load["rss_samples_mb"] = memory.samples
    load["rss_peak_mb"] = max(memory.samples, default=None)
    load["p99_over_p50"] = round(load["p99_ms"] / load["p50_ms"], 2) if load.get("p50_ms") else None
    before, after = result["rss_before_load"]["rss_mb"], result["rss_after_load"]["rss_mb"]
    load["rss_before_mb"], load["rss_after_mb"] = before, after
    load["rss_growth_pct"] = round(100 * (after - before) / before, 2)
    load["rss_trend_mb_per_min"] = _slope_per_minute(memory.samples, memory.interval)
    _print(
        {
            "what": f"load run, {args.load_seconds:g} s at concurrency {args.concurrency}",
            **{k: v for k, v in load.items() if k != "rss_samples_mb"},
        }
    )
    return result


def bench_baseline(url: str, baseline_url: str, image: bytes, requests: int, cpu: CpuShare) -> dict:
    """Both servers at concurrency 1, in turns: baseline request, then defectflow request."""
    import httpx

    files = _files(image)
    sequential(f"{baseline_url}/predict", files, 0, 3)
    sequential(f"{url}/predict", files, 0, 3)
    times: dict[str, list[float]] = {baseline_url: [], url: []}
    with cpu.phase("baseline vs defectflow, in turns"), httpx.Client(timeout=120) as client:
        for _ in range(requests):
            for server_url in times:
                start = time.perf_counter()
                response = client.post(
                    f"{server_url}/predict",
                    files=files(),
                    headers=_request_id("in-turns", len(times[server_url])),
                )
                times[server_url].append((time.perf_counter() - start) * 1000)
                if _answer_ok(response, 1):
                    sys.exit(
                        f"POST {server_url}/predict: {_answer_ok(response, 1)}: {response.text[:500]}"
                    )
    result = {
        "baseline_c1": _stats(times[baseline_url]),
        "defectflow_c1_in_turns": _stats(times[url]),
    }
    result["ratio"] = round(
        result["baseline_c1"]["p50_ms"] / result["defectflow_c1_in_turns"]["p50_ms"], 1
    )
    _print(
        {
            "what": "baseline (ConvNeXt-Tiny + U-Net 512, FastAPI) vs defectflow, POST /predict in turns",
            "baseline_p50_ms": result["baseline_c1"]["p50_ms"],
            "baseline_p99_ms": result["baseline_c1"]["p99_ms"],
            "defectflow_p50_ms": result["defectflow_c1_in_turns"]["p50_ms"],
            "ratio": result["ratio"],
        }
    )
    return result


# --- report ------------------------------------------------------------------------------------


def _p50(by_phase: dict, phase: str, kind: str):
    return by_phase.get(phase, {}).get(kind, {}).get("p50_ms", "-")


def goals(results: dict) -> list[dict]:
    """Every figure with its goal (None: reported, no goal) and whether it was met."""
    df = results["defectflow"]
    # The goal's reference: the bare forward pass timed in turns with the HTTP requests.
    bare = df["bare_forward_in_turns"]["p50_ms"]
    c1, cc, load = df["predict_c1"], df["predict_concurrent"], df["load_run"]
    n = cc["concurrency"]
    handler = df.get("server_handler_latency", {})
    rss_seen = [
        df["rss_idle_after_warmup"]["rss_mb"],
        df["rss_after_load"]["rss_mb"],
        *(
            v
            for v in (
                cc.get("rss_peak_mb"),
                load.get("rss_peak_mb"),
                df["predict_batch"].get("rss_peak_mb"),
            )
            if v is not None
        ),
    ]
    rows = [
        ("bare forward p50, batch 1, in process, in turns with c1 (ms)", bare, None, None),
        ("bare forward p99, same (ms)", df["bare_forward_in_turns"]["p99_ms"], None, None),
        (
            "bare forward p50, in-process phase (ms)",
            results["in_process"]["bare_forward"]["p50_ms"],
            None,
            None,
        ),
        (
            "in-process endpoint work p50 (decode..JSON) (ms)",
            results["in_process"]["endpoint_work"]["p50_ms"],
            None,
            None,
        ),
        ("HTTP GET /livez p50, c1 (ms)", df["livez_c1"]["p50_ms"], None, None),
        (
            "HTTP /predict p50, c1 (ms)",
            c1["p50_ms"],
            f"<= {GOAL_HTTP_OVER_FORWARD} x bare = {GOAL_HTTP_OVER_FORWARD * bare:.1f}",
            c1["p50_ms"] <= GOAL_HTTP_OVER_FORWARD * bare,
        ),
        (
            "HTTP /predict p50 / bare forward p50",
            round(c1["p50_ms"] / bare, 2),
            f"<= {GOAL_HTTP_OVER_FORWARD}",
            c1["p50_ms"] / bare <= GOAL_HTTP_OVER_FORWARD,
        ),
        ("HTTP /predict p99, c1 (ms)", c1["p99_ms"], None, None),
        (
            "  server: HTTP service, p50, c1 (access log) (ms)",
            _p50(handler, "c1", "entry"),
            None,
            None,
        ),
        (
            "  server: /predict handler, p50, c1 (its log line) (ms)",
            _p50(handler, "c1", "handler"),
            None,
            None,
        ),
        (
            "  server: model service /forward, p50, c1 (access log) (ms)",
            _p50(handler, "c1", "model_forward"),
            None,
            None,
        ),
        (f"HTTP /predict p50, c{n} (ms)", cc.get("p50_ms"), None, None),
        (f"HTTP /predict p99, c{n} (ms)", cc.get("p99_ms"), None, None),
        (
            f"  server: HTTP service, p50, c{n} (access log) (ms)",
            _p50(handler, "concurrent", "entry"),
            None,
            None,
        ),
        (
            f"  server: /predict handler, p50, c{n} (its log line) (ms)",
            _p50(handler, "concurrent", "handler"),
            None,
            None,
        ),
        (
            f"  server: model service /forward, p50, c{n} (access log) (ms)",
            _p50(handler, "concurrent", "model_forward"),
            None,
            None,
        ),
        (
            f"throughput /predict, c{n} (images/s)",
            cc["images_per_s"],
            f">= {GOAL_IMAGES_PER_S:g}",
            cc["images_per_s"] >= GOAL_IMAGES_PER_S,
        ),
        (f"errors /predict, c{n}", cc["errors"], "0", cc["errors"] == 0),
        (
            f"adaptive batching, c{n}: requests per forward call",
            cc["adaptive_batching"].get("mean_requests_per_forward_call", "-"),
            None,
            None,
        ),
    ]
    batch = df["predict_batch"]
    if batch.get("images_per_s") is not None:
        rows.append(
            (
                f"throughput /predict_batch ({batch['images_per_request']}/call, c{batch['concurrency']}) "
                "(images/s)",
                batch["images_per_s"],
                None,
                None,
            )
        )
    else:
        rows.append(("throughput /predict_batch", "-", batch.get("note", "absent"), None))
    rows += [
        (
            "server RSS idle after warm-up (MB)",
            df["rss_idle_after_warmup"]["rss_mb"],
            f"<= {GOAL_RSS_MB:g}",
            df["rss_idle_after_warmup"]["rss_mb"] <= GOAL_RSS_MB,
        ),
        (
            "server PSS idle after warm-up (MB)",
            df["rss_idle_after_warmup"].get("pss_mb"),
            None,
            None,
        ),
        (
            "server RSS after load (MB)",
            df["rss_after_load"]["rss_mb"],
            f"<= {GOAL_RSS_MB:g}",
            df["rss_after_load"]["rss_mb"] <= GOAL_RSS_MB,
        ),
        (
            "server RSS largest seen (MB)",
            max(rss_seen),
            f"<= {GOAL_RSS_MB:g}",
            max(rss_seen) <= GOAL_RSS_MB,
        ),
    ]
    if "baseline" in results:
        base = results["baseline"]
        rows += [
            ("baseline /predict p50, c1 (ms)", base["baseline_c1"]["p50_ms"], None, None),
            (
                "defectflow /predict p50, c1, in turns (ms)",
                base["defectflow_c1_in_turns"]["p50_ms"],
                None,
                None,
            ),
            (
                "baseline p50 / defectflow p50",
                base["ratio"],
                f">= {GOAL_BASELINE_RATIO:g}",
                base["ratio"] >= GOAL_BASELINE_RATIO,
            ),
        ]
    else:
        rows.append(("baseline p50 / defectflow p50", "-", "not run (--no-baseline)", None))
    rows += [
        (f"load run {load['wall_s']:.0f} s, c{n}: requests", load["requests"], None, None),
        ("load run errors", load["errors"], "0", load["errors"] == 0),
        ("load run p50 (ms)", load.get("p50_ms"), None, None),
        ("load run p99 (ms)", load.get("p99_ms"), None, None),
        (
            "load run p99 / p50",
            load["p99_over_p50"],
            f"<= {GOAL_TAIL_RATIO:g}",
            load["p99_over_p50"] is not None and load["p99_over_p50"] <= GOAL_TAIL_RATIO,
        ),
        ("load run throughput (images/s)", load["images_per_s"], None, None),
        (
            "load run RSS before -> after (MB)",
            f"{load['rss_before_mb']} -> {load['rss_after_mb']}",
            None,
            None,
        ),
        (
            "load run RSS growth (%)",
            load["rss_growth_pct"],
            f"<= {GOAL_RSS_GROWTH_PCT:g}",
            load["rss_growth_pct"] <= GOAL_RSS_GROWTH_PCT,
        ),
        ("load run RSS trend (MB/min, least squares)", load["rss_trend_mb_per_min"], None, None),
    ]
    return [{"figure": f, "measured": m, "goal": g, "met": met} for f, m, g, met in rows]


def print_goal_rows(rows: list[dict]) -> None:
    """The figure / measured / goal / result table of `goals` rows."""
    width = max(len(r["figure"]) for r in rows)
    goal_width = max(len(str(r["goal"] or "")) for r in rows)
    header = f"{'figure':<{width}}  {'measured':>12}  {'goal':<{goal_width}}  result"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        result = "" if r["met"] is None else ("met" if r["met"] else "MISSED")
        print(
            f"{r['figure']:<{width}}  {r['measured']!s:>12}  {r['goal'] or '':<{goal_width}}  {result}"
        )


def machine_line(results: dict) -> str:
    """Cores and the 1-minute load average at the start and the end of the run."""
    provenance = results["provenance"]
    return (
        f"machine: {provenance['machine']['cores']} CPUs; load average (1 min) "
        f"{provenance['load_avg_before'][0]} at the start, {provenance['load_avg_after'][0]} at the end"
    )


def print_table(results: dict, rows: list[dict]) -> None:
    print_goal_rows(rows)
    stages = results["in_process"]["stages_p50_ms"]
    print(
        "\nin-process endpoint work, p50 ms per stage: "
        + ", ".join(f"{k} {v}" for k, v in stages.items())
    )
    print(
        f"served: {results['model']['tag']} as {results['in_process']['format']} "
        f"(service metadata: {json.dumps(results['defectflow'].get('metadata'))[:200]})"
    )
    print(
        machine_line(results)
        + "; cores busy in other jobs per phase: "
        + ", ".join(f"{k} {v['other_jobs_cores']}" for k, v in results["cpu_share"].items())
        + "; cores used by this process (HTTP client, in-process model): "
        + ", ".join(
            f"{k} {v['of_which_this_process_cores']}" for k, v in results["cpu_share"].items()
        )
    )
    if results["busy"]:
        print(
            f"NOTE: the machine was busy with other jobs ({results['busy']}): latencies and throughput are "
            "lower than on an idle machine."
        )
    missed = [r["figure"] for r in rows if r["met"] is False]
    print(f"goals missed: {', '.join(missed)}" if missed else "all goals met")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model_dir", type=Path, nargs="?", help="a trained model folder (default: capsule-seed44)"
    )
    parser.add_argument(
        "--image", type=Path, help=f"the image to send (default: {DEFAULT_IMAGE} when present)"
    )
    parser.add_argument(
        "--serving-format",
        choices=["auto", "keras", "tflite"],
        default="auto",
        help="auto: as the pipeline chooses (model.json, or the export when there is none)",
    )
    parser.add_argument(
        "--requests", type=int, default=120, help="timed requests at concurrency 1 (and in process)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests / calls first")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--concurrent-requests", type=int, default=640, help="requests in the concurrent phase"
    )
    parser.add_argument(
        "--batch-images", type=int, default=16, help="images per /predict_batch call"
    )
    parser.add_argument(
        "--batch-concurrency", type=int, default=4, help="concurrent /predict_batch calls"
    )
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument(
        "--baseline-requests", type=int, default=30, help="requests to each server, in turns"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the ConvNeXt-Tiny baseline"
    )
    timing.add_out_option(parser, "serve_bench", argv is None)
    parser.add_argument(
        "--logs", type=Path, help="keep the servers' logs in this folder (default: discarded)"
    )
    args = parser.parse_args(argv)
    if args.requests < 100:
        print(
            f"note: --requests {args.requests} < 100: p99 at concurrency 1 rests on few samples",
            flush=True,
        )

    home = configure_environment()
    model_dir = args.model_dir or home / "runs" / "capsule-seed44" / "model"
    if not (model_dir / "model.keras").is_file() or not (model_dir / "model.json").is_file():
        sys.exit(
            f"{model_dir} is not a trained model folder (model.keras and model.json): pass one, e.g. RUN/model "
            "of a `defectflow train` run; the default is the 256-px capsule run capsule-seed44, absent here"
        )
    image, image_source = sample_image(args.image)
    cpu = CpuShare()
    results = timing.start("serve_bench", argv, args)
    results.update(
        {
            "psutil": psutil is not None,
            # Served from the working tree: tracked serving files that differ from the commit.
            "serving_files_modified": timing.git(
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "service.py",
                "src/defectflow",
            ).splitlines(),
            "image": {"source": image_source, "bytes": len(image)},
        }
    )
    provenance = results["provenance"]
    _print(
        {
            "what": "setup",
            "cpus": provenance["machine"]["cores"],
            "load_avg_1m_start": provenance["load_avg_before"][0],
            "git_commit": provenance["git_commit"],
            "serving_files_modified": results["serving_files_modified"],
            **results["image"],
        }
    )

    with tempfile.TemporaryDirectory(prefix="defectflow-serve-bench-") as tmp:
        tmp = Path(tmp)
        store_home = tmp / "home"
        started = time.perf_counter()
        results["model"] = prepare_model(model_dir, tmp / "model", args.serving_format)
        results["model"].update(save_and_promote(tmp / "model", store_home, str(model_dir)))
        results["model"]["prepare_s"] = round(time.perf_counter() - started, 1)
        _print({"what": "model", **results["model"]})

        model = InProcess(Path(results["model"]["path"]), image)
        with cpu.phase("in process"):
            results["in_process"] = bench_in_process(model, args.requests, args.warmup)

        port = free_port()
        command = [
            str(BIN / "bentoml"),
            "serve",
            "service:DefectInspection",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with server(
            command,
            server_env(store_home, results["model"]["tag"]),
            tmp / "defectflow.log",
            "/readyz",
            port,
        ) as (url, proc, ready_s):
            cpu.roots.append(proc.pid)
            _print({"what": "defectflow server ready", "url": url, "start_to_ready_s": ready_s})
            results["defectflow"] = {"start_to_ready_s": ready_s}
            results["defectflow"].update(bench_defectflow(url, proc, image, args, cpu, model))

            if not args.no_baseline:
                baseline_port = free_port()
                baseline_command = [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "baseline_convnext_app:app",
                    "--app-dir",
                    str(REPO_ROOT / "benchmarks"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(baseline_port),
                    "--workers",
                    "1",
                    "--log-level",
                    "warning",
                ]
                with server(
                    baseline_command,
                    server_env(tmp / "baseline-home"),
                    tmp / "baseline.log",
                    "/readyz",
                    baseline_port,
                    timeout=600,
                ) as (baseline_url, baseline_proc, baseline_ready_s):
                    cpu.roots.append(baseline_proc.pid)
                    _print(
                        {
                            "what": "baseline server ready",
                            "url": baseline_url,
                            "start_to_ready_s": baseline_ready_s,
                        }
                    )
                    results["baseline"] = {
                        "start_to_ready_s": baseline_ready_s,
                        "rss": tree_memory(baseline_proc.pid),
                    }
                    results["baseline"].update(
                        bench_baseline(url, baseline_url, image, args.baseline_requests, cpu)
                    )
                    cpu.roots.remove(baseline_proc.pid)
            cpu.roots.remove(proc.pid)
        results["defectflow"]["server_handler_latency"] = server_side_latency(
            tmp / "defectflow.log"
        )
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("*.log"):
                shutil.copy2(log, args.logs / log.name)
        _print(
            {
                "what": "server-side handler latency per phase (the service's log lines)",
                **results["defectflow"]["server_handler_latency"],
            }
        )

    results["cpu_share"] = cpu.phases
    results["busy"] = busy_note(provenance["load_avg_before"][0], cpu.phases)
    rows = goals(results)
    timing.finish(results, rows, args.out)
    print_table(results, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
