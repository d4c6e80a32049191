"""The one postprocessing path, shared by evaluation and serving: model outputs to an answer.

`postprocess` turns one image's outputs into a `Prediction` (class, calibrated probabilities,
mask at the input's resolution, confidence, status, anomaly score) under the model's decision
policy; `overlay` and `encode_png` draw and encode what a person looks at.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import cv2
import numpy as np

from defectflow.artifacts import DecisionPolicy
from defectflow.inference.anomaly_score import anomaly_mask, image_score

#: `Prediction.status` of an answer whose confidence reaches the model's confidence threshold
#: (or of every answer when the model has none), and of one that does not: a person should look.
ACCEPTED, UNCERTAIN = "accepted", "uncertain"
#: The answer for a part the classifier calls good but the anomaly score flags: a defect of a
#: kind the model was never taught (see `defectflow.inference.anomaly_score`). Always `uncertain`.
UNKNOWN_DEFECT = "unknown_defect"


@dataclass
class Prediction:
    label: str
    #: Class probabilities, calibrated (after the model's temperature, see `apply_temperature`).
    probabilities: dict[str, float]
    is_defective: bool
    #: uint8 {0, 1} at the input image's resolution.
    mask: np.ndarray
    #: Soft mask probabilities at the model's resolution (for soft metrics).
    mask_probability: np.ndarray
    #: The calibrated probability of the class answered (`label`); None: taken from `probabilities`.
    confidence: float | None = None
    #: ACCEPTED, or UNCERTAIN when `confidence` is below the model's confidence threshold.
    status: str = ACCEPTED
    #: How unlike the good training images the most unusual patch is (None: no anomaly head).
    anomaly_score: float | None = None
    #: The score above which the image is defective whatever the classifier says.
    anomaly_threshold: float | None = None

    def __post_init__(self):
        if self.confidence is None:
            self.confidence = float(self.probabilities[self.label])
        if self.status not in (ACCEPTED, UNCERTAIN):
            raise ValueError(f"status must be {ACCEPTED!r} or {UNCERTAIN!r}, got {self.status!r}")

    @property
    def defect_area_fraction(self) -> float:
        return float(self.mask.mean())

    def to_json(self) -> dict:
        return {
            "class": self.label,
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "is_defective": self.is_defective,
            "defect_area_fraction": round(self.defect_area_fraction, 6),
            "mask_png_base64": encode_png(self.mask * 255),
            "mask_size": [int(self.mask.shape[1]), int(self.mask.shape[0])],
            "confidence": round(float(self.confidence), 6),
            "status": self.status,
            "anomaly_score": None if self.anomaly_score is None else round(self.anomaly_score, 6),
            "anomaly_threshold": None
            if self.anomaly_threshold is None
            else round(self.anomaly_threshold, 6),
        }


def log_probabilities(class_probabilities: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(log(p) / T) along the last axis, computed stably (float64). Exact zeros
    (float32 softmax underflow) are taken as the smallest positive float64."""
    logits = np.log(
        np.clip(np.asarray(class_probabilities, dtype=np.float64), np.finfo(np.float64).tiny, None)
    )
    logits = logits / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def apply_temperature(class_probabilities: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Temperature-scaled class probabilities: softmax(log(p) / T) along the last axis.

    T > 1 softens over-confident probabilities, T < 1 sharpens them; the order of the classes
    (and so the argmax) never changes. T = 1 returns the probabilities as they are (float64).
    """
    probs = np.asarray(class_probabilities, dtype=np.float64)
    if temperature <= 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if temperature == 1.0:
        return probs
    return np.exp(log_probabilities(probs, temperature))


def answer_indices(
    class_probabilities: np.ndarray, defect_threshold: float | None = None
) -> np.ndarray:
    """The class answered for each row of (N, C) probabilities (class 0 = good).

    With `defect_threshold`, a row is defective when P(defect) = 1 - P(good) exceeds it, and
    its class is then the most probable defect class; without, the most probable class.
    """
    probs = np.atleast_2d(np.asarray(class_probabilities, dtype=np.float64))
    if defect_threshold is None:
        return probs.argmax(axis=1)
    return np.where(1.0 - probs[:, 0] > defect_threshold, 1 + probs[:, 1:].argmax(axis=1), 0)


def anomaly_disagrees(answers, anomaly_scores, anomaly_threshold: float) -> np.ndarray:
    """Per answer (class indices, 0 = good): whether the anomaly score contradicts its defect
    presence, i.e. the score flags the part (above `anomaly_threshold`) and the answer is good,
    or the answer is a defect and the score does not flag it."""
    flagged = np.asarray(anomaly_scores, dtype=np.float64) > anomaly_threshold
    return flagged != (np.asarray(answers) != 0)


def postprocess(
    class_probabilities: np.ndarray,
    mask_probability: np.ndarray,
    original_hw: tuple[int, int],
    policy: DecisionPolicy,
    anomaly_map: np.ndarray | None = None,
) -> Prediction:
    """Model outputs for one image to a Prediction at the input image's resolution, decided by
    `policy` (the model's `DecisionPolicy`: temperature and thresholds).

    The class probabilities are first calibrated with `temperature` (`apply_temperature`);
    every decision below is taken on the calibrated ones, which the Prediction carries.
    Class: with `defect_threshold` (chosen on validation data, see `defectflow.evaluation.calibration`),
    the image is defective when P(defect) = 1 - P(good) exceeds it, and then its class is the
    most probable defect class; without, the most probable class (`answer_indices`). The mask
    is cleared when the answer is `good` (class 0), so the two answers never contradict each
    other. Confidence: the calibrated probability of the class answered; the answer is
    `uncertain` when it is below `confidence_threshold`, else (or without one) `accepted`;
    with `anomaly_agreement`, a defect answer the anomaly score does not flag is `uncertain`
    too (`anomaly_disagrees`).

    Anomaly (`anomaly_map`, the patch distances of `defectflow.inference.anomaly_score`): the mean of its most
    unusual patches is the image's anomaly score (`image_score`). When the classifier says good but the score exceeds
    `anomaly_threshold`, the answer is UNKNOWN_DEFECT: defective, `uncertain` (a person should
    name it), confidence P(defect) from the classifier, and the mask is the anomaly map above
    the threshold (the mask head was only taught the known defects).
    """
    classes = policy.classes
    mask_threshold, defect_threshold = policy.mask_threshold, policy.defect_threshold
    confidence_threshold, anomaly_threshold = policy.confidence_threshold, policy.anomaly_threshold
    probs = apply_temperature(class_probabilities, policy.temperature)
    index = int(answer_indices(probs, defect_threshold)[0])
    confidence = float(probs[index])
    accepted = confidence_threshold is None or confidence >= confidence_threshold
    soft = np.asarray(mask_probability, dtype=np.float32).squeeze()
    height, width = original_hw
    score = None if anomaly_map is None else image_score(anomaly_map)
    if policy.anomaly_agreement and score is not None and anomaly_threshold is not None:
        accepted = accepted and not bool(anomaly_disagrees([index], [score], anomaly_threshold)[0])
    probabilities = {c: float(p) for c, p in zip(classes, probs, strict=True)}
    anomaly = {"anomaly_score": score, "anomaly_threshold": anomaly_threshold}
    if (
        index == 0
        and score is not None
        and anomaly_threshold is not None
        and score > anomaly_threshold
    ):
        return Prediction(
            label=UNKNOWN_DEFECT,
            probabilities=probabilities,
            is_defective=True,
            mask=anomaly_mask(anomaly_map, original_hw, anomaly_threshold),
            mask_probability=soft,
            confidence=1.0 - float(probs[0]),
            status=UNCERTAIN,
            **anomaly,
        )
    full = cv2.resize(soft, (width, height), interpolation=cv2.INTER_LINEAR)
    is_defective = index != 0
    mask = (
        (full > mask_threshold).astype(np.uint8)
        if is_defective
        else np.zeros((height, width), np.uint8)
    )
    return Prediction(
        label=classes[index],
        probabilities=probabilities,
        is_defective=is_defective,
        mask=mask,
        mask_probability=soft if is_defective else np.zeros_like(soft),
        confidence=confidence,
        status=ACCEPTED if accepted else UNCERTAIN,
        **anomaly,
    )


def encode_png(image: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def overlay(
    image: np.ndarray, mask: np.ndarray, color=(255, 0, 0), alpha: float = 0.5
) -> np.ndarray:
    """The mask painted over the RGB image, for plots and people."""
    out = image.copy()
    region = mask.astype(bool)
    paint = np.array(color) * alpha
    # In bands of ~1 M pixels: the float64 arithmetic on a whole 40 M pixel image took 1.1 GB.
    rows = max(1, 1_000_000 // max(1, out.shape[1]))
    for top in range(0, out.shape[0], rows):
        band, painted = out[top : top + rows], region[top : top + rows]
        band[painted] = (band[painted] * (1 - alpha) + paint).astype(np.uint8)
    return out
