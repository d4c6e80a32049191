"""The review API and page the Bento serves at /review (Starlette, like `defectflow.serving.web.ui.ui_app`).

    GET  /review/                   the review page (review.html: self-contained, CSP by hash)
    GET  /review/items              pending items (id, time, predicted class, confidence, model,
                                    votes so far, disputed), the review policy and who you are
    GET  /review/items/{id}         one item, with its votes, image, mask and overlay as base64 PNG
    POST /review/items/{id}         a vote, JSON or form: label, mask = keep | clear | a PNG
                                    upload, reviewer; answers status reviewed (written into the
                                    incoming dataset) or pending (the policy is not met yet)
    POST /review/items/{id}/discard

Errors are {"error": "..."} with 400 (bad review), 401 (no or a wrong token), 403 (a name the
token does not prove), 404 (no such item, or the inbox is off), 409 (already reviewed or
discarded), 413 / 415 (a mask upload refused by the checks of `defectflow.serving.uploads`, as
on /predict), 500 (the disk). The service exempts /review from its bearer-token middleware so
the page loads without a token (like /ui); this app guards everything but the page itself
(`_ReviewAuth`) and says who reviews (`defectflow.serving.inbox.trust`):

- a personal reviewer token (`reviewer_tokens`, from `serve.inbox.reviewer_tokens_env`): the
  reviewer is the token's name (identity `token`); a different `reviewer` field is refused (403);
- the service's bearer token: the reviewer is the `reviewer` field (identity `token-holder`),
  unless that name has a token of its own (403);
- no token configured at all: the `reviewer` field (identity `anonymous`).
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from defectflow.serving.guards import send_json_error
from defectflow.serving.inbox import MAX_MASK_BYTES, Inbox, InboxError, InvalidReview, Reviewer
from defectflow.serving.web.ui import page_endpoint, page_html

PAGE_FILE = "review.html"
#: Where `_ReviewAuth` leaves (token name or None, how it was established) in the ASGI scope.
IDENTITY_KEY = "defectflow.review_identity"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _review_fields(request: Request) -> tuple[str, str | bytes, str]:
    """(label, mask, reviewer) from a JSON body or a form (urlencoded or multipart)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise InvalidReview("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidReview('the JSON body must be an object: {"label", "mask", "reviewer"}')
        mask = body.get("mask", "keep")
        if body.get("mask_png_base64") is not None:
            try:
                mask = base64.b64decode(str(body["mask_png_base64"]), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidReview("mask_png_base64 is not valid base64") from None
        fields = {"label": body.get("label"), "reviewer": body.get("reviewer")}
    elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=1, max_fields=10)
        except Exception as exc:  # noqa: BLE001 - python-multipart raises several kinds
            raise InvalidReview(f"the form could not be read: {exc}") from None
        mask = form.get("mask", "keep")
        if isinstance(mask, UploadFile):
            mask = await mask.read(MAX_MASK_BYTES + 1)
            if len(mask) > MAX_MASK_BYTES:
                raise InvalidReview(f"the mask file is larger than {MAX_MASK_BYTES} bytes")
        fields = {"label": form.get("label"), "reviewer": form.get("reviewer")}
    else:
        raise InvalidReview(
            "send the review as JSON (application/json) or as a form (multipart/form-data)"
        )
    if fields["reviewer"] is None:
        fields["reviewer"] = ""  # a reviewer token names the reviewer; else `_reviewer` asks
    for name, value in fields.items():
        if not isinstance(value, str) or (name == "label" and not value.strip()):
            raise InvalidReview(f"`{name}` is required")
    if isinstance(mask, str):
        mask = mask.strip().lower()
        if mask not in ("keep", "clear"):
            raise InvalidReview(
                f"mask must be 'keep', 'clear' or an uploaded PNG file, got {mask[:40]!r}"
            )
    elif not isinstance(mask, (bytes, bytearray)):
        raise InvalidReview("mask must be 'keep', 'clear' or an uploaded PNG file")
    return fields["label"].strip(), mask, fields["reviewer"].strip()


def _reviewer(scope, given: str, token_names: set[str]) -> Reviewer:
    """Who casts this vote: the reviewer token's name, or the name given (see the module
    docstring); InvalidReview 400 / 403 otherwise."""
    name, established = scope.get(IDENTITY_KEY, (None, "anonymous"))
    if established == "token":
        if given and given != name:
            raise InvalidReview(
                f"this reviewer token is {name}'s: review as {name} (or leave `reviewer` out)",
                status=403,
            )
        return Reviewer(name, "token")
    if not given:
        raise InvalidReview("`reviewer` is required")
    if given in token_names:
        raise InvalidReview(
            f"{given} has a reviewer token of their own: send it to review as {given}", status=403
        )
    return Reviewer(given, established)


class _ReviewAuth:
    """The page is public (it holds no data). With any token configured every other path needs
    one, `Authorization: Bearer <token>`: a reviewer's own (identity `token`, their name) or the
    service's (identity `token-holder`); with none, nothing is checked (identity `anonymous`).
    The identity goes into the scope (`IDENTITY_KEY`)."""

    def __init__(self, app, token: str | None, reviewer_tokens: dict[str, str]) -> None:
        self.app = app
        # Bytes: hmac.compare_digest refuses non-ASCII str, and headers arrive as bytes.
        self.token = token.encode("utf-8") if token else None
        self.reviewers = [(t.encode("utf-8"), name) for t, name in reviewer_tokens.items()]
        if self.token is not None and any(t == self.token for t, _ in self.reviewers):
            raise ValueError("a reviewer token is the service's bearer token: give each its own")

    def _identity(self, scope) -> tuple[str | None, str] | None:
        if self.token is None and not self.reviewers:
            return (None, "anonymous")
        header = next(
            (v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"), b""
        )
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        credentials = credentials.strip()
        found = None
        for token, name in self.reviewers:  # every one compared: the time says nothing
            if hmac.compare_digest(credentials, token):
                found = (name, "token")
        if (
            found is None
            and self.token is not None
            and hmac.compare_digest(credentials, self.token)
        ):
            found = (None, "token-holder")
        return found

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        relative = path[len(root) :] if root and path.startswith(root) else path
        if (
            scope["type"] == "http"
            and relative in ("", "/")
            and scope.get("method") in ("GET", "HEAD")
        ):
            await self.app(scope, receive, send)
            return
        identity = self._identity(scope)
        if identity is not None:
            await self.app({**scope, IDENTITY_KEY: identity}, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            given = any(k.lower() == b"authorization" for k, _ in scope.get("headers", ()))
            message = (
                ("invalid bearer token" if given else "missing bearer token")
                + ": send the header 'Authorization: Bearer <token>' (the service's or your reviewer token)"
            )
            challenge = b'Bearer error="invalid_token"' if given else b"Bearer"
            await send_json_error(send, 401, message, [(b"www-authenticate", challenge)])


def review_app(
    inbox: Inbox | None,
    token: str | None = None,
    off_reason: str = "",
    reviewer_tokens: dict[str, str] | None = None,
) -> _ReviewAuth:
    """The ASGI app to mount at /review. `inbox` None: the inbox is off, the API says so (404).
    `token`: the service's bearer token; `reviewer_tokens`: token -> reviewer name
    (`defectflow.serving.inbox.parse_reviewer_tokens`)."""
    off = off_reason or "the review inbox is off: serve with serve.inbox.enabled=true"
    reviewer_tokens = dict(reviewer_tokens or {})
    token_names = set(reviewer_tokens.values())

    def policy() -> dict:
        return {**inbox.policy.as_dict(), "description": inbox.policy.describe()}

    def you(request: Request) -> dict:
        name, established = request.scope.get(IDENTITY_KEY, (None, "anonymous"))
        return {"reviewer": name, "identity": established}

    async def call(fn, *args):
        if inbox is None:
            return _error(404, off)
        try:
            return JSONResponse(await run_in_threadpool(fn, *args))
        except InboxError as exc:
            return _error(exc.status, str(exc))

    async def items(request: Request):
        status = request.query_params.get("status", "pending")
        return await call(
            lambda: {
                "items": inbox.list(None if status == "all" else status),
                "stats": inbox.stats(),
                "policy": policy(),
                "you": you(request),
            }
        )

    async def item(request: Request):
        return await call(inbox.view if inbox else None, request.path_params["item_id"])

    async def review(request: Request):
        if inbox is None:
            return _error(404, off)
        try:
            label, mask, given = await _review_fields(request)
            reviewer = _reviewer(request.scope, given, token_names)
        except InboxError as exc:
            return _error(exc.status, str(exc))
        item_id = request.path_params["item_id"]

        def run() -> dict:
            done = inbox.review(item_id, label, mask, reviewer)
            return {
                "id": done.id,
                "status": done.status,
                "label": done.label,
                "image": done.image,
                "mask": done.mask,
                "incoming": done.incoming,
                "reviewer": done.reviewer,
                "identity": done.identity,
                "votes": list(done.votes),
                "disputed": done.disputed,
                "met_by": done.met_by,
                "policy": policy(),
            }

        return await call(run)

    async def discard(request: Request):
        item_id = request.path_params["item_id"]

        def run() -> dict:
            inbox.discard(item_id)
            return {"id": item_id, "status": "discarded"}

        return await call(run)

    app = Starlette(
        routes=[
            Route("/", page_endpoint(page_html(PAGE_FILE)), methods=["GET"], name="review_page"),
            Route("/items", items, methods=["GET"]),
            Route("/items/{item_id}", item, methods=["GET"]),
            Route("/items/{item_id}", review, methods=["POST"]),
            Route("/items/{item_id}/discard", discard, methods=["POST"]),
        ]
    )
    return _ReviewAuth(app, token, reviewer_tokens)


__all__ = ["review_app"]
