"""defectflow.serving.guards on a tiny Starlette app: auth, size cap and multipart guard, in the
order `guard_middlewares` gives them (the order the service adds them in)."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from defectflow.serving.guards import (
    BearerAuthMiddleware,
    MultipartGuardMiddleware,
    UploadSizeMiddleware,
    guard_middlewares,
)

TOKEN = "s3cret-token"
MAX_BYTES = 50_000
FILE_FIELDS = {"/predict": ["image"], "/predict_batch": ["images"]}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
BOUNDARY = "testboundary"


class TestClient:
    """Synchronous requests to an ASGI app in this process (httpx's ASGI transport; Starlette's
    own TestClient warns that its httpx use is deprecated)."""

    __test__ = False

    def __init__(self, app, headers: dict | None = None) -> None:
        self.app = app
        self.headers = headers or {}

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://guard.test", headers=self.headers
            ) as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(send())

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)


def make_app(
    token: str | None = TOKEN, calls: list | None = None, max_bytes: int = MAX_BYTES
) -> Starlette:
    calls = [] if calls is None else calls

    async def predict(request: Request) -> JSONResponse:
        calls.append(request.url.path)
        form = await request.form()
        files = {
            key: [hashlib.sha256(await f.read()).hexdigest() for f in form.getlist(key)]
            for key in form
            if hasattr(form[key], "read")
        }
        texts = {key: form[key] for key in form if isinstance(form[key], str)}
        return JSONResponse({"files": files, "texts": texts})

    async def plain(request: Request) -> PlainTextResponse:
        calls.append(request.url.path)
        return PlainTextResponse(str(len(await request.body())))

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/predict_batch", predict, methods=["POST"]),
        Route("/readyz", plain),
        Route("/echo", plain, methods=["GET", "POST"]),
    ]
    middleware = [
        Middleware(cls, **options)
        for cls, options in guard_middlewares(
            token=token,
            file_fields=FILE_FIELDS,
            max_bytes=max_bytes,
            path_max_bytes={"/predict_batch": 2 * max_bytes},
        )
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.calls = calls
    return app


@pytest.fixture
def app() -> Starlette:
    return make_app()


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})


def multipart(*parts: tuple[bytes, bytes], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """parts: (header lines, payload)."""
    body = b""
    for headers, payload in parts:
        body += f"--{boundary}\r\n".encode() + headers + b"\r\n\r\n" + payload + b"\r\n"
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def file_part(
    name: bytes = b"image",
    filename: bytes = b"a.png",
    payload: bytes = PNG,
    content_type: bytes | None = b"image/png",
) -> tuple[bytes, bytes]:
    headers = b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"'
    if content_type is not None:
        headers += b"\r\nContent-Type: " + content_type
    return headers, payload


def text_part(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="' + name + b'"', value


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def post(
    client: TestClient, body, content_type: str | None = MULTIPART, path: str = "/predict", **kwargs
):
    headers = {"content-type": content_type} if content_type is not None else {}
    return client.post(path, content=body, headers=headers, **kwargs)


def assert_refused(response, status: int, message: str, app: Starlette) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert app.state.calls == [], "the app must not see a refused request"


# --- bearer auth -----------------------------------------------------------------------------


def test_a_valid_upload_passes_every_guard_unchanged(client):
    response = post(client, multipart(file_part(), text_part(b"overlay", b"true")))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "files": {"image": [hashlib.sha256(PNG).hexdigest()]},
        "texts": {"overlay": "true"},
    }


def test_a_large_body_is_spooled_and_replayed_byte_for_byte():
    big = bytes(range(256)) * 12_000  # 3 MB: past the guard's 1 MB in memory, onto disk
    client = TestClient(
        make_app(max_bytes=10_000_000), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    response = post(
        client,
        multipart(file_part(name=b"images", payload=big), file_part(name=b"images")),
        path="/predict_batch",
    )
    assert response.status_code == 200, response.text
    assert response.json()["files"]["images"] == [
        hashlib.sha256(big).hexdigest(),
        hashlib.sha256(PNG).hexdigest(),
    ]


@pytest.mark.parametrize(
    ("authorization", "status", "challenge"),
    [
        (None, 401, "Bearer"),
        ("Bearer wrong-token", 401, 'Bearer error="invalid_token"'),
        (f"Basic {TOKEN}", 401, 'Bearer error="invalid_token"'),
        (f"Bearer {TOKEN}x", 401, 'Bearer error="invalid_token"'),
        ("Bearer ", 401, 'Bearer error="invalid_token"'),
        (
            "Bearer caf\xe9".encode("latin-1"),
            401,
            'Bearer error="invalid_token"',
        ),  # not ASCII: a clean 401
        (f"Bearer {TOKEN}", 200, None),
        (f"bearer {TOKEN}", 200, None),  # the scheme is case-insensitive (RFC 7235)
    ],
)
def test_bearer_auth(app, authorization, status, challenge):
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = TestClient(app).get("/echo", headers=headers)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"] == challenge
        assert response.json()["error"].endswith(
            "bearer token: send the header 'Authorization: Bearer <token>'"
        )
        assert app.state.calls == []


def test_auth_comes_before_the_body_is_read(app):
    response = post(TestClient(app), b"x" * (10 * MAX_BYTES))  # oversize, and no token
    assert response.status_code == 401


@pytest.mark.parametrize("path", ["/readyz", "/healthz", "/livez"])
def test_health_checks_need_no_token(path):
    response = TestClient(make_app()).get(path)
    assert response.status_code != 401


def test_an_exempt_path_covers_what_lies_under_it():
    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guarded = BearerAuthMiddleware(ok, TOKEN, exempt=("/ui/",))
    for path, status in [
        ("/ui", 200),
        ("/ui/", 200),
        ("/ui/page.js", 200),
        ("/uix", 401),
        ("/predict", 401),
    ]:
        sent = run_asgi(guarded, {"path": path, "method": "GET"}, [b""])
        assert sent[0]["status"] == status, path


@pytest.mark.parametrize("token", [None, ""])
def test_without_a_token_nothing_is_checked(token):
    assert TestClient(make_app(token=token)).get("/echo").status_code == 200


# --- size cap --------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_413_before_reading(app, client):
    response = post(client, multipart(file_part(payload=b"x" * (MAX_BYTES + 70_000))))
    assert_refused(
        response, 413, f"request body exceeds the limit of {MAX_BYTES} bytes (Content-Length:", app
    )


def test_a_streamed_body_over_the_limit_is_413(app, client):
    async def chunks():  # no Content-Length: chunked transfer
        for _ in range(40):
            yield b"y" * 4096

    response = client.post("/echo", content=chunks())
    assert response.status_code == 413
    assert response.json() == {"error": f"request body exceeds the limit of {MAX_BYTES} bytes"}
    assert app.state.calls == ["/echo"]  # it had started reading: its answer was replaced


def test_a_streamed_body_within_the_limit_passes(client):
    async def chunks():
        for _ in range(5):
            yield b"z" * 1000

    response = client.post("/echo", content=chunks())
    assert response.status_code == 200 and response.text == "5000"


def test_per_route_limits(client):
    # Above the single limit plus the multipart allowance, within the batch route's.
    body = multipart(file_part(name=b"images", payload=b"x" * (MAX_BYTES + 70_000)))
    assert post(client, body, path="/predict_batch").status_code == 200
    assert post(client, body.replace(b'"images"', b'"image"')).status_code == 413


def run_asgi(app, scope: dict, body_chunks: list[bytes], disconnect: bool = False) -> list[dict]:
    """Drive an ASGI app directly; returns what it sent. With `disconnect`, the client goes
    away after the chunks instead of ending the body."""
    sent: list[dict] = []
    messages = [
        {"type": "http.request", "body": chunk, "more_body": disconnect or i < len(body_chunks) - 1}
        for i, chunk in enumerate(body_chunks)
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(
        app({"type": "http", "method": "POST", "path": "/x", "headers": [], **scope}, receive, send)
    )
    return sent


def test_a_service_that_turns_the_interrupted_read_into_a_500_is_answered_413():
    # What BentoML does: it catches every exception of the body read and answers 500.
    async def catching_app(scope, receive, send):
        try:
            while (await receive()).get("more_body"):
                pass
        except Exception:  # noqa: BLE001
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"boom"})

    sent = run_asgi(
        UploadSizeMiddleware(catching_app, max_bytes=10, overhead_bytes=0), {}, [b"x" * 8] * 3
    )
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [413]


def test_an_invalid_content_length_is_400():
    async def never(scope, receive, send):
        raise AssertionError("must not be called")

    sent = run_asgi(
        UploadSizeMiddleware(never, max_bytes=10),
        {"headers": [(b"content-length", b"12abc")]},
        [b""],
    )
    assert sent[0]["status"] == 400


# --- multipart guard -------------------------------------------------------------------------


CASES = {
    "no-boundary": (
        MULTIPART.split(";")[0],
        multipart(file_part()),
        400,
        "has no boundary parameter",
    ),
    "invalid-boundary": (
        'multipart/form-data; boundary="a\x01b"',
        multipart(file_part()),
        400,
        "has an invalid boundary",
    ),
    "other-boundary": (
        "multipart/form-data; boundary=other",
        multipart(file_part()),
        400,
        "malformed multipart body",
    ),
    "garbage": (MULTIPART, b"\x00\xff garbage" * 20, 400, "malformed multipart body"),
    "empty": (MULTIPART, b"", 400, "truncated or empty multipart body"),
    "truncated": (MULTIPART, multipart(file_part())[:60], 400, "truncated or empty multipart body"),
    "no-closing-boundary": (
        MULTIPART,
        multipart(file_part(), close=False),
        400,
        "closing boundary is missing",
    ),
    "no-parts": (MULTIPART, f"--{BOUNDARY}--\r\n".encode(), 400, "no file field 'image'"),
    "wrong-file-field": (
        MULTIPART,
        multipart(file_part(name=b"file")),
        400,
        "unexpected file field 'file'",
    ),
    "undecodable-field-name": (
        MULTIPART,
        multipart(file_part(name=b"\xff")),
        400,
        "unexpected file field",
    ),
    "image-as-text": (
        MULTIPART,
        multipart(text_part(b"image", b"http://127.0.0.1/x.png")),
        400,
        "field 'image' must be a file",
    ),
    "no-name": (MULTIPART, multipart((b"Content-Disposition: form-data", PNG)), 400, "has no name"),
    "no-disposition": (MULTIPART, multipart((b"Content-Type: image/png", PNG)), 400, "has no name"),
    "bad-header-line": (MULTIPART, multipart((b"Garbage", PNG)), 400, "malformed multipart body"),
    "long-filename": (
        MULTIPART,
        multipart(file_part(filename=b"a" * 300 + b".png")),
        400,
        "file name of 304 bytes is longer than 120",
    ),
    "control-in-filename": (
        MULTIPART,
        multipart(file_part(filename=b"a\x00.png")),
        400,
        "control characters",
    ),
    "long-text-field": (
        MULTIPART,
        multipart(file_part(), text_part(b"overlay", b"1" * 2000)),
        400,
        "form field 'overlay' is longer than 1024 bytes",
    ),
    "deep-json-field": (
        MULTIPART,
        multipart(file_part(), text_part(b"overlay", b"[" * 900)),
        400,
        "form field 'overlay' is nested too deeply",
    ),
    "too-many-parts": (
        MULTIPART,
        multipart(file_part(), *[text_part(b"f%d" % i, b"1") for i in range(120)]),
        400,
        "too many multipart parts: at most 100",
    ),
    "png-as-text-plain": (
        MULTIPART,
        multipart(file_part(content_type=b"text/plain")),
        415,
        "declared content type 'text/plain' is not an image type",
    ),
    "jpeg-as-json": (
        MULTIPART,
        multipart(
            file_part(payload=b"\xff\xd8\xff" + bytes(5000), content_type=b"application/json")
        ),
        415,
        "declared content type 'application/json'",
    ),
    "json-body": (
        "application/json",
        b'{"image": "x"}',
        415,
        "send the image as multipart/form-data field 'image', not application/json",
    ),
    "raw-image-body": ("image/png", PNG, 415, "not image/png"),
    "urlencoded": ("application/x-www-form-urlencoded", b"image=abc", 415, "multipart/form-data"),
    "no-content-type": (None, PNG, 415, "not no content type"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_multipart_is_refused_before_the_app(case, app, client):
    content_type, body, status, message = CASES[case]
    assert_refused(post(client, body, content_type), status, message, app)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_upload_routes_take_post_only(method, app, client):
    response = client.request(method, "/predict")
    assert_refused(response, 405, f"method {method} not allowed", app)
    assert response.headers["allow"] == "POST"


def test_generic_and_missing_part_types_pass(client):
    for content_type in (None, b"application/octet-stream", b"image/jpeg"):
        assert post(client, multipart(file_part(content_type=content_type))).status_code == 200


@pytest.mark.parametrize("payload", [b"this is not an image\n", b"", b"\x89PN"])
def test_non_image_bytes_declared_as_text_go_on_to_be_refused_as_not_an_image(payload, client):
    # The service answers those 400 "not a decodable image", the useful message for a text file.
    response = post(client, multipart(file_part(payload=payload, content_type=b"text/plain")))
    assert response.status_code == 200
    assert response.json()["files"]["image"] == [hashlib.sha256(payload).hexdigest()]


def test_other_routes_are_not_guarded(client):
    assert (
        client.post("/echo", content=b"anything", headers={"content-type": "text/plain"}).text
        == "8"
    )


def test_a_client_that_disconnects_mid_body_gets_nothing_and_the_app_is_not_called():
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])

    guard = MultipartGuardMiddleware(app, {"/x": ["image"]})
    headers = [(b"content-type", MULTIPART.encode())]
    sent = run_asgi(guard, {"headers": headers}, [multipart(file_part())[:50]], disconnect=True)
    assert sent == [] and calls == []


def test_guard_middlewares_order_and_options():
    order = guard_middlewares(token="t", file_fields=FILE_FIELDS, max_bytes=10)
    assert [cls for cls, _ in order] == [
        BearerAuthMiddleware,
        UploadSizeMiddleware,
        MultipartGuardMiddleware,
    ]
    assert order[0][1] == {"token": "t", "exempt": ("/healthz", "/readyz", "/livez")}
    assert order[1][1]["max_bytes"] == 10
    assert order[2][1] == {"file_fields": FILE_FIELDS}


def test_a_body_arriving_byte_by_byte_is_checked_and_replayed_the_same():
    received = []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        received.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = MultipartGuardMiddleware(app, {"/x": ["image"]})
    headers = [(b"content-type", MULTIPART.encode())]
    good = multipart(text_part(b"overlay", b"true"), file_part())
    assert (
        run_asgi(guard, {"headers": headers}, [good[i : i + 1] for i in range(len(good))])[0][
            "status"
        ]
        == 200
    )
    assert received == [good]
    mislabelled = multipart(file_part(content_type=b"text/plain"))
    sent = run_asgi(
        guard, {"headers": headers}, [mislabelled[i : i + 1] for i in range(len(mislabelled))]
    )
    assert sent[0]["status"] == 415 and received == [good]
