"""The inspection web page the Bento serves (`ui.html`: one self-contained file, no CDN).

service.py mounts it beside the API:

    from defectflow.serving.web.ui import ui_app

    @bentoml.asgi_app(ui_app(), path="/ui")
    @bentoml.service(...)
    class DefectInspection: ...

The page (GET /ui/; GET /ui is redirected there) posts the picked or dropped image to the
service's /predict, resolved against the page's own URL (so a path prefix in front of the
Bento works too), and draws the returned mask over the image. It reads ../metadata when the
service has it, and sends `Authorization: Bearer <token>` when the token field is filled.

The app is plain Starlette (what FastAPI is built on, and a dependency of BentoML itself), so
the Bento needs no extra package for it. Its Content-Security-Policy allows only the page's own
inline script and style (by SHA-256) and requests to its own origin: a browser refuses any
external resource, which the browser test checks.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

PAGE_FILE = "ui.html"

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def page_html(name: str = PAGE_FILE) -> str:
    """A page's HTML, as packaged next to this module (the Bento must include it)."""
    try:
        return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{name} is missing from the defectflow.serving.web package: a Bento must include "
            f"src/defectflow/serving/web/{name} (bentofile.yaml `include:`)"
        ) from None


def content_security_policy(html: str) -> str:
    """A policy allowing exactly the page's inline <script> and <style> blocks and same-origin
    requests: nothing external can load, and inline code that was not shipped cannot run."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii")
        hashes[kind].append(f"'sha256-{digest}'")
    if not hashes["script"]:
        raise ValueError("the page has no inline <script> block: it would be inert")
    styles = " ".join(hashes["style"]) or "'none'"
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {' '.join(hashes['script'])}",
            f"style-src {styles}",
            "img-src 'self' data: blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'self'",
        ]
    )


def page_endpoint(html: str):
    """A Starlette endpoint answering with `html` and its headers (the policy computed once)."""
    headers = {
        # Revalidate on every load: a new Bento must not keep serving yesterday's page.
        "Cache-Control": "no-cache",
        "Content-Security-Policy": content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    return page


def ui_app() -> Starlette:
    """An ASGI app answering GET / (and HEAD) with the page; read once, here."""
    # Mounted at /ui, the app sees "/"; BentoML's router redirects /ui to /ui/ (307).
    return Starlette(routes=[Route("/", page_endpoint(page_html()), methods=["GET"], name="ui")])


__all__ = ["content_security_policy", "page_endpoint", "page_html", "ui_app"]
