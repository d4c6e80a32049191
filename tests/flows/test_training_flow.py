"""The training flow for real: Prefect, Great Expectations, KerasTuner, Keras, BentoML and HTTP."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.integration

TINY = ["tune.max_trials=1", "tune.epochs=1", "train.epochs=1"]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _post(url: str, filename: str, data: bytes) -> tuple[int, dict]:
    body, content_type = _multipart("image", filename, data)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def test_flow_trains_packages_and_serves(prefect_server, tiny_dataset, tmp_path):
    from flows.training import training_pipeline

    summary = training_pipeline(config="tiny", overrides=[f"data.root={tiny_dataset}", *TINY])
    run_dir = Path(summary["run_dir"])
    for name in ("config.yaml", "manifest.csv", "augmentation_preview.png", "trials.json",
                 "training_curves.png", "gate.json", "package.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "validation" / "data_docs" / "index.html").exists()
    assert (run_dir / "evaluation" / "confusion_matrix.png").exists()
    assert set(summary["metrics"]) >= {"accuracy", "presence_accuracy", "defect_accuracy", "defect_dice"}
    assert summary["model_tag"].startswith("defectflow:")
    assert summary["bento_tag"]

    import bentoml

    model = bentoml.models.get(summary["model_tag"])
    assert model.info.metadata["metrics"]["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert "config_sha256" in model.info.metadata

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "defectflow.cli", "serve", "--bento", summary["bento_tag"], "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server)
        image_path = next((tiny_dataset / "test" / "crack").iterdir())
        status, body = _post(url + "/predict", image_path.name, image_path.read_bytes())
        assert status == 200, body
        assert body["class"] in ["good", "crack", "faulty_imprint", "poke", "scratch", "squeeze"]
        assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-4
        mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == cv2.imread(str(image_path)).shape[:2]
        status, body = _post(url + "/predict", "notes.txt", b"this is not an image")
        assert 400 <= status < 500, body
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()


def test_flow_stops_at_the_gate(prefect_server, tiny_dataset):
    from defectflow.gate import GateFailed
    from defectflow.registry import list_models
    from flows.training import training_pipeline

    before = {m["tag"] for m in list_models("defectflow")}
    with pytest.raises(GateFailed, match="accuracy = .* < 1.0100"):
        training_pipeline(config="tiny", overrides=[f"data.root={tiny_dataset}", *TINY, "gate.min_accuracy=1.01"])
    assert {m["tag"] for m in list_models("defectflow")} == before


def test_flow_stops_on_invalid_data(prefect_server, tiny_dataset, tmp_path):
    from defectflow.validation import DataValidationError
    from flows.training import training_pipeline

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    (broken / "test" / "scratch" / "000.png").write_bytes(b"truncated")
    with pytest.raises(DataValidationError, match="scratch/000.png"):
        training_pipeline(config="tiny", overrides=[f"data.root={broken}", *TINY])
