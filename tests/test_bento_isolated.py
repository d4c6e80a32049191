"""The built Bento on its own: served by an interpreter whose import path holds only the
Bento's `src/` and the installed third-party packages (tests/helpers_pipeline.py), never the
checkout or the editable install, which would hide a module the Bento left out.

The model is what users serve by default: trained by the pipeline, with its anomaly head,
exported to TFLite and run in process with the default `serve.threads`. No Docker needed: this
runs wherever the tests run, and fails when serving code needs a module the Bento lacks.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import cv2
import httpx
import numpy as np
import pytest
from helpers_models import stained
from helpers_pipeline import clean_interpreter
from helpers_processes import serve_bento

from defectflow.inference.postprocessing import UNKNOWN_DEFECT
from defectflow.inference.preprocessing import read_image

pytestmark = pytest.mark.integration

#: Imports service.py the way the Bento's server does (cwd = the Bento's src/), runs one
#: prediction through the serving code, then reports where things came from and which
#: packages got imported on the way.
_IMPORT_AND_PREDICT = """
import importlib.util, json, sys
import service
import defectflow
from defectflow.inference.predictor import Predictor
prediction = Predictor.load(service.MODEL_DIR).predict_bytes(open(sys.argv[1], "rb").read())
print(json.dumps({
    "defectflow": defectflow.__file__,
    "service": service.__file__,
    "findable": {name: importlib.util.find_spec(name) is not None for name in ("flows", "tasks")},
    "data_findable": importlib.util.find_spec("defectflow.data") is not None,
    "imported": sorted({name.split(".")[0] for name in sys.modules}),
    "label": prediction.label,
    "anomaly_score": prediction.anomaly_score,
}))
"""

#: Packages the serving code of a TFLite model must not import (the Bento of a TFLite model
#: does not even install TensorFlow and Keras; the rest belong to training).
NOT_FOR_SERVING = {
    "tensorflow",
    "keras",
    "keras_tuner",
    "great_expectations",
    "prefect",
    "sklearn",
    "scipy",
    "pandas",
    "matplotlib",
}


@pytest.fixture(scope="module")
def python(tmp_path_factory):
    return clean_interpreter(tmp_path_factory.mktemp("clean") / "venv")


def _import_in_bento(python, src, env, image_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-c", _IMPORT_AND_PREDICT, str(image_path)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _check_answer(answer: dict, classes: list[str], height: int, width: int) -> np.ndarray:
    assert set(answer["probabilities"]) == set(classes)
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert answer["class"] in [*classes, UNKNOWN_DEFECT]
    assert answer["mask_size"] == [width, height]
    mask = cv2.imdecode(
        np.frombuffer(base64.b64decode(answer["mask_png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED
    )
    assert mask is not None and mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
    assert isinstance(answer["anomaly_score"], float) and answer["anomaly_threshold"] > 0
    return mask


def test_the_bento_imports_and_predicts_with_nothing_but_its_own_files(
    python, pipeline_model, tiny_dataset
):
    src = pipeline_model.bento_dir() / "src"
    env = {**pipeline_model.env, "DEFECTFLOW_MODEL_TAG": pipeline_model.model_tag}
    done = _import_in_bento(python, src, env, next((tiny_dataset / "test" / "crack").glob("*.png")))
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["defectflow"].startswith(str(src)) and seen["service"].startswith(str(src))
    assert not seen["data_findable"] and seen["findable"] == {"flows": False, "tasks": False}
    assert NOT_FOR_SERVING.isdisjoint(seen["imported"]), sorted(
        NOT_FOR_SERVING & set(seen["imported"])
    )
    assert seen["anomaly_score"] is not None


def test_the_isolation_catches_a_module_the_bento_left_out(
    python, pipeline_model, tiny_dataset, tmp_path
):
    """The check above can fail: the same Bento whose anomaly scoring imports the data package
    (left out of the Bento, as it once was) does not even import."""
    src = shutil.copytree(pipeline_model.bento_dir() / "src", tmp_path / "src")
    scoring = src / "defectflow" / "inference" / "anomaly_score.py"
    scoring.write_text(scoring.read_text() + "\nfrom defectflow.data.mvtec import Sample  # noqa\n")
    env = {**pipeline_model.env, "DEFECTFLOW_MODEL_TAG": pipeline_model.model_tag}
    done = _import_in_bento(python, src, env, next((tiny_dataset / "test" / "crack").glob("*.png")))
    assert done.returncode != 0
    assert "No module named 'defectflow.data'" in done.stderr


def test_the_served_bento_answers_predict(python, pipeline_model, tiny_dataset, tmp_path):
    info = pipeline_model.info
    assert info["serving_format"] == "tflite" and info["anomaly_threshold"] > 0
    samples = [read_image(path) for path in sorted((tiny_dataset / "test").glob("*/*.png"))[:6]]
    samples.append(cv2.resize(samples[0], (96, 80)))  # another size than the dataset's
    with serve_bento(
        pipeline_model.bento_dir(),
        pipeline_model.env,
        tmp_path / "serve.log",
        python=python,
        cwd=tmp_path,
    ) as url:
        meta = httpx.get(f"{url}/metadata", timeout=30).json()
        assert meta["model"] == pipeline_model.model_tag and meta["serving_format"] == "tflite"
        for rgb in samples:
            response = httpx.post(
                f"{url}/predict", files={"image": ("part.png", _png(rgb))}, timeout=60
            )
            assert response.status_code == 200, response.text
            _check_answer(response.json(), info["classes"], *rgb.shape[:2])
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_the_served_bento_answers_unknown_defect(python, pipeline_model, tiny_dataset, tmp_path):
    """The anomaly head alone decides (classifier threshold 1.0): a part with a magenta stain,
    a colour no training image has, is an unknown defect with a mask (its score was 7x the
    threshold when written); a good training image is good."""
    good = read_image(sorted((tiny_dataset / "train" / "good").glob("*.png"))[0])
    bento = pipeline_model.bento_dir(pipeline_model.anomaly_only_bento_tag)
    classes = pipeline_model.info["classes"]
    with serve_bento(
        bento, pipeline_model.env, tmp_path / "serve.log", python=python, cwd=tmp_path
    ) as url:
        answers = {}
        for name, rgb in (("good", good), ("stained", stained(good, (255, 0, 255)))):
            response = httpx.post(
                f"{url}/predict", files={"image": (f"{name}.png", _png(rgb))}, timeout=60
            )
            assert response.status_code == 200, response.text
            answers[name] = response.json()
            mask = _check_answer(answers[name], classes, *rgb.shape[:2])
            answers[name]["mask_pixels"] = int((mask > 0).sum())
    print(
        {
            name: (a["class"], round(a["anomaly_score"], 4), a["mask_pixels"])
            for name, a in answers.items()
        }
    )
    assert (
        answers["good"]["class"] == "good"
        and answers["good"]["anomaly_score"] <= answers["good"]["anomaly_threshold"]
    )
    unknown = answers["stained"]
    assert (
        unknown["class"] == UNKNOWN_DEFECT
        and unknown["is_defective"]
        and unknown["status"] == "uncertain"
    )
    assert unknown["anomaly_score"] > unknown["anomaly_threshold"] and unknown["mask_pixels"] > 0
