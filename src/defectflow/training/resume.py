"""Resume: what lets a training run killed at any moment continue, and end as if never stopped.

Three mechanisms, each for one part of the state a run carries from epoch to epoch:

- weights and optimizer: Keras BackupAndRestore saves them after every epoch, one folder per
  phase under RUN/checkpoints (`Checkpoints.backup_dir`); a finished phase also leaves its
  weights (`phase_done`), so a later attempt skips it;
- the best epoch: ModelCheckpoint keeps its weights, `best.json` its score (ModelCheckpoint
  forgets the score to beat when a run starts again; `_best_tracker` remembers it), and
  `restore_best` loads them at the end; CSVLogger appends every attempt's epochs;
- randomness: shuffle, augmentation and dropout draw from generators BackupAndRestore does not
  save; `EpochRandomness` sets them from (train.seed, epoch) at every epoch's start.

With all three, a resumed run ends with the same weights, bit for bit, as the uninterrupted
one (tests/training/test_train_resume.py).
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from defectflow.data.augment import JointAugmentation

log = logging.getLogger(__name__)


class Checkpoints:
    """Files under RUN/checkpoints: per-phase BackupAndRestore folders, the weights at the end
    of each finished phase, the best epoch so far (weights + its score, in best.json) and the
    history of every attempt (history.csv)."""

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
        """The epoch BackupAndRestore will resume `phase` after (0: none saved)."""
        meta = self.backup_dir(phase) / "training_metadata.json"
        return int(json.loads(meta.read_text())["epoch"]) if meta.exists() else 0

    def load_finished_phase(self, model, phase: int) -> bool:
        """Load the weights an earlier attempt saved at the end of `phase`; False if none did."""
        if not self.phase_done(phase).exists():
            return False
        model.load_weights(self.phase_done(phase))
        log.info("phase %d already finished in an earlier attempt: its weights are loaded", phase)
        return True

    def save_finished_phase(self, model, phase: int) -> None:
        model.save_weights(self.phase_done(phase))


def phase_callbacks(checkpoints: Checkpoints, phase: int, monitor: str, mode: str) -> list:
    """The callbacks of one phase's fit that checkpoint it: BackupAndRestore (every epoch, kept
    after the fit), ModelCheckpoint with `_best_tracker` (the best epoch by `monitor` across
    phases and attempts), CSVLogger (appending to the history of earlier attempts)."""
    import keras

    tracker = _best_tracker(checkpoints, monitor, mode)
    return [
        keras.callbacks.BackupAndRestore(
            str(checkpoints.backup_dir(phase)), delete_checkpoint=False
        ),
        keras.callbacks.ModelCheckpoint(
            str(checkpoints.best_weights),
            monitor=monitor,
            mode=mode,
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=tracker.best,
        ),
        tracker,
        keras.callbacks.CSVLogger(str(checkpoints.history_csv), append=True),
    ]


def _best_tracker(checkpoints: Checkpoints, monitor: str, mode: str):
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
                value < self.best if mode == "min" else value > self.best
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


def restore_best(model, checkpoints: Checkpoints, monitor: str) -> dict | None:
    """Load the best epoch's weights (of the whole run: every phase and attempt) into `model`;
    its record from best.json (epoch, monitor, value), None when no epoch was scored."""
    best = checkpoints.best()
    if best and checkpoints.best_weights.exists():
        with warnings.catch_warnings():  # its optimizer state is from its own phase: not needed
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(checkpoints.best_weights)
        log.info(
            "kept the best epoch by %s: epoch %d (%.4f)", monitor, best["epoch"], best["value"]
        )
    return best


def forget_restored_epoch(model) -> None:
    """Make the next `model.fit` start at its own `initial_epoch`.

    BackupAndRestore restores by writing the epoch it resumes after to the model's private
    `_initial_epoch`, and every later `fit` on that model starts there instead of at its
    `initial_epoch` argument (`initial_epoch = self._initial_epoch or initial_epoch`); nothing
    resets it. After a resumed first phase, the second would then repeat epochs. Keras has no
    public way to clear it, so this writes None, the value `Trainer.__init__` sets. Checked
    against keras==3.15.1 (keras/src/trainers/trainer.py, callbacks/backup_and_restore.py,
    backend/tensorflow/trainer.py); tests/training/test_train_resume.py
    (test_a_resumed_first_phase_does_not_shift_the_second) fails if Keras changes this.
    """
    model._initial_epoch = None


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from integers (a seed, a generator's number, an epoch): well mixed, stable."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class EpochRandomness:
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
                            [derived_seed(seed, number, epoch), 0], dtype=generator.state.dtype
                        )
                    )

        callback = EpochRandomness()
        callback.generators = generators
        return callback


def _model_seed_generators(model) -> list:
    """The random generators of the model's layers (Dropout's), in layer order.

    Keras has no public list of a model's SeedGenerators (`model.variables` holds their state
    variables, not the generators): this reads the private `_flatten_layers` and
    `_seed_generators` (keras==3.15.1). The order numbers the generators' seeds: changing how
    they are found changes every run's random draws."""
    found: list = []
    for layer in model._flatten_layers(include_self=True):
        found += [
            g for g in getattr(layer, "_seed_generators", []) if all(g is not f for f in found)
        ]
    return found
