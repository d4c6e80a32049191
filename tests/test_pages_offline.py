"""The service's /docs page and the HTML evaluation report in Chromium without internet.

The session's pipeline model (tests/conftest.py `pipeline_model`: `defectflow train` on the tiny
synthetic dataset, its Bento built from this checkout) is served with `bentoml serve` inside a
network namespace holding only loopback (tests/helpers_offline.py), and headless Chromium opens,
in the same namespace: /docs (Swagger UI from the Bento's own /static_content/, see
defectflow.serving.web.api_docs; FastAPI's default page would load it from a CDN and stay blank), and the
run's report.html (self-contained: inline CSS, figures as data URIs). Each must render and ask
for nothing but the page's own server or file. The run's Data Docs, copied into the run folder by
the training flow, must still reference their local copies (tests/data/test_data_docs_offline.py
opens such a site in the browser).
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from helpers_offline import external_requests, failed_requests, offline_network, recorded_requests
from helpers_processes import serve_bento

from defectflow.data.data_docs_assets import VENDOR_DIR, external_assets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from browser import headless_chromium, new_tab  # noqa: E402

pytestmark = pytest.mark.integration

WAIT = 60.0


@pytest.fixture(scope="module")
def offline(pipeline_model, browser_binary) -> Iterator[str]:
    """This module's thread in a network namespace with only loopback (after the pipeline ran)."""
    with offline_network() as name:
        yield name


@pytest.fixture(scope="module")
def service(offline, pipeline_model, tmp_path_factory) -> Iterator[str]:
    """The pipeline's Bento served inside the namespace."""
    log = tmp_path_factory.mktemp("offline-service") / "serve.log"
    with serve_bento(pipeline_model.bento_tag, pipeline_model.env, log) as url:
        yield url


@pytest.fixture(scope="module")
def browser(offline, browser_binary, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-offline")
    with headless_chromium(browser_binary, profile, profile.parent / "chromium.log") as connection:
        yield connection


@contextmanager
def _opened(browser, url: str, ready: str, what: str) -> Iterator:
    """A new tab recording its requests, on `url` once `ready` holds there."""
    with new_tab(browser, domains=("Page", "Runtime", "Network")) as tab:
        navigated = tab.call("Page.navigate", url=url)
        assert not navigated.get("errorText"), navigated
        tab.wait_for(f"document.readyState === 'complete' && ({ready})", what, WAIT)
        time.sleep(0.2)
        tab.evaluate("1")  # collects the events that came in since the last call
        yield tab


def test_the_network_is_really_off(service, offline):
    """Inside the namespace the only interface is loopback: there is no route anywhere else."""
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    assert httpx.get(f"{service}/readyz", timeout=10).status_code == 200


def test_docs_page_works_offline(service, browser, tmp_path: Path):
    page = httpx.get(f"{service}/docs", timeout=10)
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert external_assets(page.text) == []
    assert httpx.get(f"{service}/redoc", timeout=10).status_code == 404  # ReDoc would need a CDN
    with _opened(
        browser,
        f"{service}/docs",
        "document.querySelectorAll('.swagger-ui .opblock').length > 0",
        "Swagger UI to list the operations",
    ) as tab:
        facts = tab.evaluate("""({
          title: document.querySelector('.swagger-ui .info .title')?.innerText,
          titleSize: getComputedStyle(document.querySelector('.swagger-ui .info .title')).fontSize,
          paths: [...document.querySelectorAll('.swagger-ui .opblock-summary-path')].map((e) => e.innerText),
          sheets: [...document.styleSheets].map((s) => s.href),
        })""")
        print(f"/docs: {facts}; screenshot {tab.screenshot(tmp_path / 'docs.png')}")
        assert facts["title"].startswith("defectflow model information")
        assert facts["titleSize"] == "36px"  # swagger-ui.css; an unstyled h2 is 24px
        assert any(p.strip().endswith("/metadata") for p in facts["paths"]), facts["paths"]
        assert f"{service}/static_content/swagger-ui.css" in facts["sheets"]
        requests = recorded_requests(tab)
        assert f"{service}/static_content/swagger-ui-bundle.js" in requests
        assert f"{service}/openapi.json" in requests
        assert external_requests(tab) == [], external_requests(tab)
        assert failed_requests(tab) == []


def test_evaluation_report_works_offline(pipeline_model, browser, tmp_path: Path):
    report = pipeline_model.run_dir / "report" / "report.html"
    assert report.is_file()
    with _opened(browser, report.as_uri(), "true", "the report to load") as tab:
        images = tab.evaluate(
            "[...document.images].map((i) => [i.src.slice(0, 22), i.complete && i.naturalWidth > 0])"
        )
        print(
            f"report: {len(images)} figures; screenshot {tab.screenshot(tmp_path / 'report.png')}"
        )
        assert images and all(src == "data:image/png;base64," and shown for src, shown in images), (
            images
        )
        assert tab.evaluate("document.body.innerText.includes('defectflow')")
        assert external_requests(tab) == [], external_requests(tab)
        assert [u for u in recorded_requests(tab) if not u.startswith("data:")] == [report.as_uri()]
        assert failed_requests(tab) == []


def test_the_runs_data_docs_keep_their_local_copies(pipeline_model):
    """The training flow copies the Data Docs into the run folder: the copies travel along."""
    site = pipeline_model.run_dir / "validation" / "data_docs"
    pages = sorted(site.rglob("*.html"))
    assert (site / "index.html") in pages and len(pages) >= 3
    for page in pages:
        html = page.read_text(encoding="utf-8")
        assert external_assets(html) == [], page
        assert "static/vendor/bootstrap-4.3.1/dist/css/bootstrap.min.css" in html, page
    assert (site / VENDOR_DIR / "vega-5.33.1" / "build" / "vega.min.js").is_file()
