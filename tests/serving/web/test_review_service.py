"""The review inbox inside the real service (`bentoml serve service:DefectInspection` over HTTP
on 127.0.0.1): uncertain answers land in the inbox, the /review API and page review them into
the incoming dataset, behind the service's bearer token.

The served tiny model answers "uncertain": its model.json has a confidence threshold above any
probability (1.01). The review API is also tested on items this test puts into the inbox folder.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Iterator

import cv2
import httpx
import numpy as np
import pytest
from helpers_models import CLASSES, make_tiny_model_dir
from helpers_processes import isolated_env, serve_bento
from helpers_uploads import png_with_size

from defectflow.artifacts import ModelInfo
from defectflow.data.mvtec import scan_dataset
from defectflow.inference.preprocessing import read_mask
from defectflow.serving.inbox import Inbox, read_provenance

pytestmark = pytest.mark.integration

TOKEN = "review-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

_SAVE = """
import sys
from pathlib import Path
from defectflow.environment import configure_environment
configure_environment()
from defectflow import registry
print(registry.save_model(Path(sys.argv[1]), "defectflow", {"metrics": {"accuracy": 0.5}}))
"""


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def _image(seed: int, h: int = 36, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _decode(b64: str, flags=cv2.IMREAD_UNCHANGED) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), flags)
    assert image is not None
    return image


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("review-service")
    model_dir = make_tiny_model_dir(root / "model")
    info = ModelInfo.load(model_dir)
    info.confidence_threshold = 1.01  # every answer is below it: uncertain
    info.save(model_dir)
    env = isolated_env(root / "home")
    tag = subprocess.run(
        [sys.executable, "-c", _SAVE, str(model_dir)],
        env=env,
        cwd=root,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    inbox_dir, incoming = root / "inbox", root / "incoming"
    env.update(
        DEFECTFLOW_MODEL_TAG=tag,
        DEFECTFLOW_API_TOKEN=TOKEN,
        DEFECTFLOW_SERVE_OVERRIDES=f"serve.inbox.enabled=true serve.inbox.path={inbox_dir} "
        f"serve.inbox.incoming={incoming} serve.inbox.max_items=50",
    )
    with serve_bento("service:DefectInspection", env, root / "serve.log") as url:
        yield {
            "url": url,
            "tag": tag,
            "inbox": inbox_dir,
            "incoming": incoming,
            "log": root / "serve.log",
        }


def _seed(service: dict, label: str, seed: int) -> str:
    """An item put into the service's inbox folder by another process (as the CLI could)."""
    h, w = 36, 48
    mask = np.zeros((h, w), np.uint8)
    if label != "good":
        mask[4:12, 6:20] = 255
    probs = {c: 0.1 for c in CLASSES}
    probs[label] = 0.5
    answer = {
        "class": label,
        "probabilities": probs,
        "confidence": 0.5,
        "status": "uncertain",
        "mask_png_base64": base64.b64encode(_png(mask)).decode(),
        "mask_size": [w, h],
    }
    result = Inbox(service["inbox"], incoming=service["incoming"]).add(
        _png(_image(seed)), answer, service["tag"]
    )
    assert result.stored, result
    return result.id


def test_review_page_is_open_and_the_api_needs_the_token(service):
    url = service["url"]
    page = httpx.get(f"{url}/review", follow_redirects=True, timeout=10)
    assert page.status_code == 200 and "defectflow · review" in page.text
    csp = page.headers["content-security-policy"]
    assert (
        "default-src 'none'" in csp and "script-src 'sha256-" in csp and "connect-src 'self'" in csp
    )
    for method, path in [
        ("GET", "/review/items"),
        ("GET", "/review/items/x"),
        ("POST", "/review/items/x"),
        ("POST", "/review/items/x/discard"),
        ("POST", "/review/"),
    ]:
        response = httpx.request(method, f"{url}{path}", timeout=10)
        assert response.status_code == 401, (method, path, response.text)
        assert "bearer token" in response.json()["error"]
    assert (
        httpx.get(
            f"{url}/review/items", headers={"Authorization": "Bearer wrong"}, timeout=10
        ).status_code
        == 401
    )
    assert (
        httpx.get(f"{url}/metadata", timeout=10).status_code == 401
    )  # the service's own middleware still guards
    listed = httpx.get(f"{url}/review/items", headers=AUTH, timeout=10)
    assert listed.status_code == 200 and {"pending", "max_items", "stored"} <= set(
        listed.json()["stats"]
    )
    assert '"review_access":"token_required"' in service["log"].read_text()  # said at start


