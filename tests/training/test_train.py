import csv
import json

import numpy as np
import pytest

from defectflow.config import load_config
from defectflow.data.dataset import make_dataset
from defectflow.data.mvtec import class_names, scan_dataset
from defectflow.data.split import select, stratified_split
from defectflow.evaluation.evaluate import evaluate
from defectflow.inference.predictor import Predictor
from defectflow.training.train import (
    HYPERPARAMETER_KEYS,
    DeviceError,
    PreparedData,
    acceleration,
    balanced_class_weights,
    hyperparameters_of,
    save_artifact,
    select_device,
    train,
)
from defectflow.training.tune import apply_hyperparameters, tune

OVERRIDES = [
    "model.backbone=plain",
    "model.input_size=32",
    "model.base_filters=4",
    "model.depth=2",
    "tune.max_trials=2",
    "tune.epochs=1",
    "tune.space.base_filters=[4,8]",
    "tune.space.learning_rate=[0.001]",
    "tune.space.dropout=[]",
    "train.epochs=2",
    "train.verbose=0",
    "train.tensorboard=false",
]


@pytest.fixture(scope="module")
def prepared(tiny_dataset):
    samples = scan_dataset(tiny_dataset)
    rows = stratified_split(samples, 0.5, 0.25, 0.25, seed=0)
    data = PreparedData(select(rows, "train"), select(rows, "val"), class_names(samples))
    return data, rows


def tiny_config(tiny_dataset, *overrides):
    return load_config("default", [f"data.root={tiny_dataset}", *OVERRIDES, *overrides])


def test_arrays_are_read_once_per_size(prepared):
    data, _ = prepared
    train_32 = data.arrays("train", 32)
    assert data.arrays("train", 32) is train_32
    assert train_32.images.shape[1:] == (32, 32, 3) and train_32.masks.shape[1:] == (32, 32, 1)
    assert data.arrays("train", 64).images.shape[1:] == (64, 64, 3)
    defect = train_32.labels != 0
    assert (train_32.masks[defect].reshape(defect.sum(), -1).max(axis=1) > 0).all()
    assert train_32.masks[~defect].sum() == 0
    batch_x, batch_y = next(iter(make_dataset(train_32, 4, shuffle=True)))
    assert batch_x.shape == (4, 32, 32, 3) and set(batch_y) == {"class", "mask"}


def test_balanced_class_weights():
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights[1] == pytest.approx(3 * weights[0])
    assert weights[2] == 0.0


def test_device_selection_on_cpu_machine(tiny_dataset):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    assert select_device("auto") == "/CPU:0"
    with pytest.raises(DeviceError, match="no GPU"):
        select_device("gpu")
    auto = acceleration(tiny_config(tiny_dataset))
    assert (auto.mixed_precision, auto.jit_compile) == (False, False)  # auto: only with a GPU
    forced = acceleration(
        tiny_config(tiny_dataset, "train.mixed_precision=on", "train.jit_compile=on")
    )
    assert (forced.mixed_precision, forced.jit_compile) == (True, True)


def test_apply_hyperparameters_writes_config_keys(tiny_dataset):
    cfg = tiny_config(tiny_dataset)
    tuned = apply_hyperparameters(
        cfg, {"base_filters": 8, "augment_strength": 1.5, "batch_size": 4}
    )
    assert (tuned.model.base_filters, tuned.augment.strength, tuned.train.batch_size) == (8, 1.5, 4)
    assert cfg.model.base_filters == 4  # the original is untouched
    assert set(hyperparameters_of(tuned)) == set(HYPERPARAMETER_KEYS)
    with pytest.raises(KeyError, match="unknown hyper-parameters"):
        apply_hyperparameters(cfg, {"epochs": 3})


