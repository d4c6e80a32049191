"""A tiny real Keras model artifact, for tests that must not depend on training.

It has the same interface as a trained defectflow model: an RGB float input and a dict output
{"class": softmax over CLASSES, "mask": sigmoid (H, W, 1)}, saved as `model.keras` next to
`model.json`, `config.yaml` and `metrics.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from defectflow.artifacts import CONFIG_FILE, METRICS_FILE, MODEL_FILE, ModelInfo

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


def stained(image, colour=(20, 160, 20)):
    """A copy of an RGB image with a square stain in the middle: a defect no synthetic type draws."""
    out = image.copy()
    h, w = out.shape[:2]
    out[h * 3 // 8 : h * 5 // 8, w * 3 // 8 : w * 5 // 8] = colour
    return out


def make_anomaly_model_dir(path: Path, good_images, seed: int = 0) -> Path:
    """A small untrained defectflow U-Net (plain encoder) whose classifier calls every image good
    (P(defect) threshold 0.999) and whose anomaly head was fitted on `good_images` (RGB uint8),
    its threshold just above their highest score: anything unlike them is `unknown_defect`."""
    os.environ.setdefault("KERAS_HOME", str(path.parent / ".keras"))
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import warnings

    import keras
    import numpy as np

    from defectflow.inference.anomaly_score import image_scores
    from defectflow.inference.preprocessing import prepare_image
    from defectflow.models.anomaly_head import feature_extractor, with_anomaly_head
    from defectflow.models.unet import build_model
    from defectflow.training.anomaly_fitting import fit_memory_bank

    keras.utils.set_random_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": on purpose here
        model = build_model(
            "plain", INPUT_SIZE, len(CLASSES), base_filters=4, depth=2, weights="none"
        )
    batch = np.stack([prepare_image(img, INPUT_SIZE) for img in good_images])
    features = feature_extractor(model).predict(batch, verbose=0)
    projection, bank = fit_memory_bank(
        features, bank_size=len(batch) * 1024, projection_dims=0
    )  # every patch
    model = with_anomaly_head(model, projection, bank)
    scores = image_scores(model.predict(batch, verbose=0)["anomaly"])
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / MODEL_FILE)
    ModelInfo(
        classes=list(CLASSES),
        input_size=INPUT_SIZE,
        mask_threshold=0.5,
        defect_threshold=0.999,
        anomaly_threshold=float(scores.max()) + 1e-3,  # margin for TFLite arithmetic
        anomaly={"grid": list(features.shape[1:3]), "bank_size": int(len(bank))},
    ).save(path)
    (path / CONFIG_FILE).write_text(f"model:\n  input_size: {INPUT_SIZE}\n")
    (path / METRICS_FILE).write_text(
        json.dumps({"accuracy": 0.5, "presence_accuracy": 0.5, "defect_dice": 0.2})
    )
    return path
