"""service.py under hostile input, over real HTTP on 127.0.0.1: `bentoml serve` from source
in a subprocess, serving what users serve by default: the pipeline-trained model with its
anomaly head, from TFLite in process, with the default `serve.threads` (the session's
`pipeline_model`, tests/helpers_pipeline.py).

One server takes ~1,500 generated malformed requests (mutated and truncated real images,
non-images, empty files, wrong content types, oversize bodies, huge dimensions, multi-frame
images, malformed multipart, wrong methods) from a client with bounded concurrency: none
may get a 5xx, every refusal is JSON with an "error", each category gets the status it
should, and afterwards the server is still ready and still predicts. A second server, with
DEFECTFLOW_API_TOKEN set, checks bearer authentication.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers_models import CLASSES
from helpers_processes import serve_bento
from helpers_uploads import (
    SAMPLES,
    bmp_with_size,
    cv2_encode,
    jpeg_with_size,
    pil_encode,
    png_with_size,
    rgb_image,
    tiff_with_size,
)
from PIL import Image

from defectflow.inference.postprocessing import UNKNOWN_DEFECT

pytestmark = pytest.mark.integration

#: The hostile server's per-file limit, lowered so oversize requests are cheap to send.
MAX_UPLOAD_BYTES = 2_000_000
MAX_BATCH_IMAGES = 32  # configs/default.yaml serve.max_batch_images
CONCURRENCY = 8
ANSWERS = {*CLASSES, UNKNOWN_DEFECT}  # the pipeline's synthetic capsule classes
TOKEN = "hostile-test-token-1234"
BOUNDARY = "hostileboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
# 4xx refusals by the service: any of them is fine where the exact one is not the point.
CLIENT_ERRORS = frozenset(range(400, 500))
DECODED_OR_REFUSED = CLIENT_ERRORS | {200}


@pytest.fixture(scope="module")
def model_env(pipeline_model, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The pipeline's model, pinned with DEFECTFLOW_MODEL_TAG; logs in a folder of the module."""
    env = {**pipeline_model.env, "DEFECTFLOW_MODEL_TAG": pipeline_model.model_tag}
    return tmp_path_factory.mktemp("hostile"), env


@pytest.fixture(scope="module")
def server(model_env) -> Iterator[str]:
    root, env = model_env
    env = {**env, "DEFECTFLOW_SERVE_OVERRIDES": f"serve.max_upload_bytes={MAX_UPLOAD_BYTES}"}
    with serve_bento("service:DefectInspection", env, root / "hostile-serve.log") as url:
        yield url


# --- the requests --------------------------------------------------------------------------


@dataclass
class Hostile:
    category: str
    body: bytes = b""
    content_type: str | None = MULTIPART
    path: str = "/predict"
    method: str = "POST"
    #: Statuses that are right for this request.
    expect: frozenset[int] = CLIENT_ERRORS
    #: Send without Content-Length, in chunks.
    chunked: bool = False


def _part(
    payload: bytes,
    name: str = "image",
    filename: str = "part.png",
    content_type: str | None = "image/png",
    disposition: str | None = None,
) -> bytes:
    lines = [disposition or f'Content-Disposition: form-data; name="{name}"; filename="{filename}"']
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    return (
        f"--{BOUNDARY}\r\n".encode()
        + "\r\n".join(lines).encode("latin-1")
        + b"\r\n\r\n"
        + payload
        + b"\r\n"
    )


def _text(name: str, value: bytes) -> bytes:
    return _part(
        value, disposition=f'Content-Disposition: form-data; name="{name}"', content_type=None
    )


def _body(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _upload(payload: bytes, **part) -> bytes:
    return _body(_part(payload, **part))


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # header bytes: where sizes, types and lengths live
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 128))] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF])
    elif kind == 2:
        start = rng.randrange(len(data))
        data[start : start + rng.randint(1, 64)] = rng.randbytes(rng.randint(0, 64))
    elif kind == 3:
        at = rng.randrange(len(data) - 4)
        data[at : at + 4] = struct.pack(
            "<I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x10000000, rng.randrange(2**32)])
        )
    else:
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 256))
    return bytes(data)


def _multi_frame() -> dict[str, bytes]:
    first, second = Image.fromarray(rgb_image()), Image.fromarray(255 - rgb_image())
    return {
        fmt: pil_encode(first, fmt, save_all=True, append_images=[second])
        for fmt in ("PNG", "TIFF", "MPO", "GIF")
    }


