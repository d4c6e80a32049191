"""Loading a trained model artifact and predicting with it.

A model artifact is a folder: `model.keras` (weights and graph), `model.json` (classes, input
size, mask threshold) and `config.yaml` (the merged config that trained it). Evaluation,
serving and the command line all predict through `Predictor`, so they share one code path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectflow.preprocessing import Prediction, decode_image, postprocess, prepare_image

MODEL_FILE = "model.keras"
MODEL_INFO_FILE = "model.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


@dataclass
class ModelInfo:
    classes: list[str]
    input_size: int
    #: Mask probability that counts as defect.
    mask_threshold: float
    #: P(defect) above which an image is defective; None: the most probable class decides.
    defect_threshold: float | None = None
    #: How the thresholds were set: "config", or what they were calibrated on.
    thresholds_from: str = "config"

    def save(self, model_dir: Path) -> None:
        path = Path(model_dir) / MODEL_INFO_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        tmp.replace(path)  # a reader never sees half a file

    @classmethod
    def load(cls, model_dir: Path) -> ModelInfo:
        return cls(**json.loads((Path(model_dir) / MODEL_INFO_FILE).read_text()))


class Predictor:
    def __init__(self, model, info: ModelInfo):
        self.model = model
        self.info = info

    @classmethod
    def load(cls, model_dir: str | Path) -> Predictor:
        import keras

        import defectflow.models.losses  # noqa: F401  (registers the custom layers and losses
        import defectflow.models.unet  # noqa: F401   that model.keras refers to by name)

        model_dir = Path(model_dir)
        missing = [f for f in (MODEL_FILE, MODEL_INFO_FILE) if not (model_dir / f).exists()]
        if missing:
            raise FileNotFoundError(f"{model_dir} is not a defectflow model: missing {missing}")
        model = keras.saving.load_model(model_dir / MODEL_FILE, compile=False)
        return cls(model, ModelInfo.load(model_dir))

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    def raw_outputs(self, images: list[np.ndarray], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (N, C) and mask probabilities (N, S, S, 1) at model resolution."""
        probs, masks = [], []
        size = self.info.input_size
        for start in range(0, len(images), batch_size):
            batch = np.stack([prepare_image(img, size) for img in images[start : start + batch_size]])
            outputs = self.model.predict_on_batch(batch)
            probs.append(np.asarray(outputs["class"]))
            masks.append(np.asarray(outputs["mask"]))
        return np.concatenate(probs), np.concatenate(masks)

    def predict_arrays(self, images: list[np.ndarray], batch_size: int = 8) -> list[Prediction]:
        """RGB uint8 images of any size to predictions at each image's own resolution."""
        if not images:
            return []
        probs, masks = self.raw_outputs(images, batch_size)
        return [
            postprocess(p, m, img.shape[:2], self.classes, self.info.mask_threshold, self.info.defect_threshold)
            for p, m, img in zip(probs, masks, images, strict=True)
        ]

    def predict_bytes(self, data: bytes) -> Prediction:
        """An uploaded file to a prediction; InvalidImageError when it is not an image."""
        return self.predict_arrays([decode_image(data)])[0]
