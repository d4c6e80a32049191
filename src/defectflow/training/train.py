"""Training of the two-head model (the hyper-parameter search is `defectflow.training.tune`).

GPU when TensorFlow sees one (or when asked for), CPU otherwise; mixed precision and XLA
follow the device unless the config forces them. Keras prints progress per epoch and the
tuner per trial, so long work is never silent.

Training runs in two phases, decoder and heads on the frozen pretrained encoder, then the
encoder too (BatchNorm frozen) at a lower rate. With a run folder it checkpoints every epoch
(Keras BackupAndRestore), so a run killed at any moment resumes where it stopped when
started again with the same run id; the best epoch by `train.monitor` is kept separately
(ModelCheckpoint) and is what training returns.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
import warnings
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


def _derived_seed(*parts: int) -> int:
    """A 32-bit seed from integers (a seed, a generator's number, an epoch): well mixed, stable."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _EpochRandomness:
    """Makes every random draw of training epoch e a function of (train.seed, e) alone.

    Shuffling (tf.data), augmentation (Keras random layers and JointAugmentation's own draws)
    and dropout draw from generators whose state runs on from epoch to epoch. A run resumed
    at epoch e gets its weights and optimizer back from BackupAndRestore, but these states
    start again from their seeds: it would shuffle, augment and drop out as at epoch 0, and
    end with other weights than the uninterrupted run. So at the start of every epoch the
    epoch number the shuffle reads is set and every generator is set to a state derived from
    (train.seed, its number, e); a resumed run then repeats the uninterrupted one exactly.
    """

    def __init__(self, seed: int, augmentation: JointAugmentation):
        import tensorflow as tf

        self.seed = int(seed)
        self.augmentation = augmentation
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")

    def callback(self, model):
        import keras

        generators = [*self.augmentation.seed_generators(), *_model_seed_generators(model)]
        seed, epoch_var = self.seed, self.epoch

        class EpochRandomness(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                epoch_var.assign(epoch)
                for number, generator in enumerate(self.generators):
                    generator.state.assign(
                        keras.ops.convert_to_tensor(
                            [_derived_seed(seed, number, epoch), 0], dtype=generator.state.dtype
                        )
                    )

        callback = EpochRandomness()
        callback.generators = generators
        return callback


def _model_seed_generators(model) -> list:
    """The random generators of the model's layers (Dropout's), in layer order."""
    found: list = []
    for layer in model._flatten_layers(include_self=True):
        found += [
            g for g in getattr(layer, "_seed_generators", []) if all(g is not f for f in found)
        ]
    return found


def training_datasets(cfg, data: PreparedData):
    """Training and validation data, and the `_EpochRandomness` whose callback every fit on
    them must have (the shuffle reads the epoch it sets)."""
    size, batch = cfg.model.input_size, cfg.train.batch_size
    augmentation = JointAugmentation(cfg.augment, seed=cfg.train.seed)
    randomness = _EpochRandomness(cfg.train.seed, augmentation)
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


class _Checkpoints:
    """Files under RUN/checkpoints: per-phase BackupAndRestore folders, the weights at the end
    of the frozen phase, and the best epoch so far (weights + its score, in best.json)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.best_weights = root / "best.weights.h5"
        self.best_json = root / "best.json"

    def backup_dir(self, phase: int) -> Path:
        return self.root / f"phase{phase}"

    def phase_done(self, phase: int) -> Path:
        return self.root / f"phase{phase}.done.weights.h5"

    def best(self) -> dict | None:
        return json.loads(self.best_json.read_text()) if self.best_json.exists() else None

    @property
    def history_csv(self) -> Path:
        return self.root / "history.csv"

    def history(self) -> dict[str, list[float]]:
        """Every epoch of every attempt (Keras CSVLogger, appended), the last row per epoch."""
        if not self.history_csv.exists():
            return {}
        with open(self.history_csv, newline="") as f:
            rows = {int(row["epoch"]): row for row in csv.DictReader(f)}
        out: dict[str, list[float]] = {}
        for epoch in sorted(rows):
            for key, value in rows[epoch].items():
                if key != "epoch" and value not in ("", None):
                    out.setdefault(key, []).append(float(value))
        return out

    def resumable_epoch(self, phase: int) -> int:
        meta = self.backup_dir(phase) / "training_metadata.json"
        return int(json.loads(meta.read_text())["epoch"]) if meta.exists() else 0


def _best_tracker(checkpoints: _Checkpoints, monitor: str):
    import keras

    class BestRecord(keras.callbacks.Callback):
        """Keeps best.json in step with ModelCheckpoint's best file, so a resumed run knows
        the score to beat (ModelCheckpoint itself forgets it)."""

        def __init__(self, best: float | None):
            super().__init__()
            self.best = best

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(monitor)
            if value is None:
                return
            better = self.best is None or (
                value < self.best if monitor_mode(monitor) == "min" else value > self.best
            )
            if better:
                self.best = float(value)
                tmp = checkpoints.best_json.with_suffix(".tmp")
                tmp.write_text(
                    json.dumps({"epoch": epoch + 1, "monitor": monitor, "value": self.best})
                )
                tmp.replace(checkpoints.best_json)

    record = checkpoints.best()
    return BestRecord(record["value"] if record else None)


def train(cfg, data: PreparedData, run_dir: Path | None = None) -> TrainResult:
    """Two phases: decoder and heads on the frozen encoder, then everything but BatchNorm.

    With `run_dir`, every epoch is checkpointed under run_dir/checkpoints and a run started
    again on the same folder resumes from its last finished epoch.
    """
    import keras

    seed_everything(cfg.train.seed, cfg.train.deterministic)
    accel = acceleration(cfg)
    with precision_policy(accel.mixed_precision):
        model = build_configured_model(cfg, len(data.classes))
    train_ds, val_ds, randomness = training_datasets(cfg, data)
    monitor = cfg.train.monitor
    pretrained = cfg.model.backbone != "plain"
    frozen = min(cfg.train.frozen_epochs, cfg.train.epochs) if pretrained else 0
    learning_rate = float(cfg.train.learning_rate)
    phases = [
        (1, False, learning_rate, frozen),
        (
            2,
            True,
            learning_rate * (cfg.train.fine_tune_lr_factor if frozen else 1.0),
            cfg.train.epochs,
        ),
    ]
    checkpoints = _Checkpoints(run_dir / "checkpoints") if run_dir else None
    resumed_from = 0
    history: dict[str, list[float]] = {}
    start = time.perf_counter()
    done = 0
    jit_used = False
    for phase, trainable, lr, until in phases:
        if until <= done:
            continue
        set_backbone_trainable(model, trainable)
        compile_model(model, cfg, lr, class_weights_of(cfg, data), accel.jit_compile)
        if checkpoints and checkpoints.phase_done(phase).exists():
            model.load_weights(checkpoints.phase_done(phase))
            log.info(
                "phase %d already finished in an earlier attempt: its weights are loaded", phase
            )
            resumed_from, done = until, until
            continue
        callbacks = [
            randomness.callback(model),
            validation_score_callback(cfg.train.score_weights),
            keras.callbacks.EarlyStopping(
                monitor=monitor,
                mode=monitor_mode(monitor),
                patience=cfg.train.early_stopping_patience,
            ),
        ]
        if checkpoints:
            epoch = checkpoints.resumable_epoch(phase)
            if epoch > done:
                resumed_from = epoch
                log.info("resuming phase %d from the checkpoint after epoch %d", phase, epoch)
            tracker = _best_tracker(checkpoints, monitor)
            callbacks += [
                keras.callbacks.BackupAndRestore(
                    str(checkpoints.backup_dir(phase)), delete_checkpoint=False
                ),
                keras.callbacks.ModelCheckpoint(
                    str(checkpoints.best_weights),
                    monitor=monitor,
                    mode=monitor_mode(monitor),
                    save_best_only=True,
                    save_weights_only=True,
                    initial_value_threshold=tracker.best,
                ),
                tracker,
                keras.callbacks.CSVLogger(str(checkpoints.history_csv), append=True),
            ]
            if cfg.train.tensorboard:
                callbacks.append(
                    keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), update_freq="epoch")
                )
        # Keras' BackupAndRestore stores the epoch it restored on the model, and every later fit
        # starts there instead of at `initial_epoch`: after a resumed first phase, the second
        # would repeat epochs. Each phase starts where this loop says.
        model._initial_epoch = None
        with device_scope(accel.device):
            fit = model.fit(
                train_ds,
                validation_data=val_ds,
                initial_epoch=done,
                epochs=until,
                callbacks=callbacks,
                verbose=cfg.train.verbose,
            )
        for key, values in fit.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        jit_used = bool(model.jit_compile)  # Keras turns XLA off where it cannot run it
        if checkpoints:
            model.save_weights(checkpoints.phase_done(phase))
        done = until
    epochs_trained = len(history.get("loss", []))
    if checkpoints:  # the whole run, including epochs of interrupted attempts
        history = checkpoints.history() or history
    best = checkpoints.best() if checkpoints else None
    if best and checkpoints.best_weights.exists():
        with warnings.catch_warnings():  # its optimizer state is from its own phase: not needed
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(checkpoints.best_weights)
        log.info(
            "kept the best epoch by %s: epoch %d (%.4f)", monitor, best["epoch"], best["value"]
        )
    seconds = time.perf_counter() - start
    log.info("trained %d epochs on %s in %.1f s", epochs_trained, accel.device, seconds)
    if accel.mixed_precision:
        model = _float32_copy(cfg, model, len(data.classes))
    return TrainResult(
        model,
        history,
        seconds,
        accel.device,
        hyperparameters_of(cfg),
        best_epoch=best["epoch"] if best else None,
        best_score=best["value"] if best else None,
        resumed_from_epoch=resumed_from,
        epochs_trained=epochs_trained,
        mixed_precision=accel.mixed_precision,
        jit_compile=jit_used,
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
