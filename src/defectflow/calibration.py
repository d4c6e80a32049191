"""Decision thresholds chosen on the validation split, never on test data.

Two numbers turn the model's probabilities into answers: the P(defect) above which an image
is defective, and the mask probability above which a pixel is defect. The network's own
defaults (argmax, 0.5) are arbitrary for a model trained on oversampled classes, so both
are chosen where the validation images are answered best:

* defect threshold: the highest defect-presence accuracy on validation images;
* mask threshold: the highest mean Dice over validation defect images, at each image's
  own resolution (as `defectflow.metrics` scores the test split).

Ties go to the value nearest 0.5 (the least committal choice). The candidate grids are
coarse on purpose: a validation split of ~50 images cannot support fine tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from defectflow.data.mvtec import Sample
from defectflow.metrics import dice
from defectflow.preprocessing import read_image, read_mask

DEFECT_GRID = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))
MASK_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class Thresholds:
    defect_threshold: float
    mask_threshold: float
    #: Validation figures at the chosen and at the default (argmax, 0.5) settings.
    val_presence_accuracy: float
    val_presence_accuracy_default: float
    val_defect_dice: float
    val_defect_dice_default: float
    n_images: int

    def markdown(self) -> str:
        return "\n".join([
            "| threshold | chosen | validation figure at chosen | at default |", "|---|---|---|---|",
            f"| P(defect) | {self.defect_threshold:.2f} | presence accuracy {self.val_presence_accuracy:.3f} | "
            f"{self.val_presence_accuracy_default:.3f} (argmax) |",
            f"| mask | {self.mask_threshold:.2f} | defect-only Dice {self.val_defect_dice:.3f} | "
            f"{self.val_defect_dice_default:.3f} (0.5) |",
            "", f"Chosen on {self.n_images} validation images.",
        ])


def _best(scores: dict[float, float]) -> tuple[float, float]:
    """The threshold with the highest score (ties: nearest 0.5) and that score."""
    value, _, threshold = max((score, -abs(t - 0.5), t) for t, score in scores.items())
    return float(threshold), float(value)


def choose_thresholds(predictor, samples: list[Sample], batch_size: int = 8) -> Thresholds:
    """The thresholds that answer `samples` (the validation split) best."""
    if not samples:
        raise ValueError("no validation samples to choose thresholds on")
    images = [read_image(s.path) for s in samples]
    probs, masks = predictor.raw_outputs(images, batch_size)
    is_defect = np.array([s.label != predictor.classes[0] for s in samples])
    p_defect = 1.0 - probs[:, 0]

    argmax_presence = float(np.mean((probs.argmax(axis=1) != 0) == is_defect))
    defect_threshold, val_presence = _best({t: float(np.mean((p_defect > t) == is_defect)) for t in DEFECT_GRID})

    # Soft masks of the defect images at each image's resolution, once.
    pairs = []
    for sample, image, soft in zip(samples, images, masks, strict=True):
        if sample.label != predictor.classes[0] and sample.mask_path:
            height, width = image.shape[:2]
            pairs.append((read_mask(sample.mask_path), cv2.resize(soft[..., 0], (width, height),
                                                                  interpolation=cv2.INTER_LINEAR)))

    if pairs:
        # 0.5 is in the grid: its score is also the figure at the default threshold.
        dice_by_threshold = {t: float(np.mean([dice(truth, full > t) for truth, full in pairs])) for t in MASK_GRID}
        mask_threshold, val_dice = _best(dice_by_threshold)
        default_dice = dice_by_threshold[0.5]
    else:
        mask_threshold, val_dice, default_dice = 0.5, float("nan"), float("nan")
    return Thresholds(defect_threshold, mask_threshold, val_presence, argmax_presence, val_dice, default_dice,
                      len(samples))


def calibrate_model(model_dir, samples: list[Sample], batch_size: int = 8, record=None) -> Thresholds:
    """Choose the thresholds of the model in `model_dir` on `samples` and store them in its
    model.json, where every prediction (evaluation, serving, command line) reads them; with
    `record`, also write the choice and its validation figures there (JSON)."""
    import json

    from defectflow.inference import ModelInfo, Predictor

    predictor = Predictor.load(model_dir)
    thresholds = choose_thresholds(predictor, samples, batch_size)
    info = ModelInfo.load(model_dir)
    info.defect_threshold = thresholds.defect_threshold
    info.mask_threshold = thresholds.mask_threshold
    info.thresholds_from = f"validation split, {thresholds.n_images} images"
    info.save(model_dir)
    if record is not None:
        Path(record).write_text(json.dumps(thresholds.__dict__, indent=2))
    return thresholds
