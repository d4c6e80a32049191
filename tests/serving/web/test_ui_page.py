"""The inspection page (/ui/ of service.py) in a real headless Chromium.

The module serves a tiny saved model with `bentoml serve service:DefectInspection` and drives
the system's Chromium (Debian package `chromium`, `make test` installs it) over the Chrome
DevTools Protocol (the client of scripts/browser.py, shared with
scripts/prefect_ui_screenshot.py): a real file upload through the page's file input, then the
page's class, probabilities and mask overlay are compared with what /predict answers for the
same bytes. Screenshots land in the test's tmp dir (paths printed). Without a Chromium binary
the browser tests are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from helpers_browser import DevTools, no_page_problems
from helpers_models import CLASSES, make_tiny_model_dir
from helpers_processes import isolated_env, serve_bento

from defectflow.serving.web.ui import content_security_policy, page_html, ui_app

# The DevTools client is shared with scripts/prefect_ui_screenshot.py (scripts/ is no package).
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))

pytestmark = pytest.mark.integration


_SAVE = """
import sys
from pathlib import Path
from defectflow.environment import configure_environment
configure_environment()
from defectflow import registry
print(registry.save_model(Path(sys.argv[1]), "defectflow", {"metrics": {"accuracy": 0.9}}))
"""


# --- the page as served (no browser) ----------------------------------------------------------


def _ask(app, method: str, path: str) -> httpx.Response:
    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ui.test") as client:
            return await client.request(method, path)

    return asyncio.run(ask())


def test_ui_app_serves_the_page_with_its_policy():
    app = ui_app()
    response = _ask(app, "GET", "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-cache"
    assert response.text == page_html()
    policy = response.headers["content-security-policy"]
    assert policy == content_security_policy(response.text)
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert _ask(app, "HEAD", "/").status_code == 200
    assert _ask(app, "POST", "/").status_code == 405


def test_page_is_self_contained():
    html = page_html()
    # Nothing that a browser would fetch from elsewhere: no absolute or protocol-relative URL
    # in an attribute, no CSS import or url(), no external script or stylesheet.
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:[a-z]+:)?//""", html, re.I)
    styles = "".join(re.findall(r"<style>(.*?)</style>", html, re.S))
    assert styles and not re.search(r"@import|url\(", styles, re.I)
    assert re.findall(r"<script\b[^>]*>", html) == ["<script>"]
    assert "<link" not in html.replace('<link rel="icon" href="data:,">', "")


# --- the page in Chromium --------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(browser_binary, tmp_path_factory) -> Iterator[dict]:
    """service.py from the repository serving a tiny saved model; its URL and model tag."""
    root = tmp_path_factory.mktemp("ui-service")
    make_tiny_model_dir(root / "model")
    env = isolated_env(root / "home")
    saved = subprocess.run(
        [sys.executable, "-c", _SAVE, str(root / "model")],
        env=env,
        cwd=root,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    tag = saved.stdout.split()[-1]
    env["DEFECTFLOW_MODEL_TAG"] = tag
    with serve_bento("service:DefectInspection", env, root / "serve.log") as url:
        yield {"url": url, "tag": tag, "log": root / "serve.log"}


def _open(page: DevTools, url: str) -> None:
    served = httpx.get(url, follow_redirects=True, timeout=10)
    assert served.status_code == 200 and 'id="file"' in served.text, (
        f"GET {url} answered {served.status_code}, not the inspection page: service.py must mount "
        'defectflow.serving.web.ui.ui_app() at /ui (@bentoml.asgi_app(ui_app(), path="/ui"))'
    )
    navigated = page.call("Page.navigate", url=url)
    assert not navigated.get("errorText"), (
        f"Chromium could not open {url}: {navigated['errorText']}"
    )
    page.wait_for(
        "document.readyState === 'complete' && !!document.getElementById('file') "
        "&& document.getElementById('result').dataset.state === 'idle'",
        f"{url} to load",
    )


def _upload(page: DevTools, path: Path) -> str:
    """Set the page's file input to `path` (a real upload) and wait for the outcome."""
    root = page.call("DOM.getDocument", depth=0)["root"]["nodeId"]
    node = page.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    assert node, "the page has no #file input"
    page.wait_for(
        "document.getElementById('result').dataset.state !== 'loading'", "the page to be idle"
    )
    page.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)
    return page.wait_for(
        "['done', 'error'].includes(document.getElementById('result').dataset.state) "
        "&& document.getElementById('result').dataset.state",
        f"the page's answer for {path.name}",
    )


