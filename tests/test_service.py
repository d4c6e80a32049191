"""service.py over real HTTP: `bentoml serve` in a subprocess, on a temporary DEFECTFLOW_HOME.

The module fixture saves a tiny model, builds the Bento pinned to it, then saves a newer
model (which the Bento must not serve), and serves the Bento on a free port.
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
from helpers_models import CLASSES, make_anomaly_model_dir, make_tiny_model_dir, stained
from helpers_processes import REPO_ROOT, isolated_env, serve_bento

from defectflow.data.synthetic import render_sample

pytestmark = pytest.mark.integration

_PACKAGE = """
import sys
from pathlib import Path
from defectflow.environment import configure_environment
configure_environment()
from defectflow import registry
root, repo = Path(sys.argv[1]), Path(sys.argv[2])
pinned = registry.save_model(root / "pinned", "defectflow", {"metrics": {"accuracy": 0.9}})
bento = registry.build_bento(pinned, repo / "bentofile.yaml", repo)
newer = registry.save_model(root / "newer", "defectflow", {"metrics": {"accuracy": 0.1}})
registry.promote(pinned)  # production is the older model: serving must not pick "latest"
lite = registry.save_model(root / "lite", "litemodel", {"metrics": {"accuracy": 0.5}})
print(pinned, bento, newer, lite)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("service")
    make_tiny_model_dir(root / "pinned")
    make_tiny_model_dir(root / "newer", seed=1)
    from defectflow.artifacts import ModelInfo
    from defectflow.training.export import export_tflite

    export_tflite(make_anomaly_model_dir(root / "lite", GOOD_CAPSULES), "none")
    info = ModelInfo.load(root / "lite")
    info.serving_format = "tflite"
    info.save(root / "lite")
    env = isolated_env(root / "home")
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _PACKAGE, str(root), str(REPO_ROOT)],
        env=env,
        cwd=root,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    pinned, bento, newer, lite = done.stdout.split()[-4:]
    print(f"\nsaved and built {bento} in {time.monotonic() - start:.1f} s")
    return {
        "root": root,
        "env": env,
        "pinned": pinned,
        "bento": bento,
        "newer": newer,
        "lite": lite,
    }


@pytest.fixture(scope="module")
def server(store) -> Iterator[str]:
    with serve_bento(store["bento"], store["env"], store["root"] / "bento-serve.log") as url:
        yield url


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


#: The good images the "lite" model's anomaly head was fitted on (so they score ~0).
GOOD_CAPSULES = [render_sample(np.random.default_rng(5), 64, None)[0] for _ in range(8)]
_NOISE_PNG = _png(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _predict(url: str, data: bytes, filename: str = "part.png") -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"image": (filename, data)}, timeout=60)


