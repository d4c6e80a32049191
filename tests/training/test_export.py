"""The compact TFLite artifact: export, parity with Keras, the TFLite Predictor and the serving
format rule, on a tiny real Keras model (figures for a trained model: benchmarks/serving_format.py)."""

import json
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers_models import CLASSES, INPUT_SIZE, make_tiny_model_dir

from defectflow.artifacts import MODEL_FILE, TFLITE_FILE, ModelInfo
from defectflow.data.mvtec import scan_dataset
from defectflow.inference.predictor import Predictor, TFLiteBackend, _output_names
from defectflow.inference.preprocessing import read_image
from defectflow.training.export import (
    check_parity,
    choose_serving_format,
    export_compact,
    export_tflite,
    markdown,
)


def export_config(**changes) -> SimpleNamespace:
    values = {
        "format": "tflite",
        "quantization": "none",
        "serve": "auto",
        "min_class_agreement": 0.99,
        "max_dice_difference": 0.01,
    }
    return SimpleNamespace(**{**values, **changes})


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny model folder with its float32 TFLite export (read-only for the tests using it)."""
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("exported") / "model")
    export_tflite(model_dir, "none")
    return model_dir


@pytest.fixture(scope="module")
def samples(tiny_dataset):
    return scan_dataset(tiny_dataset)


@pytest.fixture(scope="module")
def images(samples):
    return [read_image(s.path) for s in samples[:10]]


@pytest.mark.parametrize("quantization", ["dynamic", "float16", "none"])
def test_export_writes_a_tflite_model_that_matches_keras(tmp_path, images, quantization):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    path = export_tflite(model_dir, quantization)
    assert (
        path == model_dir / TFLITE_FILE
        and 0 < path.stat().st_size < (model_dir / MODEL_FILE).stat().st_size
    )
    keras_probs, keras_masks, _ = Predictor.load(model_dir, format="keras").raw_outputs(images)
    tflite_probs, tflite_masks, _ = Predictor.load(model_dir, format="tflite").raw_outputs(images)
    assert tflite_probs.shape == keras_probs.shape == (len(images), len(CLASSES))
    assert tflite_masks.shape == keras_masks.shape == (len(images), INPUT_SIZE, INPUT_SIZE, 1)
    tolerance = 1e-5 if quantization == "none" else 2e-2
    np.testing.assert_allclose(tflite_probs, keras_probs, atol=tolerance)
    np.testing.assert_allclose(tflite_masks, keras_masks, atol=tolerance)
    assert not list(model_dir.glob("*.tmp"))


def test_both_formats_give_the_same_predictions(exported, images):
    keras_predictor = Predictor.load(exported, format="keras")
    tflite_predictor = Predictor.load(exported, format="tflite")
    assert (keras_predictor.format, tflite_predictor.format) == ("keras", "tflite")
    for k, t in zip(
        keras_predictor.predict_arrays(images), tflite_predictor.predict_arrays(images), strict=True
    ):
        assert k.label == t.label and k.mask.shape == t.mask.shape == images[0].shape[:2]
        assert np.mean(k.mask != t.mask) < 1e-3  # a pixel at the threshold may flip
        assert k.probabilities == pytest.approx(t.probabilities, abs=1e-5)


@pytest.mark.parametrize("per_image", [True, False])
def test_tflite_batch_size_does_not_change_the_outputs(exported, images, per_image):
    predictor = Predictor(
        TFLiteBackend(exported / TFLITE_FILE, per_image=per_image), ModelInfo.load(exported)
    )
    one_by_one = predictor.raw_outputs(images, batch_size=1)
    for batch_size in (3, 8, len(images)):  # 3: a last batch of 1 follows batches of 3
        batched = predictor.raw_outputs(images, batch_size=batch_size)
        assert batched.anomaly is one_by_one.anomaly is None  # no anomaly head
        for a, b in zip(one_by_one[:2], batched[:2], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_tflite_predictor_is_safe_to_call_from_threads(exported, images):
    predictor = Predictor.load(exported, format="tflite")
    expected = predictor.raw_outputs(images, batch_size=4)[0]
    results, errors = [], []

    def work():
        try:
            results.append(predictor.raw_outputs(images, batch_size=4)[0])
        except Exception as exc:  # noqa: BLE001  (reported below: a thread cannot fail the test)
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-6)


def test_predict_bytes_through_tflite(exported, samples):
    predictor = Predictor.load(exported, format="tflite")
    prediction = predictor.predict_bytes(Path(samples[0].path).read_bytes())
    assert (
        prediction.label in CLASSES
        and prediction.mask.shape == read_image(samples[0].path).shape[:2]
    )


def test_parity_passes_for_a_faithful_export_and_is_json(exported, samples):
    parity = check_parity(
        exported, samples, min_class_agreement=0.99, max_dice_difference=0.01, batch_size=4
    )
    assert parity["passed"] and parity["class_agreement"] == 1.0 and parity["disagreements"] == []
    assert parity["n_images"] == len(samples) and 0 < parity["n_defect_images"] < len(samples)
    assert parity["dice_difference"] < 1e-3 and parity["max_probability_difference"] < 1e-4
    assert parity["keras"]["dice"] == pytest.approx(parity["tflite"]["dice"], abs=1e-3)
    assert parity["sizes_mb"]["tflite"] > 0 and parity["sizes_mb"]["keras"] > 0
    assert json.loads(json.dumps(parity)) == parity


def test_parity_fails_when_the_export_is_of_another_model(exported, samples, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(exported, model_dir)
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    shutil.copy(export_tflite(other, "none"), model_dir / TFLITE_FILE)
    parity = check_parity(model_dir, samples)
    assert parity["max_probability_difference"] > 0.01
    assert not parity["passed"]
    assert (
        parity["class_agreement"] < 0.99
        or parity["dice_difference"] >= 0.01
        or parity["defect_dice_difference"] >= 0.01
    )


def test_parity_limits_decide(exported, samples):
    assert not check_parity(exported, samples[:6], min_class_agreement=1.01)["passed"]
    assert not check_parity(exported, samples[:6], max_dice_difference=0.0)["passed"]


def test_parity_needs_samples(exported):
    with pytest.raises(ValueError, match="sample list is empty"):
        check_parity(exported, [])


@pytest.mark.parametrize(
    ("serve", "has_tflite", "parity_passed", "tflite_faster", "expected"),
    [
        ("keras", True, True, True, "keras"),
        ("tflite", True, False, False, "tflite"),
        ("auto", True, True, True, "tflite"),
        ("auto", True, False, True, "keras"),
        ("auto", True, True, False, "keras"),
        ("auto", False, True, True, "keras"),
    ],
)
def test_serving_format_rule(serve, has_tflite, parity_passed, tflite_faster, expected):
    assert choose_serving_format(serve, has_tflite, parity_passed, tflite_faster) == expected


def test_serving_format_rule_rejects_bad_choices():
    with pytest.raises(ValueError, match="no TFLite artifact"):
        choose_serving_format("tflite", has_tflite=False)
    with pytest.raises(ValueError, match="unknown export.serve 'onnx'"):
        choose_serving_format("onnx", has_tflite=True)


def test_export_compact_records_the_choice_in_model_json(tmp_path, samples):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    summary = export_compact(
        model_dir, samples, export_config(quantization="float16"), batch_size=4, timing_repeats=5
    )
    info = ModelInfo.load(model_dir)
    assert summary["parity"]["passed"] and info.tflite["parity_passed"]
    faster = (
        summary["latency_batch1"]["tflite"]["p50_ms"] < summary["latency_batch1"]["keras"]["p50_ms"]
    )
    assert summary["format"] == info.serving_format == ("tflite" if faster else "keras")
    assert (
        info.tflite["quantization"] == "float16"
        and info.tflite["size_mb"] == summary["tflite"]["size_mb"]
    )
    assert Predictor.load(model_dir).format == info.serving_format  # the default follows model.json
    assert json.loads(json.dumps(summary)) == summary
    assert "Serving format" in markdown(summary) and "Parity on" in markdown(summary)

    forced = export_compact(model_dir, samples[:6], export_config(serve="keras"), timing_repeats=2)
    assert forced["format"] == ModelInfo.load(model_dir).serving_format == "keras"
    assert forced["reason"] == "export.serve=keras"
    assert Predictor.load(model_dir).format == "keras"


def test_export_compact_rejects_bad_settings_before_exporting(tmp_path, samples):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    with pytest.raises(ValueError, match="unknown export.format 'onnx'"):
        export_compact(model_dir, samples, export_config(format="onnx"))
    with pytest.raises(ValueError, match="unknown export.serve 'fastest'"):
        export_compact(model_dir, samples, export_config(serve="fastest"))
    with pytest.raises(ValueError, match="no test samples"):
        export_compact(model_dir, [], export_config())
    assert not (model_dir / TFLITE_FILE).exists()


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.keras to export"):
        export_tflite(tmp_path)
    model_dir = make_tiny_model_dir(tmp_path / "model")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        export_tflite(model_dir, "int4")


def test_predictor_load_errors_are_clear(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    with pytest.raises(ValueError, match="unknown model format 'onnx'"):
        Predictor.load(model_dir, format="onnx")
    with pytest.raises(FileNotFoundError, match="has no model.tflite"):
        Predictor.load(model_dir, format="tflite")
    info = ModelInfo.load(model_dir)
    info.serving_format = "tflite"  # chosen at export, then the file went missing
    info.save(model_dir)
    with pytest.raises(FileNotFoundError, match="has no model.tflite"):
        Predictor.load(model_dir)
    (model_dir / MODEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="missing model.keras"):
        Predictor.load(model_dir, format="keras")


def test_an_old_model_json_loads_as_keras(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    old = {
        "classes": CLASSES,
        "input_size": INPUT_SIZE,
        "mask_threshold": 0.5,
    }  # before the export fields
    (model_dir / "model.json").write_text(json.dumps(old))
    info = ModelInfo.load(model_dir)
    assert info.serving_format == "keras" and info.tflite is None
    assert Predictor.load(model_dir).format == "keras"


class _FakeRunner:
    def __init__(self, shapes: dict[str, list[int]]):
        self.shapes = shapes

    def get_output_details(self):
        return {name: {"shape_signature": np.array(shape)} for name, shape in self.shapes.items()}


def test_outputs_are_mapped_by_name_else_by_rank():
    named = _FakeRunner({"mask": [-1, 32, 32, 1], "class": [-1, 6]})
    assert _output_names(named, Path("m.tflite")) == {"class": "class", "mask": "mask"}
    unnamed = _FakeRunner({"output_0": [-1, 32, 32, 1], "output_1": [-1, 6]})  # order says nothing
    assert _output_names(unnamed, Path("m.tflite")) == {"class": "output_1", "mask": "output_0"}
    with pytest.raises(ValueError, match="cannot tell the class and mask outputs apart"):
        _output_names(_FakeRunner({"a": [-1, 6], "b": [-1, 7]}), Path("m.tflite"))


def test_importing_inference_does_not_import_tensorflow():
    code = "import sys, defectflow.inference.predictor, defectflow.training.export; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_saved_artifact_has_no_optimizer_state(tmp_path, tiny_dataset):
    import keras

    from defectflow.config import load_config
    from defectflow.training.train import TrainResult, save_artifact

    source = make_tiny_model_dir(tmp_path / "source")
    model = keras.saving.load_model(source / MODEL_FILE, compile=False)
    model.compile(
        optimizer="adam",
        loss={"class": "sparse_categorical_crossentropy", "mask": "binary_crossentropy"},
    )
    x = np.zeros((2, INPUT_SIZE, INPUT_SIZE, 3), np.float32)
    model.train_on_batch(
        x, {"class": np.array([0, 1]), "mask": np.zeros((2, INPUT_SIZE, INPUT_SIZE, 1))}
    )
    assert model.optimizer.variables  # Adam has state to leave out
    full = tmp_path / "full.keras"
    model.save(full)

    cfg = load_config("default", [f"data.root={tiny_dataset}", f"model.input_size={INPUT_SIZE}"])
    result = TrainResult(
        model=model, history={"loss": [1.0]}, seconds=1.0, device="/CPU:0", hyperparameters={}
    )
    model_dir = save_artifact(result, cfg, CLASSES, tmp_path / "model")
    with zipfile.ZipFile(model_dir / MODEL_FILE) as saved, zipfile.ZipFile(full) as with_optimizer:
        assert b"optimizer" in with_optimizer.read("model.weights.h5")
        assert b"optimizer" not in saved.read("model.weights.h5")
    assert (model_dir / MODEL_FILE).stat().st_size < full.stat().st_size
    reloaded = keras.saving.load_model(model_dir / MODEL_FILE, compile=False)
    np.testing.assert_allclose(
        reloaded.predict_on_batch(x + 100)["class"], model.predict_on_batch(x + 100)["class"]
    )
