"""Training of the two-head model (the hyper-parameter search is `defectflow.training.tune`).

GPU when TensorFlow sees one (or when asked for), CPU otherwise; mixed precision and XLA
follow the device unless the config forces them. Keras prints progress per epoch and the
tuner per trial, so long work is never silent.

Training runs in two phases, decoder and heads on the frozen pretrained encoder, then the
encoder too (BatchNorm frozen) at a lower rate. With a run folder it checkpoints every epoch,
so a run killed at any moment resumes where it stopped when started again with the same run
id; the best epoch by `train.monitor` is kept separately and is what training returns. How
is `defectflow.training.resume`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from defectflow.artifacts import METRICS_FILE, MODEL_FILE, ModelInfo
from defectflow.config import save_config
from defectflow.data.augment import JointAugmentation
from defectflow.data.dataset import ArraySplit, load_split, make_dataset
from defectflow.data.mvtec import Sample
from defectflow.models.losses import DiceBCELoss, MaskDice, WeightedCrossEntropy
from defectflow.models.unet import build_model, set_backbone_trainable
from defectflow.training.resume import (
    Checkpoints,
    EpochRandomness,
    forget_restored_epoch,
    phase_callbacks,
    restore_best,
)

log = logging.getLogger(__name__)

#: Tuner hyper-parameter name -> the config key its value is written to.
HYPERPARAMETER_KEYS = {
    "backbone": "model.backbone",
    "input_size": "model.input_size",
    "base_filters": "model.base_filters",
    "dropout": "model.dropout",
    "learning_rate": "train.learning_rate",
    "fine_tune_lr_factor": "train.fine_tune_lr_factor",
    "class_loss_weight": "train.class_loss_weight",
    "mask_loss_weight": "train.mask_loss_weight",
    "augment_strength": "augment.strength",
    "batch_size": "train.batch_size",
}


def hyperparameters_of(cfg) -> dict:
    """The values of every tunable hyper-parameter in `cfg`."""
    return {name: OmegaConf.select(cfg, key) for name, key in HYPERPARAMETER_KEYS.items()}


class DeviceError(RuntimeError):
    """A GPU was required (train.device=gpu) but TensorFlow sees none."""


def select_device(preference: str) -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if preference == "gpu" and not gpus:
        raise DeviceError(
            "train.device=gpu but TensorFlow sees no GPU (install defectflow[gpu] and a CUDA driver)"
        )
    if preference != "cpu" and gpus:
        for gpu in gpus:
            with contextlib.suppress(RuntimeError):  # already initialised: growth is set once
                tf.config.experimental.set_memory_growth(gpu, True)
        return "/GPU:0"
    return "/CPU:0"


@dataclass(frozen=True)
class Acceleration:
    device: str
    mixed_precision: bool
    jit_compile: bool


def acceleration(cfg) -> Acceleration:
    """Device, mixed precision and XLA: `auto` turns the last two on exactly when on a GPU."""
    device = select_device(cfg.train.device)
    on_gpu = device.startswith("/GPU")

    def decide(setting: str) -> bool:
        return on_gpu if setting == "auto" else setting == "on"

    return Acceleration(device, decide(cfg.train.mixed_precision), decide(cfg.train.jit_compile))


@contextlib.contextmanager
def precision_policy(mixed: bool):
    """Build and train under mixed_float16 (float32 variables), then restore the policy."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if mixed else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seeds Python, NumPy and TensorFlow; `deterministic` also makes TensorFlow's ops
    deterministic (process-wide). TensorFlow cannot make XLA deterministic, so Keras then
    compiles without XLA: on a GPU, train.deterministic=false buys the XLA speed-up."""
    import keras
    from tensorflow.python.framework import config as tf_config

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """Weights inversely proportional to class frequency, mean 1 over the samples."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return [float(w) for w in weights]


