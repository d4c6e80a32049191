"""The model artifact contract: what a trained model folder holds and what its outputs are called.

A model artifact is a folder: `model.keras` (weights and graph), `model.json` (`ModelInfo`:
classes, input size, thresholds, temperature, confidence threshold, anomaly threshold, serving
format), `config.yaml` (the merged config that trained it), `metrics.json` (its test figures)
and, once exported, `model.tflite` (the compact TensorFlow Lite copy, see `defectflow.training.export`).

Training writes this contract and serving reads it, so this module imports nothing but the
standard library and `defectflow.files` (standard library only itself): both sides, and the Bento, can depend on it without depending on each other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from defectflow.files import atomic_write

MODEL_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
MODEL_INFO_FILE = "model.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
#: The split the model was trained with (path, label, split, sha256 per file): what the gate's
#: leakage check compares a later test split with.
MANIFEST_FILE = "manifest.csv"
#: What `Predictor.load` can run: the Keras model or its TensorFlow Lite export.
FORMATS = ("keras", "tflite")
#: The model's outputs, by name; every backend returns them under these names. A model with
#: an anomaly head (`defectflow.models.anomaly_head`) has a third, the patch-distance map.
OUTPUT_NAMES = ("class", "mask")
ANOMALY_OUTPUT = "anomaly"
#: The headline figures of `metrics.json`, in the order every table shows them, with the names
#: a reader knows (defined in `defectflow.evaluation.metrics`). Reports, results over seeds and
#: `GET /metadata` show these; the registry's listing the first ones of `LISTED_METRICS`.
HEADLINE_METRICS = {
    "accuracy": "overall class accuracy",
    "presence_accuracy": "defect-presence accuracy",
    "defect_accuracy": "defect-only class accuracy",
    "auroc": "image AUROC, defect vs good",
    "defect_dice": "defect-only Dice (thresholded)",
    "defect_iou": "defect-only IoU (thresholded)",
    "dice": "Dice, all images (empty/empty = 1)",
    "iou": "IoU, all images (empty/empty = 1)",
}
#: The columns of `defectflow models list` and the registry's model records.
LISTED_METRICS = ("accuracy", "presence_accuracy", "defect_accuracy", "defect_dice", "auroc")


@dataclass(frozen=True)
class DecisionPolicy:
    """How a model's outputs become an answer: the temperature, the four thresholds and whether
    the anomaly score must agree with an answer for it to be accepted.

    Calibration chooses it on the validation split (`defectflow.evaluation.calibration`), the
    model folder stores it (flat in model.json, see `ModelInfo.policy`), and the one
    postprocessing path applies it (`defectflow.inference.postprocessing.postprocess`), so
    evaluation, the command line and serving decide alike.
    """

    #: Class names, class 0 = good.
    classes: tuple[str, ...]
    #: Mask probability that counts as defect.
    mask_threshold: float = 0.5
    #: P(defect) above which an image is defective; None: the most probable class decides.
    defect_threshold: float | None = None
    #: Temperature of the class probabilities (softmax(log(p) / T)); 1: the network's own.
    temperature: float = 1.0
    #: Calibrated confidence below which an answer is "uncertain"; None: always "accepted".
    confidence_threshold: float | None = None
    #: Anomaly score above which an image the classifier calls good is an unknown defect;
    #: None: the classifier alone decides.
    anomaly_threshold: float | None = None
    #: An answer whose defect presence the anomaly score contradicts (a defect class with the
    #: score at or below `anomaly_threshold`) is "uncertain" whatever its confidence; no effect
    #: without an anomaly threshold.
    anomaly_agreement: bool = False

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        # A threshold above 1 is allowed: it means "never" (e.g. every answer uncertain).
        for name in (
            "mask_threshold",
            "defect_threshold",
            "confidence_threshold",
            "anomaly_threshold",
        ):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")


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
    #: The format `Predictor.load` runs by default: keras | tflite (chosen at export).
    serving_format: str = "keras"
    #: The TensorFlow Lite artifact: file, quantization, size and its parity with the Keras
    #: model on the test split (see `defectflow.training.export`); None until exported.
    tflite: dict | None = None
    #: Temperature of the class probabilities (softmax(log(p) / T)), fitted on the validation
    #: split (see `defectflow.evaluation.calibration`); 1: the network's own probabilities.
    temperature: float = 1.0
    #: Calibrated confidence (probability of the class answered) below which an answer is
    #: "uncertain"; None: every answer is "accepted".
    confidence_threshold: float | None = None
    #: How `temperature` and `confidence_threshold` were chosen, with their validation figures
    #: (`defectflow.evaluation.calibration.Thresholds.confidence_record`); None when not calibrated.
    confidence_calibration: dict | None = None
    #: Anomaly score above which an image is defective even when the classifier says good
    #: (then answered `unknown_defect`), chosen on the validation split's good images; None:
    #: no anomaly head, or not calibrated yet (the classifier alone decides).
    anomaly_threshold: float | None = None
    #: The anomaly head's memory bank and how its threshold was chosen
    #: (`defectflow.training.anomaly_fitting`).
    anomaly: dict | None = None
    #: A defect answer the anomaly score does not flag is "uncertain" (`DecisionPolicy`).
    anomaly_agreement: bool = False

    @property
    def policy(self) -> DecisionPolicy:
        """The decision policy this model's answers are made with."""
        return DecisionPolicy(
            classes=tuple(self.classes),
            mask_threshold=self.mask_threshold,
            defect_threshold=self.defect_threshold,
            temperature=self.temperature,
            confidence_threshold=self.confidence_threshold,
            anomaly_threshold=self.anomaly_threshold,
            anomaly_agreement=self.anomaly_agreement,
        )

    def with_policy(self, policy: DecisionPolicy) -> ModelInfo:
        """A copy of this record answering with `policy` (its classes must be this model's)."""
        if tuple(policy.classes) != tuple(self.classes):
            raise ValueError(
                f"policy classes {list(policy.classes)} are not the model's {self.classes}"
            )
        return replace(
            self,
            mask_threshold=policy.mask_threshold,
            defect_threshold=policy.defect_threshold,
            temperature=policy.temperature,
            confidence_threshold=policy.confidence_threshold,
            anomaly_threshold=policy.anomaly_threshold,
            anomaly_agreement=policy.anomaly_agreement,
        )

    def save(self, model_dir: Path) -> None:
        # A reader never sees half a file.
        atomic_write(
            Path(model_dir) / MODEL_INFO_FILE, json.dumps(self.__dict__, indent=2).encode()
        )

    @classmethod
    def load(cls, model_dir: Path) -> ModelInfo:
        return cls(**json.loads((Path(model_dir) / MODEL_INFO_FILE).read_text()))