def test_review_over_http_writes_the_incoming_dataset(service):
    url = service["url"]
    crack, poke, good = (
        _seed(service, "crack", 1),
        _seed(service, "poke", 2),
        _seed(service, "good", 3),
    )
    listed = httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]
    by_id = {i["id"]: i for i in listed}
    assert {crack, poke, good} <= set(by_id)
    assert by_id[crack]["predicted_class"] == "crack" and by_id[crack]["confidence"] == 0.5
    assert by_id[crack]["model"] == service["tag"] and by_id[crack]["time"] > 0

    detail = httpx.get(f"{url}/review/items/{crack}", headers=AUTH, timeout=10).json()
    assert _decode(detail["image_png_base64"], cv2.IMREAD_COLOR).shape == (36, 48, 3)
    overlay = _decode(detail["overlay_png_base64"], cv2.IMREAD_COLOR)
    assert overlay.shape == (36, 48, 3) and not np.array_equal(overlay, _image(1)[:, :, ::-1])
    assert detail["prediction"]["classes"] == CLASSES

    def post(item_id, headers=None, **kwargs):
        return httpx.post(
            f"{url}/review/items/{item_id}",
            headers={**AUTH, **(headers or {})},
            timeout=10,
            **kwargs,
        )

    refused = [
        (
            post(crack, json={"label": "dent", "mask": "keep", "reviewer": "ann"}),
            400,
            "not a class of model",
        ),
        (
            post(crack, json={"label": "crack", "mask": "clear", "reviewer": "ann"}),
            400,
            "needs a defect mask",
        ),
        (post(crack, json={"label": "crack", "mask": "keep"}), 400, "`reviewer` is required"),
        (
            post(crack, content=b"{not json", headers={"content-type": "application/json"}),
            400,
            "not valid JSON",
        ),
        (
            post(good, json={"label": "crack", "reviewer": "ann"}),
            400,
            "the predicted mask is empty",
        ),
        (post("no-such-item", json={"label": "crack", "reviewer": "ann"}), 404, "no inbox item"),
        (
            httpx.get(f"{url}/review/items/no-such-item", headers=AUTH, timeout=10),
            404,
            "no inbox item",
        ),
    ]
    for response, status, message in refused:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
    assert {crack, poke, good} <= {
        i["id"] for i in httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]
    }

    done = post(crack, json={"label": "crack", "mask": "keep", "reviewer": "ann"})
    assert done.status_code == 200, done.text
    assert done.json()["image"] == f"test/crack/inbox-{crack}.png"
    assert done.json()["mask"] == f"ground_truth/crack/inbox-{crack}_mask.png"
    again = post(crack, json={"label": "crack", "mask": "keep", "reviewer": "ann"})
    assert again.status_code == 409 and "already reviewed" in again.json()["error"]

    drawn = np.zeros((36, 48), np.uint8)
    drawn[20:30, 30:40] = 255
    relabelled = post(
        good,
        data={"label": "poke", "reviewer": "bob"},
        files={"mask": ("m.png", _png(drawn), "image/png")},
    )
    assert relabelled.status_code == 200, relabelled.text
    assert (
        post(poke, data={"label": "good", "mask": "clear", "reviewer": "bob"}).json()["image"]
        == f"train/good/inbox-{poke}.png"
    )
    extra = _seed(service, "crack", 4)
    assert (
        httpx.post(f"{url}/review/items/{extra}/discard", headers=AUTH, timeout=10).json()["status"]
        == "discarded"
    )
    second = httpx.post(f"{url}/review/items/{extra}/discard", headers=AUTH, timeout=10)
    assert second.status_code == 409 and "already discarded" in second.json()["error"]

    samples = {s.path.stem: s for s in scan_dataset(service["incoming"])}
    assert samples[f"inbox-{crack}"].label == "crack"
    assert samples[f"inbox-{good}"].label == "poke" and samples[f"inbox-{poke}"].label == "good"
    assert np.array_equal(
        read_mask(samples[f"inbox-{good}"].mask_path), (drawn > 0).astype(np.uint8)
    )
    assert samples[f"inbox-{poke}"].mask_path is None
    assert f"inbox-{extra}" not in samples
    provenance = {p["inbox_id"]: p for p in read_provenance(service["incoming"])}
    assert provenance[good]["reviewer"] == "bob" and provenance[good]["predicted_class"] == "good"
    assert (
        provenance[good]["model"] == service["tag"] and provenance[good]["mask_source"] == "upload"
    )


