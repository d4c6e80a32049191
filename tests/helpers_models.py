"""A tiny real Keras model artifact, for tests that must not depend on training.

It has the same interface as a trained defectflow model: an RGB float input and a dict output
{"class": softmax over CLASSES, "mask": sigmoid (H, W, 1)}, saved as `model.keras` next to
`model.json`, `config.yaml` and `metrics.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from defectflow.inference import CONFIG_FILE, METRICS_FILE, MODEL_FILE, ModelInfo

CLASSES = ["good", "crack", "faulty_imprint", "poke", "scratch", "squeeze"]
INPUT_SIZE = 32


def make_tiny_model_dir(path: Path, accuracy: float = 0.5, seed: int = 0) -> Path:
    """Write a model artifact folder at `path` (created if missing) and return it."""
    # Keras writes keras.json under KERAS_HOME (default ~/.keras) the first time it is imported.
    os.environ.setdefault("KERAS_HOME", str(path.parent / ".keras"))
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    outputs = {
        "class": keras.layers.Dense(len(CLASSES), activation="softmax", name="class")(pooled),
        "mask": keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(features),
    }
    model = keras.Model(inputs, outputs, name="tiny_defectflow")

    path.mkdir(parents=True, exist_ok=True)
    model.save(path / MODEL_FILE)
    ModelInfo(classes=list(CLASSES), input_size=INPUT_SIZE, mask_threshold=0.5).save(path)
    (path / CONFIG_FILE).write_text(f"model:\n  input_size: {INPUT_SIZE}\n")
    metrics = {"accuracy": accuracy, "presence_accuracy": accuracy, "defect_dice": accuracy / 2}
    (path / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return path