def _screenshot(page: DevTools, path: Path) -> Path:
    data = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
    path.write_bytes(base64.b64decode(data))
    print(f"screenshot: {path}")
    return path


def _sample_png(path: Path) -> bytes:
    """A 200x150 "part": bright capsule with a dark crack on a black background."""
    image = np.zeros((150, 200, 3), np.uint8)
    cv2.ellipse(image, (100, 75), (70, 34), 0, 0, 360, (215, 225, 235), -1)
    cv2.ellipse(image, (62, 75), (32, 32), 0, 90, 270, (40, 40, 170), -1)
    cv2.polylines(
        image,
        [np.array([[95, 50], [105, 68], [99, 82], [112, 100]], np.int32)],
        False,
        (30, 30, 30),
        3,
    )
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    path.write_bytes(buffer.tobytes())
    return buffer.tobytes()


_READ_RESULT = """(() => {
  const text = (id) => document.getElementById(id).textContent.trim();
  return {
    state: document.getElementById('result').dataset.state,
    cls: text('result-class'), tone: document.getElementById('verdict').className,
    area: text('result-area'), model: text('result-model'), latency: text('result-latency'),
    bodyHidden: document.getElementById('result-body').hidden,
    stageHidden: document.getElementById('stage').hidden,
    probabilities: [...document.querySelectorAll('#probabilities li')].map((li) =>
      [li.querySelector('.name').textContent, li.querySelector('.value').textContent]),
  };
})()"""

# The overlay as drawn: the image layer's size, opacity and a few pixels, and the mask
# layer's coloured pixels as a '0'/'1' string in row-major order.
_READ_CANVASES = """(() => {
  const image = document.getElementById('image-layer'), mask = document.getElementById('mask-layer');
  const ip = image.getContext('2d').getImageData(0, 0, image.width, image.height).data;
  const mp = mask.getContext('2d').getImageData(0, 0, mask.width, mask.height).data;
  let opaque = 0, bits = '', red = 0;
  for (let i = 3; i < ip.length; i += 4) if (ip[i] === 255) opaque++;
  for (let i = 0; i < mp.length; i += 4) {
    const on = mp[i + 3] > 0;
    bits += on ? '1' : '0';
    if (on && mp[i] > 200 && mp[i + 1] < 60 && mp[i + 2] < 60) red++;
  }
  const at = (x, y) => Array.from(ip.slice(4 * (y * image.width + x), 4 * (y * image.width + x) + 3));
  const style = getComputedStyle(mask);
  return {image: [image.width, image.height], mask: [mask.width, mask.height], opaque, bits, red,
          pixels: [at(100, 75), at(5, 5), at(45, 75)], visibility: style.visibility,
          shown: mask.getBoundingClientRect().width > 0};
})()"""


def test_page_shows_class_probabilities_and_mask_overlay(service, page, tmp_path):
    url, tag = service["url"], service["tag"]
    sample = tmp_path / "part.png"
    data = _sample_png(sample)
    expected = httpx.post(f"{url}/predict", files={"image": ("part.png", data)}, timeout=60)
    assert expected.status_code == 200, expected.text
    expected = expected.json()
    mask = cv2.imdecode(
        np.frombuffer(base64.b64decode(expected["mask_png_base64"]), np.uint8), cv2.IMREAD_GRAYSCALE
    )

    _open(page, f"{url}/ui/")
    # The header shows the serving model from GET /metadata before anything is uploaded.
    page.wait_for(
        f"document.getElementById('meta-tag').textContent === {json.dumps(tag)}",
        "the model tag from /metadata",
        timeout=15,
    )
    assert page.evaluate("document.getElementById('model-meta').title") == "classes: " + ", ".join(
        CLASSES
    )
    start = time.monotonic()
    assert _upload(page, sample) == "done", page.evaluate(
        "document.getElementById('error').textContent"
    )
    print(f"page showed the result {time.monotonic() - start:.2f} s after the upload")
    shown = page.evaluate(_READ_RESULT)
    _screenshot(page, tmp_path / "ui-page.png")

    assert shown["cls"] in CLASSES
    assert shown["cls"] == expected["class"]
    assert shown["tone"] == (
        "good"
        if not expected["is_defective"]
        else "defect"
        if expected["probabilities"][expected["class"]] >= 0.5
        else "uncertain"
    )
    # Every class, most likely first, with the service's probabilities.
    ranked = sorted(expected["probabilities"].items(), key=lambda kv: -kv[1])
    assert [name for name, _ in shown["probabilities"]] == [name for name, _ in ranked]
    assert [value for _, value in shown["probabilities"]] == [f"{100 * p:.1f} %" for _, p in ranked]
    assert shown["area"].startswith(f"{100 * expected['defect_area_fraction']:.2f} %")
    assert shown["model"] == tag
    assert re.fullmatch(r"\d+ ms \(round trip\)", shown["latency"])
    assert not shown["bodyHidden"] and not shown["stageHidden"]

    canvases = page.evaluate(_READ_CANVASES)
    height, width = mask.shape
    assert canvases["image"] == canvases["mask"] == [width, height] == [200, 150]
    assert canvases["opaque"] == width * height  # the image itself is drawn
    colours = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    for (x, y), pixel in zip([(100, 75), (5, 5), (45, 75)], canvases["pixels"], strict=True):
        assert np.abs(np.array(pixel) - colours[y, x].astype(int)).max() <= 2, (x, y, pixel)
    # The overlay covers exactly the service's mask, in red, and is visible.
    drawn = np.frombuffer(canvases["bits"].encode(), np.uint8).reshape(height, width) == ord("1")
    assert np.array_equal(drawn, mask == 255), (
        f"overlay differs from the mask on {int((drawn != (mask == 255)).sum())} pixels"
    )
    assert canvases["red"] == int(drawn.sum())
    assert canvases["visibility"] == "visible" and canvases["shown"]
    print(f"class {shown['cls']}, mask covers {100 * drawn.mean():.1f} % of the image")
    no_page_problems(page, url)