def hostile_requests(seed: int = 20261123) -> list[Hostile]:
    rng = random.Random(seed)
    names = sorted(SAMPLES)
    requests: list[Hostile] = []

    def add(count: int, make) -> None:
        requests.extend(make(i) for i in range(count))

    # Mutated real images: some still decode (200), none may fail the server.
    add(
        800,
        lambda i: Hostile(
            "mutated-image",
            _upload(_mutate(rng, SAMPLES[names[i % len(names)]])),
            expect=DECODED_OR_REFUSED,
        ),
    )

    def truncated(i: int) -> Hostile:
        data = SAMPLES[names[i % len(names)]]
        return Hostile(
            "truncated-image", _upload(data[: rng.randrange(1, len(data))]), expect=frozenset({400})
        )

    add(150, truncated)

    non_images = [
        b"this is not an image\n",
        b"<html><body>hello</body></html>",
        b'{"image": "x"}',
        b"PK\x03\x04" + bytes(60),
        b"\x7fELF\x02\x01\x01" + bytes(50),
        b"BZh91AY&SY",
    ]
    add(
        60,
        lambda i: Hostile(
            "non-image",
            _upload(non_images[i % 6] if i < 30 else rng.randbytes(rng.randint(1, 4096))),
            expect=frozenset({400}),
        ),
    )
    disallowed = [
        pil_encode(Image.fromarray(rgb_image()), "GIF"),
        pil_encode(Image.fromarray(rgb_image()), "WEBP"),
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(40),
    ]
    add(
        24,
        lambda i: Hostile("disallowed-format", _upload(disallowed[i % 4]), expect=frozenset({415})),
    )
    add(10, lambda i: Hostile("zero-byte", _upload(b""), expect=frozenset({400})))

    png = SAMPLES["png-rgb"]
    wrong_request_types = [
        "application/json",
        "text/plain",
        "image/png",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        None,
        "application/vnd.bentoml+pickle",
        "text/html; charset=utf-8",
    ]
    add(
        40,
        lambda i: Hostile(
            "wrong-content-type",
            png if i % 2 else b'{"image": "x.png"}',
            content_type=wrong_request_types[i % 8],
            expect=frozenset({415}),
        ),
    )
    wrong_part_types = ["text/plain", "application/json", "text/html", "application/pdf"]
    add(
        20,
        lambda i: Hostile(
            "wrong-content-type",
            _upload(png, content_type=wrong_part_types[i % 4]),
            expect=frozenset({415}),
        ),
    )

    big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD_BYTES)
    oversize = [
        Hostile(
            "oversize", _upload(big + bytes(200_000)), expect=frozenset({413})
        ),  # the request cap
        Hostile("oversize", _upload(big + bytes(200_000)), chunked=True, expect=frozenset({413})),
        Hostile(
            "oversize", _upload(big[: MAX_UPLOAD_BYTES + 1]), expect=frozenset({413})
        ),  # the file cap
        Hostile(
            "oversize",
            _body(_part(png, name="images"), _part(big, name="images")),
            path="/predict_batch",
            expect=frozenset({413}),
        ),
    ]
    requests.extend(oversize * 3)

    bombs = [png_with_size, jpeg_with_size, bmp_with_size, tiff_with_size]
    # All above the 40 M pixel limit; JPEG sides are 16-bit, so theirs are capped at 65535.
    sizes = [(100_000, 100_000), (60_000, 60_000), (40_001, 1000), (7000, 6000), (1, 50_000_000)]

    def bomb(i: int) -> Hostile:
        make, (width, height) = bombs[i % 4], sizes[(i // 4) % 5]
        if make is jpeg_with_size:
            width, height = (
                (min(width, 65535), min(height, 65535)) if i // 4 % 5 != 4 else (65535, 65535)
            )
        return Hostile("huge-dimension", _upload(make(width, height)), expect=frozenset({413}))

    add(40, bomb)

    frames = _multi_frame()
    add(
        32,
        lambda i: Hostile(
            "multi-frame",
            _upload(frames[("PNG", "TIFF", "MPO", "GIF")[i % 4]]),
            expect=frozenset({415}),
        ),
    )

    image = _part(png)
    malformed = [
        (MULTIPART.split(";")[0], _body(image)),  # no boundary parameter
        ('multipart/form-data; boundary="a\x01b"', _body(image)),
        ("multipart/form-data; boundary=" + "b" * 90, _body(image)),
        ("multipart/form-data; boundary=otherboundary", _body(image)),
        (MULTIPART, b"\x00\xff garbage " * 50),
        (MULTIPART, b""),
        (MULTIPART, _body(image)[:100]),
        (MULTIPART, _body(image, close=False)),
        (MULTIPART, f"--{BOUNDARY}--\r\n".encode()),  # no parts
        (MULTIPART, _upload(png, name="file")),  # wrong field name
        (MULTIPART, _upload(png, name="\xff")),
        (
            MULTIPART,
            _body(_text("image", b"http://127.0.0.1:9/x.png")),
        ),  # a URL BentoML would fetch
        (MULTIPART, _body(_text("image", b"hello"))),
        (MULTIPART, _body(_part(png, disposition="Content-Disposition: form-data"))),  # no name
        (MULTIPART, _body(_part(png, disposition="Content-Type: image/png"))),  # no disposition
        (MULTIPART, _body(_part(png, disposition="Garbage line"))),
        (MULTIPART, _upload(png, filename="a" * 300 + ".png")),
        (MULTIPART, _upload(png, filename="a\x00b.png")),
        (
            MULTIPART,
            _body(image, _text("overlay", b"[" * 900)),
        ),  # JSON too deep for BentoML's parser
        (MULTIPART, _body(image, _text("overlay", b"1" * 5000))),
        (MULTIPART, _body(image, *[_text(f"f{k}", b"1") for k in range(150)])),
        (MULTIPART, _body(image, _part(png, name="extra"))),  # a second, unknown file field
    ]
    add(
        132,
        lambda i: Hostile(
            "malformed-multipart",
            malformed[i % len(malformed)][1],
            content_type=malformed[i % len(malformed)][0],
        ),
    )

    def envelope_mutation(i: int) -> Hostile:
        # Damage the multipart framing (boundaries, part headers), not the image.
        body = bytearray(_body(_text("overlay", b"true"), image))
        payload_at = body.find(png)
        spots = [k for k in range(len(body)) if not payload_at <= k < payload_at + len(png)]
        for _ in range(rng.randint(1, 4)):
            body[rng.choice(spots)] = rng.choice(b'\x00\r\n-"; =abc\xff')
        return Hostile("malformed-multipart", bytes(body), expect=DECODED_OR_REFUSED)

    add(80, envelope_mutation)

    add(
        12,
        lambda i: Hostile(
            "wrong-method",
            b"",
            method=("GET", "PUT", "DELETE", "PATCH")[i % 4],
            path=("/predict", "/predict_batch")[i % 2],
            expect=frozenset({405}),
        ),
    )

    batch = [
        (_body(f"--{BOUNDARY}--\r\n".encode()), {400}),
        (_body(*[_part(png, name="images")] * (MAX_BATCH_IMAGES + 1)), {413}),
        (_body(_part(png, name="images"), _part(png[:200], name="images")), {400}),
        (_body(_part(png, name="images"), _part(b"", name="images")), {400}),
        (_body(_part(png, name="image")), {400}),
        (_body(_text("images", b"x")), {400}),
        (_body(_part(png, name="images"), _part(frames["PNG"], name="images")), {415}),
        (
            _body(_part(png, name="images"), _part(png_with_size(100_000, 100_000), name="images")),
            {413},
        ),
        (_body(_part(png, name="images"), close=False), {400}),
        (_body(_part(png, name="images", content_type="text/plain")), {415}),
    ]
    add(
        60,
        lambda i: Hostile(
            "batch",
            batch[i % len(batch)][0],
            path="/predict_batch",
            expect=frozenset(batch[i % len(batch)][1]),
        ),
    )
    return requests


# --- sending them ----------------------------------------------------------------------------


@dataclass
class Outcome:
    request: Hostile
    status: int | None
    body: bytes = b""
    error: str = ""


async def _send_all(url: str, requests: list[Hostile]) -> list[Outcome]:
    limit = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    async def chunks(body: bytes):
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(request: Hostile) -> Outcome:
            request_headers = {"content-type": request.content_type} if request.content_type else {}
            content = chunks(request.body) if request.chunked else request.body
            async with limit:
                try:
                    response = await client.request(
                        request.method, request.path, content=content, headers=request_headers
                    )
                except httpx.HTTPError as exc:
                    return Outcome(request, None, error=repr(exc))
            return Outcome(request, response.status_code, response.content)

        return await asyncio.gather(*(one(request) for request in requests))


def _problems(outcome: Outcome) -> list[str]:
    request, status = outcome.request, outcome.status
    label = f"{request.category} {request.method} {request.path}"
    if status is None:
        return [f"{label}: no answer ({outcome.error})"]
    problems = []
    if status >= 500:
        problems.append(f"{label}: {status} {outcome.body[:200]!r}")
    elif status not in request.expect:
        problems.append(
            f"{label}: {status}, expected {sorted(request.expect)[:5]}: {outcome.body[:200]!r}"
        )
    try:
        answer = json.loads(outcome.body)
    except ValueError:
        return [*problems, f"{label}: {status} answer is not JSON: {outcome.body[:200]!r}"]
    if status == 200 and answer.get("class") not in ANSWERS:
        problems.append(f"{label}: 200 without a class: {outcome.body[:200]!r}")
    if status != 200 and not (
        isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"]
    ):
        problems.append(f"{label}: {status} without an 'error' message: {outcome.body[:200]!r}")
    return problems


def test_a_thousand_malformed_requests_get_no_5xx_and_the_server_stays_up(server):
    requests = hostile_requests()
    start = time.monotonic()
    outcomes = asyncio.run(_send_all(server, requests))
    elapsed = time.monotonic() - start

    by_category: dict[str, Counter] = defaultdict(Counter)
    for outcome in outcomes:
        by_category[outcome.request.category][outcome.status] += 1
    statuses = Counter(outcome.status for outcome in outcomes)
    print(
        f"\n{len(requests)} hostile requests in {elapsed:.1f} s ({len(requests) / elapsed:.0f}/s), "
        f"concurrency {CONCURRENCY}: {dict(sorted(statuses.items(), key=str))}"
    )
    for category, counts in by_category.items():
        print(
            f"  {category:20s} {sum(counts.values()):4d}  {dict(sorted(counts.items(), key=str))}"
        )

    problems = [problem for outcome in outcomes for problem in _problems(outcome)]
    assert problems == [], f"{len(problems)} wrong answers, e.g.:\n" + "\n".join(problems[:25])
    assert not any(status is not None and status >= 500 for status in statuses)
    refused = sum(
        count for status, count in statuses.items() if status is not None and 400 <= status < 500
    )
    assert (
        refused >= 1000
    )  # at least 1,000 requests that must be refused, were (mutants may decode)
    assert elapsed < 240

    # Still up, still ready, still right.
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200
    valid = cv2_encode(".png", rgb_image(50, 70))
    response = httpx.post(
        f"{server}/predict", files={"image": ("part.png", valid, "image/png")}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json()["class"] in ANSWERS and response.json()["mask_size"] == [70, 50]
    assert isinstance(response.json()["anomaly_score"], float)


@pytest.fixture(scope="module")
def auth_server(model_env) -> Iterator[str]:
    root, env = model_env
    with serve_bento(
        "service:DefectInspection", {**env, "DEFECTFLOW_API_TOKEN": TOKEN}, root / "auth-serve.log"
    ) as url:
        yield url


def test_bearer_token_from_the_environment(auth_server):
    image = cv2_encode(".png", np.zeros((20, 24, 3), np.uint8))

    def predict(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(
            f"{auth_server}/predict",
            files={"image": ("a.png", image, "image/png")},
            headers=headers,
            timeout=60,
        )

    for headers, challenge in [
        ({}, "Bearer"),
        ({"Authorization": "Bearer wrong"}, 'Bearer error="invalid_token"'),
        ({"Authorization": f"Basic {TOKEN}"}, 'Bearer error="invalid_token"'),
    ]:
        response = predict(headers)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == challenge
        assert "bearer token" in response.json()["error"]
    response = predict({"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.json()["class"] in ANSWERS
    assert (
        httpx.get(f"{auth_server}/readyz", timeout=10).status_code == 200
    )  # health checks stay open
    assert httpx.get(f"{auth_server}/metadata", timeout=10).status_code == 401
    # An oversize body without a token is a 401, not a 413: nothing is read before authentication.
    response = httpx.post(
        f"{auth_server}/predict",
        content=b"x" * 30_000_000,
        timeout=60,
        headers={"content-type": MULTIPART},
    )
    assert response.status_code == 401