def compile_model(
    model,
    cfg,
    learning_rate: float,
    class_weights: list[float] | None = None,
    jit_compile: bool = False,
):
    import keras

    gamma = cfg.train.focal_gamma if cfg.train.class_loss == "focal" else 0.0
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={"class": WeightedCrossEntropy(class_weights, gamma=gamma), "mask": DiceBCELoss()},
        loss_weights={"class": cfg.train.class_loss_weight, "mask": cfg.train.mask_loss_weight},
        metrics={
            "class": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            "mask": [MaskDice(cfg.eval.mask_threshold)],
        },
        jit_compile=jit_compile,
    )
    return model


def validation_score_callback(weights):
    import keras

    class ValidationScore(keras.callbacks.Callback):
        """Adds `val_score` (weighted validation class accuracy + mask Dice) to the epoch logs,
        before early stopping, checkpoints and the tuner read them."""

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None and "val_class_accuracy" in logs:
                logs["val_score"] = weights.class_accuracy * logs[
                    "val_class_accuracy"
                ] + weights.mask_dice * logs.get("val_mask_dice", 0.0)

    return ValidationScore()


def monitor_mode(monitor: str) -> str:
    return "min" if monitor.endswith("loss") else "max"


@dataclass
class PreparedData:
    """Training and validation samples, read into arrays at whichever input size is asked
    (the tuner may try several); each size is read once."""

    train_samples: list[Sample]
    val_samples: list[Sample]
    classes: list[str]
    _arrays: dict = field(default_factory=dict, repr=False)

    def arrays(self, split: str, size: int) -> ArraySplit:
        if (split, size) not in self._arrays:
            samples = {"train": self.train_samples, "val": self.val_samples}[split]
            self._arrays[split, size] = load_split(samples, self.classes, size)
        return self._arrays[split, size]


def training_datasets(cfg, data: PreparedData):
    """Training and validation data, and the `EpochRandomness` whose callback every fit on
    them must have (the shuffle reads the epoch it sets)."""
    size, batch = cfg.model.input_size, cfg.train.batch_size
    augmentation = JointAugmentation(cfg.augment, seed=cfg.train.seed)
    randomness = EpochRandomness(cfg.train.seed, augmentation)
    train = make_dataset(
        data.arrays("train", size),
        batch,
        augment=augmentation,
        shuffle=True,
        seed=cfg.train.seed,
        oversample=cfg.train.oversample,
        epoch=randomness.epoch,
    )
    val = make_dataset(data.arrays("val", size), batch, cache=True)
    return train, val, randomness


def class_weights_of(cfg, data: PreparedData) -> list[float] | None:
    labels = data.arrays("train", cfg.model.input_size).labels
    return balanced_class_weights(labels, len(data.classes)) if cfg.train.balance_classes else None


def build_configured_model(cfg, num_classes: int):
    return build_model(
        cfg.model.backbone,
        cfg.model.input_size,
        num_classes,
        base_filters=cfg.model.base_filters,
        depth=cfg.model.depth,
        dropout=cfg.model.dropout,
        weights=cfg.model.weights,
    )


def device_scope(device: str):
    import tensorflow as tf

    return tf.device(device)


@dataclass
class TrainResult:
    model: object
    history: dict[str, list[float]]
    seconds: float
    device: str
    hyperparameters: dict
    best_epoch: int | None = None
    best_score: float | None = None
    resumed_from_epoch: int = 0
    #: Epochs trained by this attempt (a resumed run trains only the remaining ones).
    epochs_trained: int = 0
    mixed_precision: bool = False
    jit_compile: bool = False


@dataclass(frozen=True)
class _Phase:
    number: int
    #: Phase 1 trains the decoder and heads on the frozen encoder, phase 2 the encoder too.
    train_backbone: bool
    learning_rate: float
    #: The epoch the phase ends after (counted from the run's start, as Keras' `epochs`).
    until: int


