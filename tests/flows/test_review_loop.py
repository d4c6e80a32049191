"""The loop end to end on synthetic data: the served production model is unsure, its uncertain
answers land in the inbox, a person reviews them over the review API, and the nightly retrain
validates the reviewed images with the rest, trains on them and records the gate's decision.

The production model is the tiny helper model with a confidence threshold above any
probability (every answer "uncertain"), registered as trained on the synthetic data's
current version, so the nightly run skips until reviewed images change the data.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from helpers_models import make_tiny_model_dir
from helpers_processes import REPO_ROOT, isolated_env, serve_bento

from defectflow.artifacts import ModelInfo

pytestmark = pytest.mark.integration

TOKEN = "loop-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

_REGISTER = """
import sys
from pathlib import Path
from defectflow.environment import configure_environment
configure_environment()
from defectflow import registry
from defectflow.config import load_config
from defectflow.data.split import dataset_fingerprint
cfg = load_config("tiny", [f"data.root={sys.argv[2]}"])
version = dataset_fingerprint(sys.argv[2], "good", cfg.data.split)
tag = registry.save_model(Path(sys.argv[1]), "defectflow", {"metrics": {"accuracy": 0.2}, "data_fingerprint": version})
registry.promote(tag, reason="the model in production before the loop")
print(tag)
"""

_NIGHTLY = """
import json, sys
from defectflow.environment import configure_environment
configure_environment()
from defectflow.orchestration.flows.nightly import nightly_retrain
state = nightly_retrain(config="tiny", data_root=sys.argv[1], overrides=json.loads(sys.argv[2]), return_state=True)
data = state.result(raise_on_failure=False) if state.is_completed() else None
print(json.dumps({"type": state.type.value, "message": state.message, "data": data}, default=str))
"""


def _nightly(env: dict, data_root: Path, overrides: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _NIGHTLY, str(data_root), json.dumps(overrides)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def test_uncertain_answers_are_reviewed_and_tomorrows_model_learns_from_them(
    prefect_server, tiny_dataset, tmp_path
):
    home = tmp_path / "home"
    env = isolated_env(home)
    nightly_env = prefect_server.client_env(env)  # the nightly runs on the session's server
    data_root = shutil.copytree(tiny_dataset, tmp_path / "capsule")
    inbox_dir, incoming = tmp_path / "inbox", tmp_path / "incoming"
    nightly_overrides = [
        "tune.enabled=false",
        "train.epochs=1",
        "package.build_bento=false",
        f"serve.inbox.incoming={incoming}",
    ]

    model_dir = make_tiny_model_dir(tmp_path / "production-model")
    info = ModelInfo.load(model_dir)
    info.confidence_threshold = 1.01  # above any probability: this model is unsure of every image
    info.save(model_dir)
    production = subprocess.run(
        [sys.executable, "-c", _REGISTER, str(model_dir), str(data_root)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()[-1]

    before = _nightly(nightly_env, data_root, nightly_overrides)
    assert before["type"] == "COMPLETED" and before["message"].startswith("skipped: no new data"), (
        before
    )

    env_serve = {
        **env,
        "DEFECTFLOW_MODEL_TAG": production,
        "DEFECTFLOW_API_TOKEN": TOKEN,
        "DEFECTFLOW_SERVE_OVERRIDES": f"serve.inbox.enabled=true serve.inbox.path={inbox_dir} "
        f"serve.inbox.incoming={incoming}",
    }
    # New parts, not copies of files in the data (identical files would fail the duplicate checks).
    crack_path = next((data_root / "test" / "crack").glob("*.png"))
    crack = np.ascontiguousarray(cv2.imread(str(crack_path))[::-1, ::-1])
    crack_mask = np.ascontiguousarray(
        cv2.imread(str(data_root / "ground_truth" / "crack" / f"{crack_path.stem}_mask.png"), 0)[
            ::-1, ::-1
        ]
    )
    good = cv2.imread(str(next((data_root / "test" / "good").glob("*.png"))))
    uploads = [crack, np.ascontiguousarray(good[:, ::-1]), np.ascontiguousarray(good[::-1])]
    with serve_bento("service:DefectInspection", env_serve, tmp_path / "serve.log") as url:
        for i, image in enumerate(uploads):
            answer = httpx.post(
                f"{url}/predict",
                headers=AUTH,
                timeout=60,
                files={"image": (f"part-{i}.png", _png(image))},
            ).json()
            assert answer["status"] == "uncertain", answer
        items = []
        for _ in range(100):  # the inbox writer works behind the answers
            items = httpx.get(f"{url}/review/items", headers=AUTH, timeout=10).json()["items"]
            if len(items) == 3:
                break
            time.sleep(0.1)
        assert len(items) == 3 and {i["model"] for i in items} == {production}
        first, second, third = (item["id"] for item in sorted(items, key=lambda i: i["time"]))
        reviewed = httpx.post(
            f"{url}/review/items/{first}",
            headers=AUTH,
            timeout=30,
            data={"label": "crack", "reviewer": "qa-anna"},
            files={"mask": ("mask.png", _png(crack_mask), "image/png")},
        )
        assert reviewed.status_code == 200, reviewed.text
        reviewed = httpx.post(
            f"{url}/review/items/{second}",
            headers=AUTH,
            timeout=30,
            json={"label": "good", "mask": "clear", "reviewer": "qa-anna"},
        )
        assert reviewed.status_code == 200, reviewed.text
        assert (
            httpx.post(f"{url}/review/items/{third}/discard", headers=AUTH, timeout=30).status_code
            == 200
        )

    provenance = [
        json.loads(line) for line in (incoming / "provenance.jsonl").read_text().splitlines()
    ]
    assert {p["reviewer"] for p in provenance} == {"qa-anna"} and len(provenance) == 2

    after = _nightly(nightly_env, data_root, nightly_overrides)
    assert after["type"] == "COMPLETED", after
    assert not after["message"].startswith("skipped"), after[
        "message"
    ]  # the reviewed images are new data
    run_dir = Path(after["data"]["run_dir"])
    with open(run_dir / "manifest.csv") as f:
        origins = [row["origin"] for row in csv.DictReader(f)]
    assert sorted(o for o in origins if o.startswith("incoming/")) == [
        "incoming/test",
        "incoming/train",
    ]
    assert "passed" in (run_dir / "validation" / "summary.md").read_text().lower()
    gate = json.loads((run_dir / "gate.json").read_text())
    assert (
        gate["champion"] == production and gate["checks"]
    )  # compared with the model in production
    assert after["data"]["data_fingerprint"] != before["data"]["data_version"]
    models = json.loads(
        subprocess.run(
            [sys.executable, "-m", "defectflow.cli", "models", "list", "--json"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    )
    new = [m for m in models if m["tag"] == after["data"]["model_tag"]]
    assert new and new[0]["gate"] == after["message"]