def test_a_hostile_mask_upload_is_refused_and_the_item_stays_pending(service):
    """A mask goes through the upload checks of /predict before it is decoded: a PNG whose
    chunk claims ~4 GB (OpenCV would allocate it) or whose header declares 10^10 pixels."""
    url = service["url"]
    item = _seed(service, "crack", 7)
    lying = bytearray(_png(np.full((36, 48), 255, np.uint8)))
    idat = lying.find(b"IDAT") - 4
    lying[idat : idat + 4] = (0xFF0004D9).to_bytes(4, "big")
    huge = png_with_size(100_000, 100_000)  # a few hundred bytes
    for body, status, message in [
        (
            {"files": {"mask": ("m.png", bytes(lying), "image/png")}},
            400,
            "truncated or corrupt PNG",
        ),
        (
            {"files": {"mask": ("m.png", huge, "image/png")}},
            413,
            "exceeds the limit of 1728 pixels",
        ),
    ]:
        refused = httpx.post(
            f"{url}/review/items/{item}",
            headers=AUTH,
            timeout=10,
            data={"label": "crack", "reviewer": "eve"},
            **body,
        )
        assert refused.status_code == status, refused.text
        assert refused.headers["content-type"] == "application/json"
        assert (
            message in refused.json()["error"]
            and "the mask must be a PNG file" in refused.json()["error"]
        )
    as_json = httpx.post(
        f"{url}/review/items/{item}",
        headers=AUTH,
        timeout=10,
        json={
            "label": "crack",
            "reviewer": "eve",
            "mask_png_base64": base64.b64encode(bytes(lying)).decode(),
        },
    )
    assert as_json.status_code == 400 and "truncated or corrupt PNG" in as_json.json()["error"]
    pending = httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]
    assert item in {i["id"] for i in pending}
    assert not list(service["incoming"].rglob(f"inbox-{item}*"))


def test_uncertain_answers_land_in_the_inbox_and_are_reviewed(service):
    url = service["url"]
    before = {
        i["id"] for i in httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]
    }
    single = httpx.post(
        f"{url}/predict",
        files={"image": ("a.png", _png(_image(10)))},
        data={"overlay": "true"},
        headers={**AUTH, "X-Request-ID": "cam1-0001"},
        timeout=60,
    )
    assert single.status_code == 200, single.text
    assert single.json()["status"] == "uncertain"
    batch = httpx.post(
        f"{url}/predict_batch",
        headers=AUTH,
        timeout=60,
        files=[("images", (f"{i}.png", _png(_image(20 + i, 30, 40)))) for i in range(3)],
    )
    assert (
        batch.status_code == 200
        and [r["status"] for r in batch.json()["results"]] == ["uncertain"] * 3
    )

    deadline = time.monotonic() + 20
    while True:  # written by a background thread after the answers
        items = httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]
        new = [i for i in items if i["id"] not in before]
        if len(new) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(new) == 4, new
    assert all(i["model"] == service["tag"] and i["prediction_status"] == "uncertain" for i in new)
    details = {
        i["id"]: httpx.get(f"{url}/review/items/{i['id']}", headers=AUTH, timeout=10).json()
        for i in new
    }
    by_request = {d["prediction"]["request_id"]: d for d in details.values()}
    assert set(by_request) == {
        "cam1-0001",
        *(f"{batch.json()['request_id']}/{i}" for i in range(3)),
    }
    first = by_request["cam1-0001"]
    assert first["prediction"]["class"] == single.json()["class"]
    assert first["prediction"]["probabilities"] == pytest.approx(single.json()["probabilities"])
    assert "overlay_png_base64" not in first["prediction"]  # not stored: made again on demand
    assert first["image_size"] == [48, 36]
    assert np.array_equal(
        _decode(first["image_png_base64"], cv2.IMREAD_COLOR), _image(10)
    )  # as uploaded

    meta = httpx.get(f"{url}/metadata", headers=AUTH, timeout=10).json()
    assert meta["inbox"]["enabled"] and meta["inbox"]["counters"]["stored"] >= 4
    assert meta["inbox"]["counters"]["errors"] == 0
    assert (
        'defectflow_inbox_items_total{outcome="stored"}'
        in httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    )

    drawn = np.zeros((36, 48), np.uint8)
    drawn[0:6, 0:6] = 255
    done = httpx.post(
        f"{url}/review/items/{first['id']}",
        headers=AUTH,
        timeout=10,
        data={"label": "squeeze", "reviewer": "carol"},
        files={"mask": ("m.png", _png(drawn))},
    )
    assert done.status_code == 200, done.text
    sample = {s.path.stem: s for s in scan_dataset(service["incoming"])}[f"inbox-{first['id']}"]
    assert sample.label == "squeeze" and sample.path.read_bytes() == _png(_image(10))
    assert np.array_equal(read_mask(sample.mask_path), (drawn > 0).astype(np.uint8))


