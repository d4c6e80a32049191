import json

import numpy as np
import pytest

from defectflow.config import load_config
from defectflow.data.augment import JointAugmentation
from defectflow.data.dataset import load_split, make_dataset
from defectflow.data.mvtec import class_names, scan_dataset
from defectflow.data.split import select, stratified_split
from defectflow.evaluation import evaluate
from defectflow.inference import Predictor
from defectflow.training import (
    DeviceError,
    PreparedData,
    balanced_class_weights,
    save_artifact,
    select_device,
    train,
    tune,
)

OVERRIDES = ["model.backbone=plain", "model.input_size=32", "model.base_filters=4", "model.depth=2", "tune.max_trials=2",
             "tune.epochs=1", "tune.base_filters=[4]", "train.epochs=2", "train.verbose=0"]


@pytest.fixture(scope="module")
def prepared(tiny_dataset):
    cfg = load_config("default", [f"data.root={tiny_dataset}", *OVERRIDES])
    samples = scan_dataset(tiny_dataset)
    rows = stratified_split(samples, 0.5, 0.25, 0.25, seed=0)
    classes = class_names(samples)
    data = PreparedData(
        load_split(select(rows, "train"), classes, 32),
        load_split(select(rows, "val"), classes, 32),
        classes,
        JointAugmentation(cfg.augment),
    )
    return cfg, data, rows


def test_loaded_arrays(prepared):
    _, data, _ = prepared
    assert data.train.images.shape[1:] == (32, 32, 3)
    assert data.train.masks.shape[1:] == (32, 32, 1)
    defect = data.train.labels != 0
    assert (data.train.masks[defect].reshape(defect.sum(), -1).max(axis=1) > 0).all()
    assert data.train.masks[~defect].sum() == 0
    batch_x, batch_y = next(iter(make_dataset(data.train, 4, augment=data.augmentation, shuffle=True)))
    assert batch_x.shape == (4, 32, 32, 3) and set(batch_y) == {"class", "mask"}


def test_balanced_class_weights():
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights[1] == pytest.approx(3 * weights[0])
    assert weights[2] == 0.0


def test_device_selection_on_cpu_machine():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    assert select_device("auto") == "/CPU:0"
    with pytest.raises(DeviceError, match="no GPU"):
        select_device("gpu")


def test_tune_train_save_load_evaluate(prepared, tmp_path):
    cfg, data, rows = prepared
    best, trials = tune(cfg, data, tmp_path)
    assert len(trials) == 2 and all("val_loss" in t for t in trials)
    assert best["base_filters"] == 4
    assert json.loads((tmp_path / "trials.json").read_text())
    result = train(cfg, data, best)
    assert len(result.history["loss"]) == 2 and result.device == "/CPU:0"
    model_dir = save_artifact(result, cfg, data.classes, tmp_path / "model", metrics={"accuracy": 0.5})
    assert {p.name for p in model_dir.iterdir()} >= {"model.keras", "model.json", "config.yaml", "metrics.json"}

    predictor = Predictor.load(model_dir)
    test = select(rows, "test")
    evaluation = evaluate(predictor, test, batch_size=4, plot_dir=tmp_path / "eval", plot_count=4)
    m = evaluation.metrics
    assert m["n_images"] == len(test)
    for key in ("accuracy", "presence_accuracy", "defect_accuracy", "dice", "defect_dice", "soft_dice"):
        assert 0.0 <= m[key] <= 1.0
    assert (tmp_path / "eval" / "confusion_matrix.png").exists()
    assert (tmp_path / "eval" / "predictions.png").exists()
    assert "| accuracy |" in evaluation.markdown()
    assert evaluation.save(tmp_path / "eval").exists()


def test_tuning_disabled_uses_config_values(prepared, tmp_path):
    cfg, data, _ = prepared
    cfg = load_config("default", [*OVERRIDES, "tune.enabled=false", "model.base_filters=8"])
    best, trials = tune(cfg, data, tmp_path)
    assert trials == [] and best["base_filters"] == 8


def test_predictor_rejects_a_folder_that_is_no_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        Predictor.load(tmp_path)


def test_evaluate_needs_samples(prepared):
    with pytest.raises(ValueError, match="empty"):
        evaluate(None, [])


def test_lite0_trains_in_two_phases(prepared, tmp_path):
    _, data, rows = prepared
    cfg = load_config("default", ["model.backbone=lite0", "model.input_size=32", "model.base_filters=4",
                                  "train.epochs=2", "train.frozen_epochs=1", "train.verbose=0"])
    result = train(cfg, data, {"base_filters": 4, "learning_rate": 1e-3, "dropout": 0.0})
    assert len(result.history["loss"]) == 2
    model_dir = save_artifact(result, cfg, data.classes, tmp_path / "model")
    predictions = Predictor.load(model_dir).predict_arrays([np.zeros((40, 50, 3), np.uint8)])
    assert predictions[0].mask.shape == (40, 50)
