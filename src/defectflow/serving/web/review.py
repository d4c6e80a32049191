"""The review API and page the Bento serves at /review (Starlette, like `defectflow.serving.web.ui.ui_app`).

    GET  /review/                   the review page (review.html: self-contained, CSP by hash)
    GET  /review/items              pending items: id, time, predicted class, confidence, model
    GET  /review/items/{id}         one item, with image, mask and overlay as base64 PNG
    POST /review/items/{id}         JSON or form: label, mask = keep | clear | a PNG upload, reviewer
    POST /review/items/{id}/discard

Errors are {"error": "..."} with 400 (bad review), 404 (no such item, or the inbox is off),
409 (already reviewed or discarded), 413 / 415 (a mask upload refused by the checks of
`defectflow.serving.uploads`, as on /predict), 500 (the disk). The service exempts /review from its
bearer-token middleware so the page loads without a token (like /ui); this app puts the same
middleware (`BearerAuthMiddleware`, the same token) in front of everything but the page.
"""

from __future__ import annotations

import base64
import binascii

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from defectflow.serving.guards import BearerAuthMiddleware
from defectflow.serving.inbox import MAX_MASK_BYTES, Inbox, InboxError, InvalidReview
from defectflow.serving.web.ui import page_endpoint, page_html

PAGE_FILE = "review.html"


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
    for name, value in fields.items():
        if not isinstance(value, str) or not value.strip():
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


class _PageOpen:
    """The page is public (it holds no data); every other path needs the bearer token."""

    def __init__(self, app, token: str | None) -> None:
        self.app = app
        self.guarded = BearerAuthMiddleware(app, token, exempt=())

    async def __call__(self, scope, receive, send) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        relative = path[len(root) :] if root and path.startswith(root) else path
        if (
            scope["type"] == "http"
            and relative in ("", "/")
            and scope.get("method") in ("GET", "HEAD")
        ):
            await self.app(scope, receive, send)
        else:
            await self.guarded(scope, receive, send)


def review_app(inbox: Inbox | None, token: str | None = None, off_reason: str = "") -> _PageOpen:
    """The ASGI app to mount at /review. `inbox` None: the inbox is off, the API says so (404)."""
    off = off_reason or "the review inbox is off: serve with serve.inbox.enabled=true"

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
            }
        )

    async def item(request: Request):
        return await call(inbox.view if inbox else None, request.path_params["item_id"])

    async def review(request: Request):
        if inbox is None:
            return _error(404, off)
        try:
            label, mask, reviewer = await _review_fields(request)
        except InboxError as exc:
            return _error(exc.status, str(exc))
        item_id = request.path_params["item_id"]

        def run() -> dict:
            done = inbox.review(item_id, label, mask, reviewer)
            return {
                "id": done.id,
                "status": "reviewed",
                "label": done.label,
                "image": done.image,
                "mask": done.mask,
                "incoming": done.incoming,
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
    return _PageOpen(app, token)


__all__ = ["review_app"]