def _phases(cfg) -> tuple[_Phase, _Phase]:
    """The frozen phase (none without a pretrained encoder) and the fine-tuning phase, at a
    rate `train.fine_tune_lr_factor` lower when it follows a frozen phase."""
    pretrained = cfg.model.backbone != "plain"
    frozen = min(cfg.train.frozen_epochs, cfg.train.epochs) if pretrained else 0
    learning_rate = float(cfg.train.learning_rate)
    fine_tune_rate = learning_rate * (cfg.train.fine_tune_lr_factor if frozen else 1.0)
    return (
        _Phase(1, False, learning_rate, frozen),
        _Phase(2, True, fine_tune_rate, cfg.train.epochs),
    )


@dataclass
class _Run:
    """One training attempt: what every phase fits with, and how far the phases got."""

    cfg: object
    data: PreparedData
    model: object
    accel: Acceleration
    train_ds: object
    val_ds: object
    randomness: EpochRandomness
    #: None without a run folder: nothing is checkpointed.
    checkpoints: Checkpoints | None
    run_dir: Path | None
    #: The last epoch trained (or loaded from an earlier attempt).
    done: int = 0
    resumed_from: int = 0
    #: The epochs this attempt trained.
    history: dict[str, list[float]] = field(default_factory=dict)
    jit_used: bool = False


