"""Hyper-parameter search (KerasTuner) and training of the two-head model.

GPU when TensorFlow sees one (or when asked for), CPU otherwise; Keras prints progress per
epoch and the tuner per trial, so long work is never silent.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectflow.config import save_config
from defectflow.data.augment import JointAugmentation
from defectflow.data.dataset import ArraySplit, make_dataset
from defectflow.inference import METRICS_FILE, MODEL_FILE, ModelInfo
from defectflow.models.losses import DiceBCELoss, WeightedCrossEntropy
from defectflow.models.unet import build_model, set_backbone_trainable

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """A GPU was required (train.device=gpu) but TensorFlow sees none."""


def select_device(preference: str) -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if preference == "gpu" and not gpus:
        raise DeviceError("train.device=gpu but TensorFlow sees no GPU (install defectflow[gpu] and a CUDA driver)")
    if preference != "cpu" and gpus:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        return "/GPU:0"
    return "/CPU:0"


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """Weights inversely proportional to class frequency, mean 1 over the samples."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return [float(w) for w in weights]


def compile_model(model, learning_rate: float, class_weights: list[float] | None, mask_loss_weight: float):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={"class": WeightedCrossEntropy(class_weights), "mask": DiceBCELoss()},
        loss_weights={"class": 1.0, "mask": mask_loss_weight},
        metrics={"class": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]},
    )
    return model


@dataclass
class PreparedData:
    train: ArraySplit
    val: ArraySplit
    classes: list[str]
    augmentation: JointAugmentation


def _datasets(cfg, data: PreparedData, batch_size: int):
    train = make_dataset(data.train, batch_size, augment=data.augmentation, shuffle=True, seed=cfg.train.seed,
                         oversample=cfg.train.oversample)
    val = make_dataset(data.val, batch_size)
    return train, val


def _class_weights(cfg, data: PreparedData) -> list[float] | None:
    return balanced_class_weights(data.train.labels, len(data.classes)) if cfg.train.balance_classes else None


def tune(cfg, data: PreparedData, out_dir: Path) -> tuple[dict, list[dict]]:
    """KerasTuner random search over the space in `cfg.tune`; returns best values and all trials."""
    import keras
    import keras_tuner as kt

    fixed = {"base_filters": cfg.model.base_filters, "learning_rate": cfg.train.learning_rate,
             "dropout": cfg.model.dropout}
    if not cfg.tune.enabled:
        return fixed, []
    weights = _class_weights(cfg, data)

    def build(hp):
        model = _build(cfg, len(data.classes), hp.Choice("base_filters", list(cfg.tune.base_filters)),
                       hp.Choice("dropout", list(cfg.tune.dropout)))
        # Trials compare decoders and heads on the frozen encoder: the cheap, telling part.
        set_backbone_trainable(model, False)
        lr = hp.Choice("learning_rate", list(cfg.tune.learning_rate))
        return compile_model(model, lr, weights, cfg.train.mask_loss_weight)

    keras.utils.set_random_seed(cfg.tune.seed)
    tuner = kt.RandomSearch(
        build,
        objective=kt.Objective("val_loss", direction="min"),
        max_trials=cfg.tune.max_trials,
        seed=cfg.tune.seed,
        directory=str(out_dir),
        project_name="tuner",
        overwrite=True,
    )
    train_ds, val_ds = _datasets(cfg, data, cfg.train.batch_size)
    with _device(cfg):
        tuner.search(train_ds, validation_data=val_ds, epochs=cfg.tune.epochs, verbose=cfg.train.verbose)
    trials = []
    for trial in tuner.oracle.get_best_trials(num_trials=cfg.tune.max_trials):
        trials.append({"trial": trial.trial_id, **trial.hyperparameters.values, "val_loss": float(trial.score)})
    best = {**fixed, **tuner.get_best_hyperparameters(1)[0].values}
    (out_dir / "trials.json").write_text(json.dumps(trials, indent=2))
    return best, trials


def _device(cfg):
    import tensorflow as tf

    return tf.device(select_device(cfg.train.device))


@dataclass
class TrainResult:
    model: object
    history: dict[str, list[float]]
    seconds: float
    device: str
    hyperparameters: dict


def _build(cfg, num_classes: int, base_filters: int, dropout: float):
    return build_model(cfg.model.backbone, cfg.model.input_size, num_classes, base_filters=int(base_filters),
                       depth=cfg.model.depth, dropout=float(dropout))


def train(cfg, data: PreparedData, hyperparameters: dict) -> TrainResult:
    """Two phases: decoder and heads on the frozen encoder, then everything but BatchNorm."""
    import keras

    keras.utils.set_random_seed(cfg.train.seed)
    model = _build(cfg, len(data.classes), hyperparameters["base_filters"], hyperparameters["dropout"])
    learning_rate = float(hyperparameters["learning_rate"])
    train_ds, val_ds = _datasets(cfg, data, cfg.train.batch_size)
    device = select_device(cfg.train.device)
    frozen = min(cfg.train.frozen_epochs, cfg.train.epochs) if cfg.model.backbone == "lite0" else 0
    phases = [(False, learning_rate, frozen),
              (True, learning_rate * (cfg.train.fine_tune_lr_factor if frozen else 1.0), cfg.train.epochs)]
    history: dict[str, list[float]] = {}
    start = time.perf_counter()
    done = 0
    for trainable, lr, until in phases:
        if until <= done:
            continue
        set_backbone_trainable(model, trainable)
        compile_model(model, lr, _class_weights(cfg, data), cfg.train.mask_loss_weight)
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.train.early_stopping_patience, restore_best_weights=True
        )
        with _device(cfg):
            fit = model.fit(train_ds, validation_data=val_ds, initial_epoch=done, epochs=until, callbacks=[stop],
                            verbose=cfg.train.verbose)
        for key, values in fit.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        done = until
    seconds = time.perf_counter() - start
    log.info("trained %d epochs on %s in %.1f s", len(history.get("loss", [])), device, seconds)
    return TrainResult(model, history, seconds, device, dict(hyperparameters))


def save_artifact(result: TrainResult, cfg, classes: list[str], out_dir: Path, metrics: dict | None = None) -> Path:
    """The model artifact folder: model.keras, model.json, config.yaml (and metrics.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.model.save(out_dir / MODEL_FILE)
    ModelInfo(classes=list(classes), input_size=int(cfg.model.input_size),
              mask_threshold=float(cfg.eval.mask_threshold)).save(out_dir)
    save_config(cfg, out_dir / "config.yaml")
    (out_dir / "training.json").write_text(json.dumps(
        {"history": result.history, "seconds": result.seconds, "device": result.device,
         "hyperparameters": result.hyperparameters}, indent=2))
    if metrics is not None:
        (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return out_dir