def test_review_app_says_when_the_inbox_is_off_and_keeps_its_page():
    from starlette.testclient import TestClient

    from defectflow.serving.web.review import review_app

    with TestClient(review_app(None, token=TOKEN)) as client:
        page = client.get("/")
        assert page.status_code == 200 and "defectflow · review" in page.text
        assert client.get("/items").status_code == 401
        off = client.get("/items", headers=AUTH)
        assert off.status_code == 404 and "serve.inbox.enabled=true" in off.json()["error"]
        assert (
            client.post(
                "/items/x", headers=AUTH, json={"label": "good", "reviewer": "a"}
            ).status_code
            == 404
        )


def _inbox_series(url: str) -> dict[str, float]:
    """defectflow_inbox_items_total by outcome, from /metrics (the service's own count, which
    also has the answers that could not even be queued: outcome="error")."""
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    series = {}
    for line in text.splitlines():
        if line.startswith("defectflow_inbox_items_total{"):
            labels, value = line.rsplit(" ", 1)
            series[labels.split('outcome="', 1)[1].split('"', 1)[0]] = float(value)
    return series


def test_32_concurrent_clients_lose_no_uncertain_answer(service):
    """32 clients at once, each answered "uncertain": all 32 answers are stored in the inbox,
    none refused (busy or full) and no error; each stored once, under its own request id,
    whole (the upload byte for byte, the answer it got) and named by exactly one index row.

    The items of earlier tests are discarded first, so the inbox's retention limits
    (serve.inbox.max_items, max_bytes) have room for all 32 and only this test's items count."""
    import asyncio

    url = service["url"]
    for item in httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]:
        discarded = httpx.post(f"{url}/review/items/{item['id']}/discard", headers=AUTH, timeout=10)
        assert discarded.status_code == 200, discarded.text
    uploads = {f"c32-{i:02d}": _png(_image(500 + i)) for i in range(32)}
    stats = httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["stats"]
    assert stats["pending"] == 0 and stats["pending_bytes"] == 0
    assert (
        stats["max_items"] >= 32
        and stats["max_bytes"] >= sum(map(len, uploads.values())) + 32 * 16_384
    )

    def counters() -> dict[str, int]:
        return httpx.get(f"{url}/metadata", headers=AUTH, timeout=10).json()["inbox"]["counters"]

    before, series_before = counters(), _inbox_series(url)

    async def clients() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/predict",
                        headers={**AUTH, "X-Request-ID": request_id},
                        files={"image": (f"{request_id}.png", data)},
                    )
                    for request_id, data in uploads.items()
                )
            )

    answers = dict(zip(uploads, asyncio.run(clients()), strict=True))
    assert [a.status_code for a in answers.values()] == [200] * 32, [
        a.text for a in answers.values()
    ]
    assert all(
        a.json()["status"] == "uncertain" and a.json()["request_id"] == r
        for r, a in answers.items()
    )

    outcomes = ("stored", "refused_full", "refused_busy", "errors")
    deadline = time.monotonic() + 30
    while True:  # the writer works behind the answers
        delta = {k: counters().get(k, 0) - before.get(k, 0) for k in outcomes}
        if sum(delta.values()) >= 32 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert delta == {"stored": 32, "refused_full": 0, "refused_busy": 0, "errors": 0}
    series = _inbox_series(url)
    changed = {
        k: d for k in {*series, *series_before} if (d := series.get(k, 0) - series_before.get(k, 0))
    }
    assert changed == {"stored": 32}

    items_dir = service["inbox"] / "items"
    files = sorted(
        p.name for p in items_dir.iterdir()
    )  # before this process opens the inbox (and cleans up)
    inbox = Inbox(service["inbox"], max_items=50, max_bytes=10**9)
    pending = inbox.list()
    assert len(pending) == 32
    assert files == sorted(
        f"{i['id']}{ext}" for i in pending for ext in (".png", ".json")
    )  # no leftover
    stored = {}
    for item in pending:
        detail = inbox.get(item["id"])
        stored[detail["prediction"]["request_id"]] = detail
    assert sorted(stored) == sorted(uploads)  # each answer once, none lost, none from elsewhere
    for request_id, detail in stored.items():
        answer = answers[request_id].json()
        assert detail["image_bytes"] == uploads[request_id]  # the upload, whole, as sent
        assert detail["model"] == service["tag"] and detail["prediction"]["status"] == "uncertain"
        assert detail["prediction"]["class"] == answer["class"]
        assert detail["prediction"]["probabilities"] == pytest.approx(answer["probabilities"])