def _prepare(cfg, data: PreparedData, run_dir: Path | None) -> _Run:
    """Seeds, device, the model (under the precision policy) and the datasets."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    accel = acceleration(cfg)
    with precision_policy(accel.mixed_precision):
        model = build_configured_model(cfg, len(data.classes))
    train_ds, val_ds, randomness = training_datasets(cfg, data)
    checkpoints = Checkpoints(run_dir / "checkpoints") if run_dir else None
    return _Run(cfg, data, model, accel, train_ds, val_ds, randomness, checkpoints, run_dir)


def _callbacks(run: _Run, phase: _Phase) -> list:
    """Per epoch: the randomness reset (first), `val_score`, early stopping; with a run
    folder, the checkpoints of `resume` and TensorBoard if asked."""
    import keras

    cfg, monitor = run.cfg, run.cfg.train.monitor
    callbacks = [
        run.randomness.callback(run.model),
        validation_score_callback(cfg.train.score_weights),
        keras.callbacks.EarlyStopping(
            monitor=monitor,
            mode=monitor_mode(monitor),
            patience=cfg.train.early_stopping_patience,
        ),
    ]
    if run.checkpoints:
        callbacks += phase_callbacks(run.checkpoints, phase.number, monitor, monitor_mode(monitor))
        if cfg.train.tensorboard:
            callbacks.append(
                keras.callbacks.TensorBoard(str(run.run_dir / "tensorboard"), update_freq="epoch")
            )
    return callbacks


def _fit_phase(run: _Run, phase: _Phase) -> None:
    """Train `phase` from the epoch the run reached, resuming from its checkpoint if an earlier
    attempt left one; a phase an earlier attempt finished is loaded instead."""
    if phase.until <= run.done:
        return
    cfg, model = run.cfg, run.model
    set_backbone_trainable(model, phase.train_backbone)
    compile_model(
        model, cfg, phase.learning_rate, class_weights_of(cfg, run.data), run.accel.jit_compile
    )
    if run.checkpoints and run.checkpoints.load_finished_phase(model, phase.number):
        run.resumed_from = run.done = phase.until
        return
    callbacks = _callbacks(run, phase)
    if run.checkpoints:
        epoch = run.checkpoints.resumable_epoch(phase.number)
        if epoch > run.done:
            run.resumed_from = epoch
            log.info("resuming phase %d from the checkpoint after epoch %d", phase.number, epoch)
    forget_restored_epoch(model)  # each phase starts where `run.done` says
    with device_scope(run.accel.device):
        fit = model.fit(
            run.train_ds,
            validation_data=run.val_ds,
            initial_epoch=run.done,
            epochs=phase.until,
            callbacks=callbacks,
            verbose=cfg.train.verbose,
        )
    for key, values in fit.history.items():
        run.history.setdefault(key, []).extend(float(v) for v in values)
    run.jit_used = bool(model.jit_compile)  # Keras turns XLA off where it cannot run it
    if run.checkpoints:
        run.checkpoints.save_finished_phase(model, phase.number)
    run.done = phase.until


def train(cfg, data: PreparedData, run_dir: Path | None = None) -> TrainResult:
    """Two phases: decoder and heads on the frozen encoder, then everything but BatchNorm.

    With `run_dir`, every epoch is checkpointed under run_dir/checkpoints and a run started
    again on the same folder resumes from its last finished epoch (`defectflow.training.resume`);
    the model returned has the weights of the best epoch by `train.monitor`.
    """
    run = _prepare(cfg, data, run_dir)
    start = time.perf_counter()
    frozen, fine_tuning = _phases(cfg)
    _fit_phase(run, frozen)
    _fit_phase(run, fine_tuning)
    best = restore_best(run.model, run.checkpoints, cfg.train.monitor) if run.checkpoints else None
    return _result(run, best, time.perf_counter() - start)


def _result(run: _Run, best: dict | None, seconds: float) -> TrainResult:
    """The TrainResult: the whole run's history (every attempt's epochs, with a run folder),
    the model as float32 whatever it trained in."""
    cfg, accel = run.cfg, run.accel
    epochs_trained = len(run.history.get("loss", []))
    history = (run.checkpoints.history() if run.checkpoints else {}) or run.history
    log.info("trained %d epochs on %s in %.1f s", epochs_trained, accel.device, seconds)
    model = run.model
    if accel.mixed_precision:
        model = _float32_copy(cfg, model, len(run.data.classes))
    return TrainResult(
        model,
        history,
        seconds,
        accel.device,
        hyperparameters_of(cfg),
        best_epoch=best["epoch"] if best else None,
        best_score=best["value"] if best else None,
        resumed_from_epoch=run.resumed_from,
        epochs_trained=epochs_trained,
        mixed_precision=accel.mixed_precision,
        jit_compile=run.jit_used,
    )


def _float32_copy(cfg, model, num_classes: int):
    """The same weights in a float32 model: mixed precision is a training device trick, and a
    float16 graph would be slow (and less exact) on the CPUs that serve it."""
    with precision_policy(False):
        plain = build_configured_model(cfg, num_classes)
    plain.set_weights(model.get_weights())
    return plain


def save_artifact(
    result: TrainResult, cfg, classes: list[str], out_dir: Path, metrics: dict | None = None
) -> Path:
    """The model artifact folder: model.keras, model.json, config.yaml (and metrics.json)."""
    import keras

    out_dir.mkdir(parents=True, exist_ok=True)
    # A compile-free copy: Keras 3 saves a compiled model's optimizer state too (Adam's two
    # slots per weight: 54 MB instead of 18.8 MB), which inference never reads. Not
    # keras.models.clone_model: it compiles the clone like the original.
    inference_model = keras.Model.from_config(result.model.get_config())
    inference_model.set_weights(result.model.get_weights())
    inference_model.save(out_dir / MODEL_FILE)
    ModelInfo(
        classes=list(classes),
        input_size=int(cfg.model.input_size),
        mask_threshold=float(cfg.eval.mask_threshold),
    ).save(out_dir)
    save_config(cfg, out_dir / "config.yaml")
    (out_dir / "training.json").write_text(
        json.dumps(
            {
                "history": result.history,
                "seconds": result.seconds,
                "device": result.device,
                "hyperparameters": result.hyperparameters,
                "best_epoch": result.best_epoch,
                "best_score": result.best_score,
                "monitor": cfg.train.monitor,
                "resumed_from_epoch": result.resumed_from_epoch,
                "epochs_trained": result.epochs_trained,
                "mixed_precision": result.mixed_precision,
                "jit_compile": result.jit_compile,
            },
            indent=2,
        )
    )
    if metrics is not None:
        (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return out_dir
