"""Pure ASGI middlewares that stand between the network and the service (no BentoML here).

Every refusal is a JSON body {"error": "..."} with a 4xx status, sent before the service
sees the request:

- `BearerAuthMiddleware`: 401 without `Authorization: Bearer <token>` (when a token is set);
- `UploadSizeMiddleware`: 413 for a body larger than allowed, from Content-Length before
  reading anything, or while counting a streamed (chunked) body;
- `MultipartGuardMiddleware`: on the upload routes, only POST, only multipart/form-data,
  only well-formed bodies whose file parts are the route's file fields, and no image
  declared as a non-image type (the rule of `defectflow.serving.uploads`). BentoML 1.4.39 answers 500 to malformed multipart (missing or wrong boundary, garbage, a part without a
  name, a text value or an unknown file field, a file name too long for a temporary file,
  too many fields, deeply nested JSON in a field), so such bodies must not reach it.

`guard_middlewares` gives all three in the order they must wrap the service (the first is
outermost), for `Service.add_asgi_middleware(cls, **options)`.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from tempfile import SpooledTemporaryFile
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from defectflow.serving.uploads import UploadRejected, check_declared_type, sniff_format

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATHS = ("/healthz", "/readyz", "/livez")
#: Bytes a multipart body adds around its files (boundaries, part headers, small fields).
MULTIPART_OVERHEAD_BYTES = 64 * 1024
#: RFC 2046: 1 to 70 characters from this set, not ending with a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
#: BentoML names each upload's temporary file after it; longer names fail the file system.
MAX_FILENAME_BYTES = 120
#: Text fields are JSON-decoded by BentoML; deep nesting raises RecursionError there (a 500).
MAX_FIELD_NESTING = 32
_REPLAY_CHUNK = 64 * 1024
#: Enough leading bytes to tell every image format defectflow.serving.uploads knows.
_SNIFF_BYTES = 16


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


async def send_json_error(
    send: Send, status: int, message: str, headers: Collection[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps({"error": message}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BearerAuthMiddleware:
    """With a token, every path but the `exempt` ones (each with what lies under it: "/ui"
    covers "/ui/x") needs `Authorization: Bearer <token>`; without one (None or empty: the
    variable is unset or blank), nothing is checked."""

    def __init__(
        self, app: ASGIApp, token: str | None, exempt: Collection[str] = HEALTH_PATHS
    ) -> None:
        self.app = app
        # Bytes: hmac.compare_digest refuses non-ASCII str, and headers arrive as bytes.
        self.token = token.encode("utf-8") if token else None
        self.exempt = tuple(path.rstrip("/") for path in exempt)

    def _exempt(self, path: str) -> bool:
        return any(path == prefix or path.startswith(prefix + "/") for prefix in self.exempt)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, credentials = (_header(scope, b"authorization") or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.token is None
            or scope["type"] not in ("http", "websocket")
            or self._exempt(scope["path"])
            or self._authorized(scope)
        ):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            given = _header(scope, b"authorization") is not None
            challenge = b'Bearer error="invalid_token"' if given else b"Bearer"
            message = (
                "invalid bearer token" if given else "missing bearer token"
            ) + ": send the header 'Authorization: Bearer <token>'"
            await send_json_error(send, 401, message, [(b"www-authenticate", challenge)])


class _BodyTooLarge(Exception):
    pass


class UploadSizeMiddleware:
    """Refuses (413) a request body above `max_bytes` (or `path_max_bytes[path]`) plus
    `overhead_bytes`, from its Content-Length before reading, or by counting a body sent
    without one. The per-file limit is `defectflow.serving.uploads`'; this one bounds the request."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        path_max_bytes: Mapping[str, int] | None = None,
        overhead_bytes: int = MULTIPART_OVERHEAD_BYTES,
    ) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.path_max_bytes = dict(path_max_bytes or {})
        self.overhead_bytes = int(overhead_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = self.path_max_bytes.get(scope["path"], self.max_bytes)
        limit = allowed + self.overhead_bytes
        too_large = f"request body exceeds the limit of {allowed} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_json_error(send, 400, f"invalid Content-Length {declared[:40]!r}")
                return
            if int(declared) > limit:
                await send_json_error(send, 413, f"{too_large} (Content-Length: {int(declared)})")
                return

        received = 0
        exceeded = started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the service's answer to the interrupted read is replaced by the 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if started:
                raise
        if exceeded and not started:
            await send_json_error(send, 413, too_large)


def _malformed(message: str) -> UploadRejected:
    return UploadRejected(400, message)


class _MultipartChecker:
    """Validates a multipart/form-data body fed in chunks, with python-multipart (the parser
    Starlette uses), against what BentoML can handle without failing."""

    def __init__(
        self, boundary: bytes, file_fields: Collection[str], max_parts: int, max_field_bytes: int
    ) -> None:
        self.file_fields = file_fields
        self.max_parts = max_parts
        self.max_field_bytes = max_field_bytes
        self.parts = 0
        self.seen_files: set[str] = set()
        self.complete = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._part_type: bytes | None = None
        self._field: str | None = None  # the current part's name when it is a text field
        self._field_data = bytearray()
        #: The first bytes of a file part declared as a non-image type (None: not collecting).
        self._file_head: bytearray | None = None
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def _expected(self) -> str:
        return " or ".join(f"'{name}'" for name in self.file_fields)

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise _malformed(f"malformed multipart body: {exc}") from exc

    def finish(self) -> None:
        if not self.complete:
            raise _malformed("truncated or empty multipart body: the closing boundary is missing")
        missing = [name for name in self.file_fields if name not in self.seen_files]
        if missing:
            raise _malformed(
                f"no file field '{missing[0]}' in the multipart body: send the image "
                f"as multipart/form-data field '{missing[0]}'"
            )

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise _malformed(f"too many multipart parts: at most {self.max_parts}")
        self._disposition = b""
        self._part_type = None
        self._field = None
        self._field_data.clear()
        self._file_head = None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        header = self._header_name.strip().lower()
        if header == b"content-disposition":
            self._disposition = self._header_value
        elif header == b"content-type":
            self._part_type = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if not options.get(b"name"):
            raise _malformed(
                f"multipart part {self.parts} has no name: each part needs "
                "'Content-Disposition: form-data; name=\"...\"'"
            )
        # Decoded as Starlette decodes it (UTF-8, else Latin-1), to compare like BentoML will.
        raw_name = options[b"name"]
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            name = raw_name.decode("latin-1")
        filename = options.get(b"filename")
        if filename is None:
            if name in self.file_fields:
                raise _malformed(
                    f"field '{name}' must be a file (a part with a filename), not a text value"
                )
            self._field = name
            return
        if name not in self.file_fields:
            raise _malformed(
                f"unexpected file field {name[:40]!r}: send images as field {self._expected()}"
            )
        if len(filename) > MAX_FILENAME_BYTES:
            raise _malformed(
                f"file name of {len(filename)} bytes is longer than {MAX_FILENAME_BYTES}"
            )
        if any(byte < 0x20 or byte == 0x7F for byte in filename):
            raise _malformed("file name contains control characters")
        try:
            check_declared_type(self._part_type)
        except UploadRejected:
            self._file_head = (
                bytearray()
            )  # refused at the part's end only if the bytes are an image
        self.seen_files.add(name)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file_head is not None and len(self._file_head) < _SNIFF_BYTES:
            self._file_head += data[start : min(end, start + _SNIFF_BYTES - len(self._file_head))]
        if self._field is not None:
            self._field_data += data[start:end]
            if len(self._field_data) > self.max_field_bytes:
                raise _malformed(
                    f"form field {self._field[:40]!r} is longer than {self.max_field_bytes} bytes"
                )

    def _part_end(self) -> None:
        # The rule of defectflow.serving.uploads.decode_upload, applied here because BentoML hands
        # the service a Path without the part's type: image bytes declared as a non-image
        # type are refused (415); other bytes go on, to be refused as not an image (400).
        if self._file_head is not None and sniff_format(bytes(self._file_head)) is not None:
            check_declared_type(self._part_type)
        if self._field is not None and (
            self._field_data.count(b"[") + self._field_data.count(b"{") > MAX_FIELD_NESTING
        ):
            raise _malformed(f"form field {self._field[:40]!r} is nested too deeply")

    def _end(self) -> None:
        self.complete = True


class MultipartGuardMiddleware:
    """On the upload routes (`file_fields`: route -> its file field names, e.g.
    {"/predict": ["image"]}): 405 for any method but POST, 415 for a body that is not
    multipart/form-data or for image bytes declared as a non-image type, 400 for a malformed
    body. The body is read and checked in full before the service sees any of it (spooled to a temporary file above `spool_bytes`),
    then replayed to it unchanged. Other routes pass through untouched."""

    def __init__(
        self,
        app: ASGIApp,
        file_fields: Mapping[str, Collection[str]],
        max_parts: int = 100,
        max_field_bytes: int = 1024,
        spool_bytes: int = 1024 * 1024,
    ) -> None:
        self.app = app
        self.file_fields = {route: tuple(names) for route, names in file_fields.items()}
        self.max_parts = max_parts
        self.max_field_bytes = max_field_bytes
        self.spool_bytes = spool_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields = self.file_fields.get(scope.get("path", "")) if scope["type"] == "http" else None
        if fields is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await send_json_error(
                send,
                405,
                f"method {scope['method']} not allowed: POST the image as multipart/form-data",
                [(b"allow", b"POST")],
            )
            return
        media_type, options = parse_options_header(_header(scope, b"content-type") or b"")
        field = fields[0]
        if media_type != b"multipart/form-data":
            sent = media_type.decode("latin-1")[:60] or "no content type"
            await send_json_error(
                send, 415, f"send the image as multipart/form-data field '{field}', not {sent}"
            )
            return
        boundary = options.get(b"boundary", b"")
        if not _BOUNDARY.fullmatch(boundary):
            problem = "has no boundary parameter" if not boundary else "has an invalid boundary"
            await send_json_error(send, 400, f"multipart/form-data Content-Type {problem}")
            return

        checker = _MultipartChecker(boundary, fields, self.max_parts, self.max_field_bytes)
        with SpooledTemporaryFile(max_size=self.spool_bytes) as body:
            try:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client is gone: nobody to answer
                    chunk = message.get("body", b"")
                    if chunk:
                        checker.feed(chunk)
                        body.write(chunk)
                    if not message.get("more_body", False):
                        break
                checker.finish()
            except UploadRejected as exc:
                await send_json_error(send, exc.status_code, str(exc))
                return
            size = body.tell()
            body.seek(0)
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()  # after the body: the client's disconnect, when it comes
                chunk = body.read(_REPLAY_CHUNK)
                replayed = body.tell() >= size
                return {"type": "http.request", "body": chunk, "more_body": not replayed}

            await self.app(scope, replay, send)


def guard_middlewares(
    *,
    token: str | None,
    file_fields: Mapping[str, Collection[str]],
    max_bytes: int,
    path_max_bytes: Mapping[str, int] | None = None,
    auth_exempt: Collection[str] = HEALTH_PATHS,
) -> list[tuple[type, dict[str, Any]]]:
    """The three middlewares with their options, outermost first: authentication before
    anything is read, then the size cap (which also bounds what the guard spools), then the
    multipart guard. Add them in this order with `Service.add_asgi_middleware(cls, **options)`."""
    return [
        (BearerAuthMiddleware, {"token": token, "exempt": tuple(auth_exempt)}),
        (UploadSizeMiddleware, {"max_bytes": max_bytes, "path_max_bytes": path_max_bytes}),
        (MultipartGuardMiddleware, {"file_fields": file_fields}),
    ]
