"""The HTTP surface is safe by default, over real HTTP on 127.0.0.1 (`bentoml serve` in a
subprocess, the session's pipeline-trained TFLite model: its served Bento for the shipped
config, service.py with overrides for the others; tests/conftest.py):

- decoded pixels are budgeted before decoding: 32 valid PNGs of just under 40 M pixels each
  (117 kB each, 3.8 GB once decoded) get a JSON 413 from the default config while the server's
  memory stays flat, and a request that would push the process over its pixels in flight gets
  a JSON 503 with Retry-After; every reservation is given back, also after a failed decode;
- with the review inbox on, the service refuses to start without a bearer token unless
  anonymous review is allowed explicitly, and its log says which it is.

A TFLite model serves inside the HTTP process with `serve.threads` (4) requests at once, the
path where requests overlap (a Keras model's HTTP service takes one at a time).
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import psutil
import pytest
from helpers_processes import BIN, free_port, running, wait_http

pytestmark = pytest.mark.integration

#: 6320 x 6320 = 39,942,400 pixels: just under serve.max_pixels (40 M), so each image alone is valid.
BIG_SIDE = 6320
#: The server tree's memory bound while it refuses the 32 big images: what a 4 GB machine can
#: give the service beside the OS. Measured here: ~270 MB at rest (the `bentoml serve` arbiter
#: plus the HTTP worker with LiteRT); one 40 M pixel image through decode, mask and answer
#: peaks ~270 MB above that; the batch's decoded RGB arrays alone would be 3.8 GB.
MAX_TREE_RSS = 1_500_000_000
#: Growth while refusing: the request's 3.7 MB of uploads and bookkeeping (7 MB measured), less
#: than decoding a single one of the images (its RGB array is 120 MB, decoding it peaks higher).
MAX_REFUSAL_GROWTH = 100_000_000
#: The tight server's pixel budgets: one 6.76 M pixel image fits, two do not.
TIGHT_PIXELS = 8_000_000
TIGHT_SIDE = 2600


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def black_png(width: int, height: int) -> bytes:
    """A valid 8-bit RGB PNG of black pixels, compressed row by row (never whole in memory)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)  # filter byte "none", then the pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def corrupt_pixels(png: bytes) -> bytes:
    """The PNG with damaged pixel data but an intact header: it passes every check before
    decoding (its pixels are reserved) and fails in the decoder."""
    data = bytearray(png)
    middle = data.find(b"IDAT") + 4 + 200
    data[middle : middle + 64] = bytes(range(64))
    return bytes(data)


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants (shared pages counted in each)."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess):  # a worker that just ended
            total += process.memory_info().rss
    return total


class PeakRss:
    """Samples the tree's RSS every 20 ms in a thread while its `with` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._done = pid, 0, threading.Event()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self.peak = tree_rss(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(5)
        self.peak = max(self.peak, tree_rss(self.pid))


@contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`bentoml serve service:DefectInspection` on a free 127.0.0.1 port: (URL, process)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(BIN / "bentoml"),
        "serve",
        "service:DefectInspection",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with running(command, env, log) as proc:
        print(f"\nserver ready in {wait_http(f'{url}/readyz', proc, 180, log):.1f} s")
        yield url, proc


@pytest.fixture(scope="module")
def model_env(pipeline_model, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The pipeline's model (TFLite, served in the HTTP process), pinned with
    DEFECTFLOW_MODEL_TAG; logs and inboxes in a folder of the module."""
    env = {**pipeline_model.env, "DEFECTFLOW_MODEL_TAG": pipeline_model.model_tag}
    return tmp_path_factory.mktemp("limits"), env


@pytest.fixture(scope="module")
def default_server(pipeline_server) -> dict:
    """The shipped serve config, no token, inbox off: the session's served pipeline Bento (this
    module only sends it requests and reads its log)."""
    return {"url": pipeline_server.url, "pid": pipeline_server.pid, "log": pipeline_server.log}


@pytest.fixture(scope="module")
def tight_server(model_env) -> Iterator[dict]:
    """Budgets of 8 M pixels per request and in flight; the inbox on without a token, which
    starts only because anonymous review is allowed explicitly."""
    root, env = model_env
    overrides = (
        f"serve.max_request_pixels={TIGHT_PIXELS} serve.max_inflight_pixels={TIGHT_PIXELS} "
        f"serve.inbox.enabled=true serve.inbox.path={root / 'inbox'} "
        f"serve.inbox.incoming={root / 'incoming'} serve.inbox.allow_anonymous_review=true"
    )
    with serve({**env, "DEFECTFLOW_SERVE_OVERRIDES": overrides}, root / "tight-serve.log") as (
        url,
        proc,
    ):
        yield {"url": url, "pid": proc.pid, "log": root / "tight-serve.log"}


def _small_png() -> bytes:
    return black_png(48, 36)


def _predict(url: str, png: bytes, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"{url}/predict", files={"image": ("part.png", png, "image/png")}, timeout=timeout
    )


