"""Decision thresholds chosen on the validation split, never on test data.

Two numbers turn the model's probabilities into answers: the P(defect) above which an image
is defective, and the mask probability above which a pixel is defect. The network's own
defaults (argmax, 0.5) are arbitrary for a model trained on oversampled classes, so both
are chosen where the validation images are answered best:

* defect threshold: the highest defect-presence accuracy on validation images;
* mask threshold: the highest mean Dice over validation defect images, at each image's
  own resolution (as `defectflow.evaluation.metrics` scores the test split).

Ties go to the value nearest 0.5 (the least committal choice). The candidate grids are
coarse on purpose: a validation split of ~50 images cannot support fine tuning.

Before those, the class probabilities are calibrated by **temperature scaling** (Guo et al.,
2017): one temperature T, p -> softmax(log(p) / T), chosen to minimise the negative
log-likelihood of the validation labels (T = 1 when switched off or when no T lowers it). It
never changes the most probable class, only how sure the model says it is. The P(defect)
threshold is then chosen on the calibrated probabilities, which are what every prediction
carries (`defectflow.inference.postprocessing.postprocess`).

Last, the **confidence threshold**: an answer's confidence is the calibrated probability of
the class answered (after the P(defect) decision); answers below the threshold are
"uncertain", for a person to review. It is the lowest threshold at which the validation images
answered with at least that confidence reach `accept_target_accuracy`; when none does, the
one with the best accuracy on the images it accepts (`target_reached` false). With
`eval.anomaly_agreement` (and an anomaly head), a defect answer the anomaly score does not flag
is never accepted (`defectflow.inference.postprocessing.anomaly_disagrees`), so the threshold is
chosen on the answers the anomaly score agrees with, and the coverage counts all of them.

The temperature, the thresholds and the validation ECE before/after are measured on the same
validation images: the ECE after is optimistic; the test split says what holds (evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from defectflow.artifacts import DecisionPolicy
from defectflow.data.mvtec import Sample
from defectflow.evaluation.metrics import dice, expected_calibration_error, reliability_bins
from defectflow.inference.anomaly_score import image_scores
from defectflow.inference.postprocessing import (
    anomaly_disagrees,
    answer_indices,
    apply_temperature,
    log_probabilities,
)
from defectflow.inference.preprocessing import read_image, read_mask

DEFECT_GRID = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))
MASK_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: The temperatures searched: from much sharper to much softer than the network.
TEMPERATURE_BOUNDS = (0.05, 20.0)


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
    #: Temperature of the class probabilities, and how it was set.
    temperature: float = 1.0
    temperature_from: str = "off"
    #: Mean negative log-likelihood of the validation labels at T = 1 and at `temperature`.
    val_nll_before: float = float("nan")
    val_nll_after: float = float("nan")
    #: Expected calibration error (top label, 10 bins) on validation: the network's
    #: probabilities with the P(defect) threshold chosen on them, and the calibrated ones with
    #: `defect_threshold` (what predictions do).
    val_ece_before: float = float("nan")
    val_ece_after: float = float("nan")
    #: Calibrated confidence below which an answer is "uncertain"; None: no threshold.
    confidence_threshold: float | None = None
    accept_target_accuracy: float | None = None
    #: Whether `confidence_threshold` reaches `accept_target_accuracy` on validation.
    target_reached: bool | None = None
    #: Share of validation images accepted at `confidence_threshold` and their accuracy.
    val_coverage: float | None = None
    val_accepted_accuracy: float | None = None
    #: Anomaly score above which an image is defective (`defectflow.inference.anomaly_score`); None: the model
    #: has no anomaly head, or the validation split has no good image.
    anomaly_threshold: float | None = None
    #: The false-alarm rate asked for, and the one reached, on the validation good images.
    anomaly_false_alarm_rate: float | None = None
    val_anomaly_false_alarm_rate: float | None = None
    #: Validation images flagged by the combined decision but not by the classifier alone.
    val_flagged_only_by_anomaly: int | None = None
    #: Whether answers the anomaly score contradicts are "uncertain" (`DecisionPolicy`), and how
    #: many validation answers that made uncertain.
    anomaly_agreement: bool = False
    val_uncertain_by_disagreement: int | None = None

    def policy(self, classes: list[str], has_anomaly_head: bool = True) -> DecisionPolicy:
        """The decision policy these choices make, for a model with `classes`."""
        return DecisionPolicy(
            classes=tuple(classes),
            mask_threshold=self.mask_threshold,
            defect_threshold=self.defect_threshold,
            temperature=self.temperature,
            confidence_threshold=self.confidence_threshold,
            anomaly_threshold=self.anomaly_threshold if has_anomaly_head else None,
            anomaly_agreement=self.anomaly_agreement
            and has_anomaly_head
            and self.anomaly_threshold is not None,
        )

    def anomaly_record(self) -> dict:
        """How the anomaly threshold was chosen (merged into model.json's `anomaly`)."""
        return {
            "threshold": self.anomaly_threshold,
            "target_false_alarm_rate": self.anomaly_false_alarm_rate,
            "val_false_alarm_rate": self.val_anomaly_false_alarm_rate,
            "val_flagged_only_by_anomaly": self.val_flagged_only_by_anomaly,
            "threshold_from": f"good images of the validation split ({self.n_images} images in all)",
        }

    def confidence_record(self) -> dict:
        """How the temperature and the confidence threshold were chosen (for model.json)."""
        return {
            "fitted_on": f"validation split, {self.n_images} images",
            "temperature_from": self.temperature_from,
            "val_nll_before": self.val_nll_before,
            "val_nll_after": self.val_nll_after,
            "val_ece_before": self.val_ece_before,
            "val_ece_after": self.val_ece_after,
            "accept_target_accuracy": self.accept_target_accuracy,
            "target_reached": self.target_reached,
            "val_coverage": self.val_coverage,
            "val_accepted_accuracy": self.val_accepted_accuracy,
            "anomaly_agreement": self.anomaly_agreement,
            "val_uncertain_by_disagreement": self.val_uncertain_by_disagreement,
        }

    def markdown(self) -> str:
        lines = [
            "| threshold | chosen | validation figure at chosen | at default |",
            "|---|---|---|---|",
            f"| temperature | {self.temperature:.3f} | NLL {self.val_nll_after:.4f}, ECE {self.val_ece_after:.4f} | "
            f"NLL {self.val_nll_before:.4f}, ECE {self.val_ece_before:.4f} (T = 1) |",
            f"| P(defect) | {self.defect_threshold:.2f} | presence accuracy {self.val_presence_accuracy:.3f} | "
            f"{self.val_presence_accuracy_default:.3f} (argmax) |",
            f"| mask | {self.mask_threshold:.2f} | defect-only Dice {self.val_defect_dice:.3f} | "
            f"{self.val_defect_dice_default:.3f} (0.5) |",
        ]
        if self.confidence_threshold is not None:
            reached = "reached" if self.target_reached else "NOT reached (best accuracy instead)"
            agreeing = (
                f"; {self.val_uncertain_by_disagreement} answers the anomaly score contradicts "
                "never accepted"
                if self.anomaly_agreement and self.val_uncertain_by_disagreement is not None
                else ""
            )
            lines.append(
                f"| confidence | {self.confidence_threshold:.4f} | coverage {self.val_coverage:.3f}, "
                f"accuracy of accepted {_figure(self.val_accepted_accuracy)} (target "
                f"{self.accept_target_accuracy:.3f} {reached}){agreeing} | coverage 1.000 (accept all) |"
            )
        if self.anomaly_threshold is not None:
            lines.append(
                f"| anomaly score | {self.anomaly_threshold:.4f} | false alarms on good images "
                f"{self.val_anomaly_false_alarm_rate:.3f} (target ≤ {self.anomaly_false_alarm_rate:.3f}); "
                f"{self.val_flagged_only_by_anomaly} images flagged by it alone | off (classifier alone) |"
            )
        lines += [
            "",
            f"Chosen on {self.n_images} validation images. Temperature: {self.temperature_from}. "
            "ECE: expected calibration error of the answered class's probability (10 bins), before and "
            "after the temperature, on the images it was fitted on.",
        ]
        return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _best(scores: dict[float, float]) -> tuple[float, float]:
    """The threshold with the highest score (ties: nearest 0.5) and that score."""
    value, _, threshold = max((score, -abs(t - 0.5), t) for t, score in scores.items())
    return float(threshold), float(value)


def negative_log_likelihood(
    probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0
) -> float:
    """Mean -log softmax(log(p) / T)[label] over the rows of (N, C) probabilities."""
    logp = log_probabilities(probs, temperature)
    return float(-np.mean(logp[np.arange(len(logp)), np.asarray(labels)]))


def fit_temperature(
    probs: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> tuple[float, float, float]:
    """The temperature minimising the NLL of `labels` (class indices) under (N, C) `probs`:
    (T, NLL at T = 1, NLL at T). T = 1 when no temperature in `bounds` lowers the NLL.

    The NLL is convex in 1/T (a log-sum-exp minus a linear term), so a bounded scalar search
    over 1/T finds the global minimum."""
    from scipy.optimize import minimize_scalar

    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if len(probs) == 0:
        raise ValueError("no probabilities to fit a temperature on")
    before = negative_log_likelihood(probs, labels)
    fit = minimize_scalar(
        lambda inverse: negative_log_likelihood(probs, labels, 1.0 / inverse),
        bounds=(1.0 / bounds[1], 1.0 / bounds[0]),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(1.0 / fit.x)
    after = negative_log_likelihood(probs, labels, temperature)
    if not after < before:
        return 1.0, before, before
    return temperature, before, after


def answered_confidence(
    probs: np.ndarray, labels: np.ndarray, defect_threshold: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (N, C) probabilities: the probability of the class answered (as `postprocess`
    decides it with `defect_threshold`) and whether that answer is `labels` (class indices)."""
    probs = np.asarray(probs, dtype=np.float64)
    answers = answer_indices(probs, defect_threshold)
    return probs[np.arange(len(probs)), answers], answers == np.asarray(labels)


def calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error (top label, `n_bins` equal-width bins), as evaluation reports it."""
    return expected_calibration_error(reliability_bins(confidence, correct, n_bins))


def coverage_curve(confidence, correct, from_zero: bool = True) -> list[dict]:
    """Accuracy against coverage as the confidence threshold rises: one point per distinct
    confidence t (and, with `from_zero`, t = 0, which accepts every answer), {threshold, coverage, accuracy},
    where an answer is accepted when its confidence is >= t. Thresholds ascending, so
    coverage descending; every point accepts at least one answer."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != hit.shape:
        raise ValueError(f"{conf.size} confidences but {hit.size} correctness flags")
    if not conf.size:
        return []
    order = np.argsort(-conf, kind="stable")
    conf, hit = conf[order], hit[order]
    accepted = np.arange(1, conf.size + 1)
    right = np.cumsum(hit)
    points = []
    # The last occurrence of each distinct confidence (descending): everything >= it is accepted.
    last = np.r_[conf[1:] != conf[:-1], True]
    for i in np.flatnonzero(last)[::-1]:
        points.append(
            {
                "threshold": float(conf[i]),
                "coverage": float(accepted[i] / conf.size),
                "accuracy": float(right[i] / accepted[i]),
            }
        )
    if from_zero and points[0]["threshold"] > 0.0:
        points.insert(0, {**points[0], "threshold": 0.0})
    return points


def choose_confidence_threshold(confidence, correct, target_accuracy: float) -> dict:
    """The lowest confidence threshold whose accepted answers (confidence >= threshold) reach
    `target_accuracy`: {threshold, coverage, accuracy, target_reached}. When no threshold does,
    the one with the highest accuracy on what it accepts (ties: the lower threshold, which
    accepts more), with target_reached False. Thresholds are confidences seen on the data, never
    below the least confident answer: when every answer is right, an answer less confident than
    all of them is still "uncertain" (not everything accepted at threshold 0)."""
    curve = coverage_curve(confidence, correct, from_zero=False)
    if not curve:
        raise ValueError("no answers to choose a confidence threshold on")
    reaching = [p for p in curve if p["accuracy"] >= target_accuracy]
    if reaching:
        return {**reaching[0], "target_reached": True}
    best = max(curve, key=lambda p: (p["accuracy"], -p["threshold"]))
    return {**best, "target_reached": False}


def calibrate_classes(
    probs: np.ndarray,
    labels: np.ndarray,
    temperature_scaling: bool = True,
    accept_target_accuracy: float | None = 0.99,
) -> dict:
    """Temperature, P(defect) threshold and confidence threshold from validation class
    probabilities (N, C, the network's) and true class indices (class 0 = good), with the
    validation figures of each: the keyword arguments of `Thresholds` about classes."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    is_defect = labels != 0
    if temperature_scaling:
        temperature, nll_before, nll_after = fit_temperature(probs, labels)
        temperature_from = (
            f"fitted on {len(labels)} validation images"
            if temperature != 1.0
            else "1 (no temperature lowered the validation NLL)"
        )
    else:
        temperature = 1.0
        nll_before = nll_after = negative_log_likelihood(probs, labels)
        temperature_from = "off (eval.temperature_scaling)"

    def defect_threshold_on(p: np.ndarray) -> tuple[float, float]:
        p_defect = 1.0 - p[:, 0]
        return _best({t: float(np.mean((p_defect > t) == is_defect)) for t in DEFECT_GRID})

    # Before: the network's probabilities with the threshold that would be chosen on them.
    ece_before = calibration_error(
        *answered_confidence(probs, labels, defect_threshold_on(probs)[0])
    )
    calibrated = apply_temperature(probs, temperature)
    defect_threshold, val_presence = defect_threshold_on(calibrated)
    confidence, correct = answered_confidence(calibrated, labels, defect_threshold)
    out = {
        "temperature": temperature,
        "temperature_from": temperature_from,
        "val_nll_before": nll_before,
        "val_nll_after": nll_after,
        "val_ece_before": ece_before,
        "val_ece_after": calibration_error(confidence, correct),
        "defect_threshold": defect_threshold,
        "val_presence_accuracy": val_presence,
        "val_presence_accuracy_default": float(
            np.mean((calibrated.argmax(axis=1) != 0) == is_defect)
        ),
        "accept_target_accuracy": accept_target_accuracy,
    }
    if accept_target_accuracy is not None:
        chosen = choose_confidence_threshold(confidence, correct, accept_target_accuracy)
        out.update(
            confidence_threshold=chosen["threshold"],
            target_reached=chosen["target_reached"],
            val_coverage=chosen["coverage"],
            val_accepted_accuracy=chosen["accuracy"],
        )
    return out


def choose_anomaly_threshold(good_scores, false_alarm_rate: float) -> float:
    """The lowest threshold that flags at most `false_alarm_rate` of `good_scores` (scores of
    good validation images; flagged means score > threshold). With few images this is the
    largest score, i.e. no validation good image flagged."""
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]
    if not scores.size:
        raise ValueError("no good validation images to choose the anomaly threshold on")
    if not 0.0 <= false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate}")
    allowed = int(np.floor(false_alarm_rate * scores.size))
    return float(scores[min(allowed, scores.size - 1)])


def calibrate_anomaly(
    anomaly_maps: np.ndarray,
    calibrated_probs: np.ndarray,
    labels: np.ndarray,
    defect_threshold: float | None,
    false_alarm_rate: float,
) -> dict:
    """The anomaly threshold from validation anomaly maps (N, h, w, 1): the lowest flagging at
    most `false_alarm_rate` of the good images (`choose_anomaly_threshold`), with its figures;
    {} when there is no good image to choose on."""
    scores = image_scores(anomaly_maps)
    good = np.asarray(labels) == 0
    if not good.any():
        return {}
    threshold = choose_anomaly_threshold(scores[good], false_alarm_rate)
    says_good = answer_indices(calibrated_probs, defect_threshold) == 0
    return {
        "anomaly_threshold": threshold,
        "anomaly_false_alarm_rate": false_alarm_rate,
        "val_anomaly_false_alarm_rate": float(np.mean(scores[good] > threshold)),
        "val_flagged_only_by_anomaly": int(np.sum(says_good & (scores > threshold))),
    }


def agreeing_confidence_threshold(
    calibrated_probs: np.ndarray,
    labels: np.ndarray,
    defect_threshold: float | None,
    anomaly_scores: np.ndarray,
    anomaly_threshold: float,
    accept_target_accuracy: float,
) -> dict:
    """The confidence threshold when answers the anomaly score contradicts are never accepted:
    chosen as `choose_confidence_threshold` chooses it, on the answers the score agrees with;
    the coverage is over all the answers. The keyword arguments of `Thresholds` it sets."""
    confidence, correct = answered_confidence(calibrated_probs, labels, defect_threshold)
    answers = answer_indices(calibrated_probs, defect_threshold)
    agrees = ~anomaly_disagrees(answers, anomaly_scores, anomaly_threshold)
    out = {"anomaly_agreement": True, "val_uncertain_by_disagreement": int((~agrees).sum())}
    if not agrees.any():  # every answer uncertain: no threshold to choose
        return {
            **out,
            "confidence_threshold": 1.0,
            "target_reached": False,
            "val_coverage": 0.0,
            "val_accepted_accuracy": None,
        }
    chosen = choose_confidence_threshold(
        confidence[agrees], correct[agrees], accept_target_accuracy
    )
    return {
        **out,
        "confidence_threshold": chosen["threshold"],
        "target_reached": chosen["target_reached"],
        "val_coverage": chosen["coverage"] * float(agrees.mean()),
        "val_accepted_accuracy": chosen["accuracy"],
    }


def choose_thresholds(
    predictor,
    samples: list[Sample],
    batch_size: int = 8,
    temperature_scaling: bool = True,
    accept_target_accuracy: float | None = 0.99,
    anomaly_false_alarm_rate: float = 0.02,
    anomaly_agreement: bool = False,
) -> Thresholds:
    """The temperature and thresholds that answer `samples` (the validation split) best;
    `accept_target_accuracy` None: no confidence threshold (every answer accepted). With an
    anomaly head, also the anomaly threshold for `anomaly_false_alarm_rate`, and with
    `anomaly_agreement` the confidence threshold of `agreeing_confidence_threshold`."""
    if not samples:
        raise ValueError("no validation samples to choose thresholds on")
    images = [read_image(s.path) for s in samples]
    probs, masks, anomaly_maps = predictor.raw_outputs(images, batch_size)
    labels = np.array([predictor.classes.index(s.label) for s in samples])
    classes = calibrate_classes(probs, labels, temperature_scaling, accept_target_accuracy)
    if anomaly_maps is not None:
        calibrated = apply_temperature(probs, classes["temperature"])
        classes.update(
            calibrate_anomaly(
                anomaly_maps,
                calibrated,
                labels,
                classes["defect_threshold"],
                anomaly_false_alarm_rate,
            )
        )
        if (
            anomaly_agreement
            and accept_target_accuracy is not None
            and classes.get("anomaly_threshold") is not None
        ):
            classes.update(
                agreeing_confidence_threshold(
                    calibrated,
                    labels,
                    classes["defect_threshold"],
                    image_scores(anomaly_maps),
                    classes["anomaly_threshold"],
                    accept_target_accuracy,
                )
            )

    # Soft masks of the defect images at each image's resolution, once.
    pairs = []
    for sample, image, soft in zip(samples, images, masks, strict=True):
        if sample.label != predictor.classes[0] and sample.mask_path:
            height, width = image.shape[:2]
            pairs.append(
                (
                    read_mask(sample.mask_path),
                    cv2.resize(soft[..., 0], (width, height), interpolation=cv2.INTER_LINEAR),
                )
            )

    if pairs:
        # 0.5 is in the grid: its score is also the figure at the default threshold.
        dice_by_threshold = {
            t: float(np.mean([dice(truth, full > t) for truth, full in pairs])) for t in MASK_GRID
        }
        mask_threshold, val_dice = _best(dice_by_threshold)
        default_dice = dice_by_threshold[0.5]
    else:
        mask_threshold, val_dice, default_dice = 0.5, float("nan"), float("nan")
    return Thresholds(
        mask_threshold=mask_threshold,
        val_defect_dice=val_dice,
        val_defect_dice_default=default_dice,
        n_images=len(samples),
        **classes,
    )


def calibrate_model(
    model_dir,
    samples: list[Sample],
    batch_size: int = 8,
    record=None,
    temperature_scaling: bool = True,
    accept_target_accuracy: float | None = 0.99,
    anomaly_false_alarm_rate: float = 0.02,
    anomaly_agreement: bool = False,
) -> Thresholds:
    """Choose the temperature and thresholds of the model in `model_dir` on `samples` and store
    them in its model.json, where every prediction (evaluation, serving, command line) reads
    them; with `record`, also write the choice and its validation figures there (JSON)."""
    import json

    from defectflow.artifacts import ModelInfo
    from defectflow.inference.predictor import Predictor

    predictor = Predictor.load(model_dir)
    thresholds = choose_thresholds(
        predictor,
        samples,
        batch_size,
        temperature_scaling,
        accept_target_accuracy,
        anomaly_false_alarm_rate,
        anomaly_agreement,
    )
    info = ModelInfo.load(model_dir)
    info = info.with_policy(
        thresholds.policy(info.classes, has_anomaly_head=info.anomaly is not None)
    )
    info.thresholds_from = f"validation split, {thresholds.n_images} images"
    info.confidence_calibration = thresholds.confidence_record()
    if info.anomaly is not None:
        info.anomaly = {**info.anomaly, **thresholds.anomaly_record()}
    info.save(model_dir)
    if record is not None:
        Path(record).write_text(json.dumps(thresholds.__dict__, indent=2))
    return thresholds
