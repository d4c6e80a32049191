"""The Bento as a container image, built and run for real (scripts/container.py).

A tiny model, served from Keras or from TFLite (whose Bento has no TensorFlow), is saved,
promoted and packed into a Bento in a temporary DEFECTFLOW_HOME; the image is built with
`bentoml containerize` on the local Debian base image (made with debootstrap on first use,
then reused while its recipe's hash is unchanged; BuildKit's layer cache, keyed by content,
makes the rebuild of unchanged requirements take seconds), run on 127.0.0.1, asked /readyz
and /predict, checked not to run as root, then removed with the image it built. Skipped, with
the reason, where no container engine can be started (no docker, dockerd does not start, not
root): `make test` never needs docker.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from helpers_models import CLASSES, make_tiny_model_dir
from helpers_processes import REPO_ROOT, isolated_env

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("defectflow_container", REPO_ROOT / "scripts" / "container.py")
container = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = container  # dataclasses look their module up there
_spec.loader.exec_module(container)

_PACKAGE = """
import sys
from pathlib import Path
from defectflow.environment import configure_environment
configure_environment()
from defectflow import registry
from defectflow.artifacts import ModelInfo
root, repo, serving_format = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if serving_format == "tflite":
    from defectflow.export import export_tflite
    export_tflite(root / "tiny")
    info = ModelInfo.load(root / "tiny")
    info.serving_format = "tflite"
    info.save(root / "tiny")
tag = registry.save_model(root / "tiny", "defectflow", {"metrics": {"accuracy": 0.5}})
registry.promote(tag)
print(tag, registry.build_bento(tag, repo / "bentofile.yaml", repo))
"""


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    """The engine for the module (dockerd started here is stopped after it) and the base image."""
    with contextlib.ExitStack() as stack:
        try:
            engine = stack.enter_context(
                container.engine(tmp_path_factory.mktemp("engine"), lock_timeout=600))
            base = container.ensure_base_image(engine, container.bentofile_base_image())
        except container.EngineUnavailable as exc:
            print(f"\ncontainer tests skipped: {exc}")
            pytest.skip(str(exc))
        print(f"\nbase image {base['size'] / 1e6:.0f} MB ({'built' if base['built'] else 'reused'})")
        yield engine


@pytest.mark.parametrize("serving_format", ["keras", "tflite"])
def test_bento_container_serves_predict_as_non_root(docker, tmp_path, serving_format):
    make_tiny_model_dir(tmp_path / "tiny")
    env = isolated_env(tmp_path / "home")
    done = subprocess.run([sys.executable, "-c", _PACKAGE, str(tmp_path), str(REPO_ROOT), serving_format],
                          env=env, cwd=tmp_path, check=True, timeout=300, capture_output=True, text=True)
    model, bento = done.stdout.split()[-2:]

    image = f"defectflow-test:{bento.split(':', 1)[1]}"
    try:
        built = container.build_image(docker, bento, image, env=env,
                                      log_file=tmp_path / "containerize.log")
        print(f"\n{serving_format} image {built['size'] / 1e6:.0f} MB in {built['seconds']:.0f} s "
              f"(containerize {built['containerize_seconds']:.0f} s)")
        labels = json.loads(docker.out("image", "inspect", "--format", "{{json .Config.Labels}}", image))
        assert labels["org.defectflow.model"] == model and labels["org.defectflow.bento"] == bento

        with container.run_container(docker, image, ready_timeout=240) as running:
            print(f"ready {running.ready_seconds:.1f} s after docker run")
            rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
            start = time.monotonic()
            status, body = container.post_image(running.url, _png(rgb))
            print(f"POST /predict answered in {1000 * (time.monotonic() - start):.0f} ms")
            assert status == 200, body[:500]
            answer = json.loads(body)
            assert answer["class"] in CLASSES
            assert set(answer["probabilities"]) == set(CLASSES)
            assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
            mask = cv2.imdecode(np.frombuffer(base64.b64decode(answer["mask_png_base64"]), np.uint8),
                                cv2.IMREAD_UNCHANGED)
            assert mask is not None and mask.shape == (50, 70)
            assert answer["model"] == model

            status, body = container.post_image(running.url, b"this is not an image\n", "notes.txt")
            assert status == 400 and b"not a decodable image" in body

            users = container.process_user(docker, running.name)
            print(f"server process uid {users['main_uid']} ({users['user']})")
            assert users["main_uid"] != 0 and users["exec_uid"] != 0
            assert users["user"] == "bentoml"
            # The compilers BentoML's Dockerfile installs are not in the served image, nor
            # TensorFlow in the image of a TFLite model.
            assert docker("exec", running.name, "sh", "-c", "command -v gcc || command -v cc",
                          check=False).returncode != 0
            has_tf = docker.out("exec", running.name, "python", "-c",
                                "import importlib.util; print(importlib.util.find_spec('tensorflow') is not None)")
            assert has_tf == str(serving_format == "keras")
    finally:
        docker("rmi", "--force", image, check=False)