def test_32_big_valid_images_are_413_before_decoding_and_memory_stays_flat(default_server):
    url, pid = default_server["url"], default_server["pid"]
    big = black_png(BIG_SIDE, BIG_SIDE)
    assert len(big) < 130_000  # ~117 kB that decodes to 120 MB
    files = [("images", (f"big-{i}.png", big, "image/png")) for i in range(32)]
    assert (
        _predict(url, _small_png()).status_code == 200
    )  # warm: the first answer's allocations are not the batch's
    time.sleep(0.5)
    with PeakRss(pid) as memory:
        before = tree_rss(pid)
        started = time.monotonic()
        refused = httpx.post(f"{url}/predict_batch", files=files, timeout=120)
        seconds = time.monotonic() - started
    print(
        f"\n32 x {BIG_SIDE}x{BIG_SIDE} PNG batch: {refused.status_code} in {seconds:.2f} s; server tree RSS "
        f"{before / 1e6:.0f} MB before, peak {memory.peak / 1e6:.0f} MB (bound {MAX_TREE_RSS / 1e6:.0f} MB)"
    )
    assert refused.status_code == 413, refused.text[:500]
    assert refused.headers["content-type"] == "application/json"
    pixels = 32 * BIG_SIDE * BIG_SIDE
    assert refused.json()["error"] == (
        f"the images of this request decode to {pixels} pixels, more than the limit "
        "of 48000000 pixels per request: send fewer or smaller images"
    )
    assert refused.json()["request_id"]
    assert memory.peak < MAX_TREE_RSS
    assert memory.peak - before < MAX_REFUSAL_GROWTH
    # Still serving, and the refused request reserved nothing: a normal image and then a
    # single image at the pixel limit (a request's whole budget) are answered.
    assert _predict(url, _small_png()).status_code == 200
    assert (
        httpx.get(f"{url}/metadata", timeout=10).json()["limits"]["max_inflight_pixels"]
        == 96_000_000
    )
    # The sampler does see decoding: one such image, within the budget, costs hundreds of MB.
    with PeakRss(pid) as control:
        before = tree_rss(pid)
        one = _predict(url, big, timeout=120)
    print(
        f"one {BIG_SIDE}x{BIG_SIDE} image: {one.status_code}, tree RSS peak {control.peak / 1e6:.0f} MB "
        f"(+{(control.peak - before) / 1e6:.0f} MB)"
    )
    assert one.status_code == 200 and one.json()["mask_size"] == [BIG_SIDE, BIG_SIDE]
    assert control.peak - before > 150_000_000
    log = default_server["log"].read_text()
    assert '"review_access":"off"' in log and '"max_request_pixels":48000000' in log


def test_requests_over_the_pixels_in_flight_get_503_with_retry_after(tight_server):
    url = tight_server["url"]
    image = black_png(TIGHT_SIDE, TIGHT_SIDE)  # 6.76 M pixels: one fits the 8 M budget, two do not

    async def burst(count: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/predict",
                        files={"image": (f"b{i}.png", image, "image/png")},
                        data={"overlay": "true"},
                    )
                    for i in range(count)
                )
            )

    answers: list[httpx.Response] = []
    for _ in range(
        3
    ):  # 8 at once on 4 server threads overlap; a second burst if the machine serialised them
        answers += asyncio.run(burst(8))
        if any(a.status_code == 503 for a in answers):
            break
    statuses = sorted(a.status_code for a in answers)
    print(f"\nstatuses of {len(answers)} concurrent requests: {statuses}")
    assert set(statuses) <= {200, 503}, [
        a.text[:300] for a in answers if a.status_code not in (200, 503)
    ]
    assert 200 in statuses and 503 in statuses
    for busy in (a for a in answers if a.status_code == 503):
        assert busy.headers["retry-after"] == "2"
        assert busy.headers["content-type"] == "application/json"
        assert busy.json()["error"].startswith("the service is busy: ")
        assert f"this request needs {TIGHT_SIDE * TIGHT_SIDE}: retry in 2 s" in busy.json()["error"]
    assert _predict(url, image).status_code == 200  # everything was given back

    # A reservation is given back when decoding fails too: three failures would hold 20 M
    # pixels, and the next image would find its 6.76 M no longer fit.
    damaged = corrupt_pixels(image)
    for _ in range(3):
        failed = _predict(url, damaged)
        assert failed.status_code == 400 and "not a decodable image" in failed.json()["error"], (
            failed.text
        )
    assert _predict(url, image).status_code == 200
    two = httpx.post(
        f"{url}/predict_batch",
        timeout=60,
        files=[("images", (f"{i}.png", image, "image/png")) for i in range(2)],
    )
    assert (
        two.status_code == 413
        and f"more than the limit of {TIGHT_PIXELS} pixels" in two.json()["error"]
    )
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'defectflow_rejected_uploads_total{status="503"}' in metrics
    log = tight_server["log"].read_text()
    assert '"review_access":"anonymous_allowed"' in log and "anonymous review allowed" in log


def test_the_inbox_without_a_token_refuses_to_start(model_env):
    root, env = model_env
    env = {
        **env,
        "DEFECTFLOW_SERVE_OVERRIDES": f"serve.inbox.enabled=true serve.inbox.path={root / 'refused-inbox'}",
    }
    assert "DEFECTFLOW_API_TOKEN" not in env
    port = free_port()
    log = root / "refused-serve.log"
    command = [
        str(BIN / "bentoml"),
        "serve",
        "service:DefectInspection",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with running(command, env, log) as proc:
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "the service started with the review inbox on and no token:\n"
                + log.read_text()[-3000:]
            )
    output = log.read_text()
    assert code != 0
    assert (
        "refusing to start: the review inbox is on (serve.inbox.enabled) but DEFECTFLOW_API_TOKEN is not set"
        in output
    ), output[-3000:]
    assert "serve.inbox.allow_anonymous_review=true" in output
    assert not (root / "refused-inbox").exists()  # refused before the inbox was opened
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
