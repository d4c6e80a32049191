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
    mask_threshold: float

    def save(self, model_dir: Path) -> None:
        (model_dir / MODEL_INFO_FILE).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, model_dir: Path) -> ModelInfo:
        return cls(**json.loads((model_dir / MODEL_INFO_FILE).read_text()))


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

    def predict_arrays(self, images: list[np.ndarray], batch_size: int = 8) -> list[Prediction]:
        """RGB uint8 images of any size to predictions at each image's own resolution."""
        out: list[Prediction] = []
        size = self.info.input_size
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = np.stack([prepare_image(img, size) for img in chunk])
            outputs = self.model.predict_on_batch(batch)
            probs, masks = np.asarray(outputs["class"]), np.asarray(outputs["mask"])
            out += [
                postprocess(p, m, img.shape[:2], self.classes, self.info.mask_threshold)
                for p, m, img in zip(probs, masks, chunk, strict=True)
            ]
        return out

    def predict_bytes(self, data: bytes) -> Prediction:
        """An uploaded file to a prediction; InvalidImageError when it is not an image."""
        return self.predict_arrays([decode_image(data)])[0]
