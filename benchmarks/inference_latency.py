"""Inference latency of a packaged model: in process (Predictor) and over HTTP (the Bento).

    .venv/bin/python benchmarks/inference_latency.py [--model defectflow:latest] [--bento TAG]
        [--image PATH] [--repeats 50] [--out JSON]

--bento: a Bento in the store (default: a fresh Bento of `--model`, built from this checkout's
service.py and bentofile.yaml as `defectflow.registry.build_bento` builds it: a stored Bento of
older code may no longer import with the installed package). It is served by `bentoml serve`
from an empty folder, so it runs the Bento's own files.

Reports min / median / max milliseconds over repeated runs after a warm-up, for one image
end to end (decode, resize, forward pass, mask at input resolution, PNG encoding), and the
peak resident memory of this process. Only 127.0.0.1 is contacted. Writes the figures and the
provenance (machine, date, commit, load) to `--out` (default
`benchmarks/results/inference_latency.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

from defectflow.environment import configure_environment  # noqa: E402


def _summary(name: str, samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    row = {
        "what": name,
        "n": len(ms),
        "min_ms": round(min(ms), 1),
        "median_ms": round(statistics.median(ms), 1),
        "max_ms": round(max(ms), 1),
    }
    print(json.dumps(row))
    return row


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: graph tracing, first allocation
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_in_process(model_tag: str, image: bytes, repeats: int) -> dict:
    from defectflow.inference.predictor import Predictor
    from defectflow.registry import model_dir

    predictor = Predictor.load(model_dir(model_tag))
    row = _summary(
        f"in-process predict_bytes+to_json ({model_tag})",
        _time(lambda: predictor.predict_bytes(image).to_json(), repeats),
    )
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps({"peak_rss_mb": row["peak_rss_mb"]}))
    return row


def fresh_bento(model_tag: str) -> str:
    """A Bento of `model_tag` built from this checkout (offline, a few seconds)."""
    from defectflow import registry

    root = Path(__file__).resolve().parents[1]
    bento = registry.build_bento(model_tag, root / "bentofile.yaml", root)
    print(json.dumps({"bento": bento, "built_for": model_tag}), flush=True)
    return bento


def _wait_ready(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Return once `url` answers; exit with the server's log when it dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            why = "exited" if server.poll() is not None else f"not ready after {timeout_s:.0f} s"
            sys.exit(f"bentoml serve {why}:\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


def bench_http(bento_tag: str, image: bytes, repeats: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bentoml = Path(sys.executable).with_name("bentoml")
    workdir = Path(tempfile.mkdtemp(prefix="defectflow-latency-"))
    log = workdir / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(bentoml), "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        _wait_ready(url + "/readyz", server, log)
        ready_s = round(time.perf_counter() - started, 1)
        print(json.dumps({"server_start_to_ready_s": ready_s}))
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + image
            + f"\r\n--{boundary}--\r\n".encode()
        )

        def call():
            req = urllib.request.Request(
                url + "/predict",
                data=body,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            with urllib.request.urlopen(req, timeout=60) as response:
                response.read()

        return {
            **_summary(f"HTTP POST /predict ({bento_tag})", _time(call, repeats)),
            "server_start_to_ready_s": ready_s,
        }
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="defectflow:latest")
    parser.add_argument(
        "--bento", default=None, help="a Bento in the store (default: a fresh Bento of --model)"
    )
    parser.add_argument(
        "--image", type=Path, help="default: a crack image of the synthetic dataset"
    )
    parser.add_argument("--repeats", type=int, default=50)
    timing.add_out_option(parser, "inference_latency", argv is None)
    args = parser.parse_args(argv)
    record = timing.start("inference_latency", argv, args)
    home = configure_environment()
    image_path = args.image or next(
        iter(sorted((home / "data/synthetic/capsule/test/crack").glob("*.png"))), None
    )
    if image_path is None:
        sys.exit("no image: pass --image or run `make demo` first to write the synthetic dataset")
    image = image_path.read_bytes()
    print(json.dumps({"image": str(image_path), "bytes": len(image), "cpus": os.cpu_count()}))
    record["image"] = {"path": str(image_path), "bytes": len(image)}
    from defectflow.registry import resolve_tag

    record["model"] = resolve_tag(args.model)
    local = bench_in_process(args.model, image, args.repeats)
    bento = args.bento or fresh_bento(args.model)
    record["bento"] = bento
    http = bench_http(bento, image, args.repeats)
    record["in_process"], record["http"] = local, http
    rows = [
        timing.row("in process, predict_bytes + to_json, median (ms)", local["median_ms"]),
        timing.row("in process, min / max (ms)", f"{local['min_ms']} / {local['max_ms']}"),
        timing.row("HTTP POST /predict on the Bento, median (ms)", http["median_ms"]),
        timing.row("HTTP POST /predict, min / max (ms)", f"{http['min_ms']} / {http['max_ms']}"),
        timing.row("peak RSS of the in-process benchmark (MB)", local["peak_rss_mb"]),
        timing.row("bentoml serve start to /readyz (s)", http["server_start_to_ready_s"]),
        timing.row("model, Bento", f"{record['model']}, {bento}"),
        timing.row("timed calls of each", local["n"]),
    ]
    timing.finish(record, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
