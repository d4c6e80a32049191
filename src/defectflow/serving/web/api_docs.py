"""GET /docs of the service: the OpenAPI page (Swagger UI) from the Bento itself, no CDN.

FastAPI's own /docs page (of the info app that service.py mounts at "/") loads Swagger UI's
script and stylesheet from cdn.jsdelivr.net and its icon from fastapi.tiangolo.com: on a
network without internet it stays blank. BentoML 1.4 serves a copy of Swagger UI under
/static_content/ of every service (for its own "/" page); this page takes the same files from
there, by URLs relative to /docs, so a path prefix in front of the Bento works too. service.py
turns FastAPI's /docs and /redoc off (ReDoc has no local copy) and serves this page at /docs:

    info_app = FastAPI(title=..., docs_url=None, redoc_url=None)

    @info_app.get("/docs", include_in_schema=False)
    def api_docs() -> HTMLResponse:
        return swagger_ui_page(info_app.title)

tests/test_pages_offline.py opens it in Chromium without internet.
"""

from __future__ import annotations

from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse

#: Where BentoML serves its Swagger UI files (bentoml/_internal/server/static_content),
#: relative to /docs.
STATIC = "static_content"


def swagger_ui_page(title: str, openapi_url: str = "openapi.json") -> HTMLResponse:
    """Swagger UI for the OpenAPI document at `openapi_url` (relative to /docs: the info app's
    /openapi.json), its script, stylesheet and icon from the service's own /static_content/."""
    return get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - Swagger UI",
        swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{STATIC}/favicon-light-32x32.png",
        oauth2_redirect_url=None,
    )