def _check_prediction(answer: dict, width: int, height: int) -> None:
    assert answer["class"] in CLASSES
    assert set(answer["probabilities"]) == set(CLASSES)
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert answer["class"] == max(answer["probabilities"], key=answer["probabilities"].get)
    assert answer["mask_size"] == [width, height]
    mask = cv2.imdecode(
        np.frombuffer(base64.b64decode(answer["mask_png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED
    )
    assert mask is not None and mask.shape == (height, width)
    assert set(np.unique(mask)) <= {0, 255}
    assert 0.0 <= answer["defect_area_fraction"] <= 1.0


def test_predict_colour_png_of_another_size_than_the_model(server, store):
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    start = time.monotonic()
    response = _predict(server, _png(rgb))
    print(f"\n/predict answered in {1000 * (time.monotonic() - start):.0f} ms")
    assert response.status_code == 200, response.text
    answer = response.json()
    _check_prediction(answer, width=70, height=50)
    # The Bento serves the model it was built with, not the newest one in the store.
    assert answer["model"] == store["pinned"] != store["newer"]


def test_predict_16_bit_grayscale_png(server):
    gray = np.random.default_rng(1).integers(0, 65536, (45, 33), dtype=np.uint16)
    response = _predict(server, _png(gray))
    assert response.status_code == 200, response.text
    _check_prediction(response.json(), width=33, height=45)


@pytest.mark.parametrize(
    ("filename", "data", "message"),
    [
        ("notes.txt", b"this is not an image\n", "not a decodable image"),
        ("empty.png", b"", "empty file"),
        ("truncated.png", _NOISE_PNG[: len(_NOISE_PNG) * 2 // 3], "not a decodable image"),
    ],
    ids=["text", "empty", "truncated-png"],
)
def test_predict_rejects_what_is_not_an_image(server, filename, data, message):
    response = _predict(server, data, filename)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert message in response.json()["error"]


def test_predict_without_the_image_field_is_a_client_error(server):
    response = httpx.post(f"{server}/predict", files={"file": ("a.png", b"x")}, timeout=60)
    assert 400 <= response.status_code < 500
    assert "image" in response.text


def test_openapi_documents_the_endpoint(server):
    spec = httpx.get(f"{server}/docs.json", timeout=10).json()
    post = spec["paths"]["/predict"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert "mask_png_base64" in post["description"]


def test_predict_batch_answers_each_image_in_order(server):
    sizes = [(30, 40), (64, 64), (21, 55)]
    images = [
        np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        for i, (h, w) in enumerate(sizes)
    ]
    files = [("images", (f"{i}.png", _png(img))) for i, img in enumerate(images)]
    response = httpx.post(f"{server}/predict_batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3
    for (h, w), img, result in zip(sizes, images, results, strict=True):
        _check_prediction(result, width=w, height=h)
        single = _predict(server, _png(img)).json()
        assert single["class"] == result["class"]
        assert single["probabilities"] == pytest.approx(result["probabilities"], abs=1e-5)


def test_predict_batch_refuses_bad_calls_whole(server):
    good = ("images", ("a.png", _NOISE_PNG))
    response = httpx.post(
        f"{server}/predict_batch", files=[good, ("images", ("b.txt", b"text"))], timeout=60
    )
    assert response.status_code == 400 and "image 1 (counting from 0)" in response.json()["error"]
    response = httpx.post(f"{server}/predict_batch", files=[good] * 33, timeout=60)
    assert response.status_code == 413 and "between 1 and 32" in response.json()["error"]


def test_concurrent_answers_equal_the_sequential_answers_of_the_same_images(
    pipeline_server, tiny_dataset
):
    """The default setup (the session's served pipeline Bento, tests/conftest.py): anomaly head,
    TFLite in process, requests on `serve.threads` threads."""
    _check_concurrent_answers(pipeline_server.url, tiny_dataset)


def test_concurrent_answers_from_the_batched_keras_model_are_each_their_own(server, tiny_dataset):
    """A Keras model: forward passes in the model service behind BentoML's adaptive batching."""
    _check_concurrent_answers(server, tiny_dataset)


def _check_concurrent_answers(url: str, dataset) -> None:
    """32 different images, each answered alone first, then all at once (twice, in two orders):
    every concurrent answer must be its own image's answer. The sequential answers differ
    pairwise, so an answer given to the wrong request cannot go unnoticed."""
    import asyncio
    import random

    paths = sorted((dataset / "test").glob("*/*.png")) + sorted(
        (dataset / "train" / "good").glob("*.png")
    )
    images = []
    for i in range(32):
        bgr = cv2.imread(str(paths[i % len(paths)]))
        images.append(
            _png(cv2.resize(bgr, (48 + i, 40 + 2 * i)))
        )  # its own size: its own mask size

    def key(answer: dict) -> tuple:
        return (
            answer["class"],
            tuple(sorted(answer["probabilities"].items())),
            answer["anomaly_score"],
            answer["mask_png_base64"],
        )

    sequential = []
    for data in images:
        response = _predict(url, data)
        assert response.status_code == 200, response.text
        sequential.append(key(response.json()))
    assert len({answer[1:3] for answer in sequential}) == len(
        images
    )  # distinguishable without the mask

    async def send_all(order):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *[
                    client.post(f"{url}/predict", files={"image": ("x.png", images[i])})
                    for i in order
                ]
            )

    for order in (list(range(32)), random.Random(0).sample(range(32), 32)):
        responses = asyncio.run(send_all(order))
        for i, response in zip(order, responses, strict=True):
            assert response.status_code == 200, response.text
            assert key(response.json()) == sequential[i], (
                f"image {i} got another answer when sent with 31 others"
            )


def test_overlay_and_request_id(server):
    rgb = np.random.default_rng(3).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    response = httpx.post(
        f"{server}/predict",
        files={"image": ("a.png", _png(rgb))},
        data={"overlay": "true"},
        headers={"X-Request-ID": "line3-cam2-000123"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["request_id"] == response.headers["x-request-id"] == "line3-cam2-000123"
    painted = cv2.imdecode(
        np.frombuffer(base64.b64decode(answer["overlay_png_base64"]), np.uint8), cv2.IMREAD_COLOR
    )
    assert painted.shape == (24, 36, 3)
    assert "overlay_png_base64" not in _predict(server, _png(rgb)).json()


def test_metadata_says_what_is_serving(server, store):
    response = httpx.get(f"{server}/metadata", timeout=10)
    assert response.status_code == 200
    meta = response.json()
    assert (
        meta["model"] == store["pinned"] and meta["classes"] == CLASSES and meta["input_size"] == 32
    )
    assert meta["serving_format"] in ("keras", "tflite") and len(meta["config_sha256"]) == 64
    assert meta["limits"]["max_batch_images"] == 32
    assert "/metadata" in httpx.get(f"{server}/docs.json", timeout=10).json()["paths"]


def test_prometheus_metrics_and_json_log_lines(server, store):
    import json

    assert _predict(server, _NOISE_PNG).status_code == 200
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert 'defectflow_prediction_latency_seconds_count{endpoint="/predict"}' in text
    assert "defectflow_predictions_total{predicted_class=" in text
    assert 'defectflow_rejected_uploads_total{status="400"}' in text  # from the bad-upload tests
    records = [
        json.loads(line[line.index("{") :])
        for line in (store["root"] / "bento-serve.log").read_text().splitlines()
        if '"event":"prediction"' in line
    ]
    ok = [r for r in records if r["status"] == 200]
    assert ok and {"request_id", "model", "latency_ms", "class", "confidence", "image_size"} <= set(
        ok[-1]
    )
    assert any(r["status"] == 400 and "error" in r for r in records)


def test_serve_from_source_resolves_the_production_model(store):
    env = {k: v for k, v in store["env"].items() if k != "DEFECTFLOW_MODEL_TAG"}
    with serve_bento("service:DefectInspection", env, store["root"] / "source-serve.log") as url:
        response = _predict(url, _png(np.zeros((20, 24, 3), np.uint8)))
    assert response.status_code == 200, response.text
    assert response.json()["model"] == store["pinned"]
    _check_prediction(response.json(), width=24, height=20)


def test_a_tflite_model_serves_inside_the_http_service(store):
    env = {**store["env"], "DEFECTFLOW_MODEL_TAG": store["lite"]}
    log = store["root"] / "lite-serve.log"
    with serve_bento("service:DefectInspection", env, log) as url:
        assert httpx.get(f"{url}/metadata", timeout=10).json()["serving_format"] == "tflite"
        known = _predict(url, _png(cv2.cvtColor(GOOD_CAPSULES[0], cv2.COLOR_RGB2BGR)))
        assert known.status_code == 200, known.text
        # Its classifier answers good unless P(defect) > 0.999: not the most probable class.
        assert known.json()["mask_size"] == [64, 64] and set(known.json()["probabilities"]) == set(
            CLASSES
        )
        assert known.json()["model"] == store["lite"]
        # Its classifier calls everything good; its anomaly head knows these good capsules only.
        known = known.json()
        assert known["class"] == "good" and not known["is_defective"]
        assert known["anomaly_score"] < known["anomaly_threshold"]
        novel = _predict(
            url, _png(cv2.cvtColor(stained(GOOD_CAPSULES[0]), cv2.COLOR_RGB2BGR))
        ).json()
        assert (
            novel["class"] == "unknown_defect"
            and novel["is_defective"]
            and novel["status"] == "uncertain"
        )
        assert novel["anomaly_score"] > novel["anomaly_threshold"] == known["anomaly_threshold"]
        mask = cv2.imdecode(
            np.frombuffer(base64.b64decode(novel["mask_png_base64"]), np.uint8),
            cv2.IMREAD_GRAYSCALE,
        )
        assert mask.shape == (64, 64) and mask[32, 32] == 255  # the anomaly map covers the stain
        assert set(novel["probabilities"]) == set(CLASSES)  # the known classes' probabilities stay
        meta = httpx.get(f"{url}/metadata", timeout=10).json()
        assert meta["thresholds"]["anomaly"] == pytest.approx(known["anomaly_threshold"], abs=1e-6)
    assert "defectflow-model" not in log.read_text()  # no second service for a TFLite model