def test_page_shows_the_service_error_and_recovers(service, page, tmp_path):
    url = service["url"]
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    refused = httpx.post(
        f"{url}/predict", files={"image": ("notes.txt", notes.read_bytes())}, timeout=60
    )
    assert 400 <= refused.status_code < 500
    message = refused.json()["error"]

    # Without the trailing slash: redirected to /ui/, and the API URL still resolves.
    _open(page, f"{url}/ui")
    assert page.evaluate("location.pathname") == "/ui/"
    assert _upload(page, notes) == "error"
    error = page.evaluate("document.getElementById('error').textContent")
    _screenshot(page, tmp_path / "ui-error.png")
    assert error.startswith(f"HTTP {refused.status_code}: ") and message in error, error
    assert page.evaluate("document.getElementById('error').hidden") is False
    assert page.evaluate("document.getElementById('result-body').hidden") is True

    sample = tmp_path / "part.png"
    _sample_png(sample)
    assert _upload(page, sample) == "done"
    assert page.evaluate("document.getElementById('error').hidden") is True
    assert page.evaluate("document.getElementById('result-class').textContent") in CLASSES
    assert not [e for e in page.events if e["method"] == "Runtime.exceptionThrown"]


def test_page_sends_the_bearer_token_and_keeps_it_for_the_session(service, page, tmp_path):
    url = service["url"]
    _open(page, f"{url}/ui/")
    page.evaluate(
        "(() => { const t = document.getElementById('token'); t.value = 's3cret-token';"
        " t.dispatchEvent(new Event('input')); t.dispatchEvent(new Event('change')); })()"
    )
    sample = tmp_path / "part.png"
    _sample_png(sample)
    assert _upload(page, sample) == "done"
    posts = [
        e["params"]["request"]
        for e in page.events
        if e["method"] == "Network.requestWillBeSent"
        and e["params"]["request"]["url"] == f"{url}/predict"
    ]
    assert len(posts) == 1 and posts[0]["method"] == "POST"
    headers = {k.lower(): v for k, v in posts[0]["headers"].items()}
    assert headers.get("authorization") == "Bearer s3cret-token"
    assert page.evaluate("sessionStorage.getItem('defectflow.apiToken')") == "s3cret-token"
    # A reload keeps the token (same tab session); an empty field removes it.
    _open(page, f"{url}/ui/")
    assert page.evaluate("document.getElementById('token').value") == "s3cret-token"
    page.evaluate(
        "(() => { const t = document.getElementById('token'); t.value = '';"
        " t.dispatchEvent(new Event('input')); })()"
    )
    assert page.evaluate("sessionStorage.getItem('defectflow.apiToken')") is None


def test_page_policy_blocks_anything_external(service, page):
    url = service["url"]
    _open(page, f"{url}/ui/")
    # 198.51.100.1 is TEST-NET-2: the policy must refuse it before any connection is tried.
    outcome = page.evaluate(
        "fetch('http://198.51.100.1/cdn.js').then(() => 'fetched', () => 'refused')", timeout=10
    )
    assert outcome == "refused"
    page.wait_for("window.__violations.length > 0", "the policy violation report", timeout=10)
    assert page.evaluate("window.__violations")[0].startswith("connect-src http://198.51.100.1")