@pytest.mark.parametrize("algorithm", ["grid", "random", "bayesian", "hyperband"])
def test_tuner_algorithms_write_a_trials_table(prepared, tiny_dataset, tmp_path, algorithm):
    data, _ = prepared
    cfg = tiny_config(
        tiny_dataset,
        f"tune.algorithm={algorithm}",
        "tune.epochs=2",
        "tune.hyperband_factor=2",
        "tune.space.batch_size=[4,8]",
        "tune.space.input_size=[32]",
    )
    best, trials = tune(cfg, data, tmp_path)
    assert trials and set(best) >= {"base_filters", "batch_size"}
    assert best["base_filters"] in (4, 8) and best["batch_size"] in (4, 8)
    scores = [t["val_score"] for t in trials]
    assert scores == sorted(scores, reverse=True)  # best first; val_score is maximised
    with open(tmp_path / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(trials) and {"trial", "base_filters", "batch_size", "val_score"} <= set(
        rows[0]
    )
    if algorithm == "grid":  # every combination of the 2 x 2 space, within max_trials=2... or all 4
        assert len({(t["base_filters"], t["batch_size"]) for t in trials}) == len(trials)


@pytest.mark.parametrize(
    "settings",
    [["tune.enabled=false"], ["tune.space.base_filters=[]", "tune.space.learning_rate=[]"]],
)
def test_no_tuning_returns_no_values(prepared, tiny_dataset, tmp_path, settings):
    data, _ = prepared
    best, trials = tune(tiny_config(tiny_dataset, *settings), data, tmp_path)
    assert best == {} and trials == []


def test_train_save_load_evaluate(prepared, tiny_dataset, tmp_path):
    data, rows = prepared
    cfg = tiny_config(tiny_dataset)
    result = train(cfg, data, tmp_path / "run")
    assert len(result.history["loss"]) == 2 and result.device == "/CPU:0"
    assert "val_score" in result.history and "val_mask_dice" in result.history
    assert (
        result.best_epoch in (1, 2)
        and (tmp_path / "run" / "checkpoints" / "best.weights.h5").exists()
    )
    model_dir = save_artifact(
        result, cfg, data.classes, tmp_path / "model", metrics={"accuracy": 0.5}
    )
    assert {p.name for p in model_dir.iterdir()} >= {
        "model.keras",
        "model.json",
        "config.yaml",
        "metrics.json",
    }
    assert json.loads((model_dir / "training.json").read_text())["monitor"] == "val_score"

    predictor = Predictor.load(model_dir)
    test = select(rows, "test")
    evaluation = evaluate(predictor, test, batch_size=4, plot_dir=tmp_path / "eval", plot_count=4)
    m = evaluation.metrics
    assert m["n_images"] == len(test)
    for key in (
        "accuracy",
        "presence_accuracy",
        "defect_accuracy",
        "dice",
        "defect_dice",
        "soft_dice",
    ):
        assert 0.0 <= m[key] <= 1.0
    assert (tmp_path / "eval" / "confusion_matrix.png").exists()
    assert (tmp_path / "eval" / "predictions.png").exists()
    assert "| accuracy |" in evaluation.markdown()
    assert evaluation.save(tmp_path / "eval").exists()


def test_same_seed_same_weights(prepared, tiny_dataset):
    data, _ = prepared
    cfg = tiny_config(tiny_dataset, "train.epochs=1")
    first, second = train(cfg, data).model.get_weights(), train(cfg, data).model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_gpu_code_path_mixed_precision_and_xla_on_cpu(prepared, tiny_dataset, tmp_path):
    """What a GPU run switches on automatically, forced on the CPU: it trains and the saved
    model is float32 (mixed precision stays a training-time device trick)."""
    import keras

    data, _ = prepared
    cfg = tiny_config(
        tiny_dataset,
        "train.epochs=1",
        "train.mixed_precision=on",
        "train.jit_compile=on",
        "train.deterministic=false",
    )  # TensorFlow has no deterministic XLA
    result = train(cfg, data)
    assert (
        result.mixed_precision and result.jit_compile and np.isfinite(result.history["loss"]).all()
    )
    assert keras.config.dtype_policy().name == "float32"  # policy restored
    assert all(w.dtype == "float32" for w in result.model.weights)
    assert result.model.get_layer("class_dense").dtype_policy.name == "float32"


def test_lite0_trains_in_two_phases(prepared, tiny_dataset, tmp_path):
    data, _ = prepared
    cfg = load_config(
        "default",
        [
            "model.backbone=lite0",
            "model.input_size=32",
            "model.base_filters=4",
            "train.epochs=2",
            "train.frozen_epochs=1",
            "train.verbose=0",
            "train.tensorboard=true",
        ],
    )
    result = train(cfg, data, tmp_path / "run")
    assert len(result.history["loss"]) == 2
    assert (tmp_path / "run" / "checkpoints" / "phase1.done.weights.h5").exists()
    assert any((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    model_dir = save_artifact(result, cfg, data.classes, tmp_path / "model")
    predictions = Predictor.load(model_dir).predict_arrays([np.zeros((40, 50, 3), np.uint8)])
    assert predictions[0].mask.shape == (40, 50)


def test_predictor_rejects_a_folder_that_is_no_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        Predictor.load(tmp_path)


def test_evaluate_needs_samples():
    with pytest.raises(ValueError, match="empty"):
        evaluate(None, [])
