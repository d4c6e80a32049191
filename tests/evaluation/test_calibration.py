import numpy as np
import pytest

from defectflow.artifacts import DecisionPolicy, ModelInfo
from defectflow.data.mvtec import class_names, scan_dataset
from defectflow.evaluation.calibration import (
    calibrate_classes,
    calibrate_model,
    choose_confidence_threshold,
    choose_thresholds,
    coverage_curve,
    fit_temperature,
    negative_log_likelihood,
)
from defectflow.inference.postprocessing import ACCEPTED, UNCERTAIN, apply_temperature, postprocess
from defectflow.inference.predictor import RawOutputs
from defectflow.inference.preprocessing import prepare_mask, read_mask


class FakePredictor:
    """Model outputs made from the truth: P(defect) 0.7 on defect images and 0.3 on good ones
    (so argmax alone would miss presence), masks that are the truth at probability 0.3."""

    def __init__(self, samples, classes, size=64):  # the images' own size: masks stay exact
        self.classes = classes
        self.samples = samples
        self.size = size

    def raw_outputs(self, images, batch_size=8):
        assert len(images) == len(self.samples)  # called with the images of `samples`, in order
        probs, masks = [], []
        for sample in self.samples:
            defect = sample.label != self.classes[0]
            p = np.full(
                len(self.classes),
                0.7 / (len(self.classes) - 1) if defect else 0.3 / (len(self.classes) - 1),
            )
            p[0] = 0.3 if defect else 0.7
            if defect:  # the true class a little ahead of the other defect classes
                p[self.classes.index(sample.label)] += 0.01
                p[1:] *= 0.7 / p[1:].sum()
            probs.append(p)
            truth = (
                prepare_mask(read_mask(sample.mask_path), self.size)
                if sample.mask_path
                else np.zeros((self.size, self.size, 1), np.float32)
            )
            masks.append((truth > 0.5) * 0.3)
        return RawOutputs(np.array(probs), np.array(masks, np.float32))


@pytest.fixture()
def samples_and_predictor(tiny_dataset):
    samples = scan_dataset(tiny_dataset)
    return samples, FakePredictor(samples, class_names(samples))


def test_thresholds_are_chosen_where_validation_is_answered_best(samples_and_predictor):
    samples, predictor = samples_and_predictor
    thresholds = choose_thresholds(predictor, samples, temperature_scaling=False)
    assert 0.3 <= thresholds.defect_threshold < 0.7  # separates 0.3 (good) from 0.7 (defect)
    assert thresholds.val_presence_accuracy == 1.0
    assert thresholds.mask_threshold < 0.3  # masks at p = 0.3 need a threshold below it
    assert thresholds.val_defect_dice > 0.8 > thresholds.val_defect_dice_default
    assert "P(defect)" in thresholds.markdown()


def test_ties_go_to_the_value_nearest_one_half(samples_and_predictor):
    samples, predictor = samples_and_predictor
    assert (
        choose_thresholds(predictor, samples, temperature_scaling=False).defect_threshold == 0.5
    )  # every t in [0.3, 0.7) ties


def test_no_samples_is_an_error(samples_and_predictor):
    _, predictor = samples_and_predictor
    with pytest.raises(ValueError, match="no validation samples"):
        choose_thresholds(predictor, [])


def test_calibrated_thresholds_are_stored_with_the_model(tmp_path, tiny_dataset):
    from helpers_models import make_tiny_model_dir

    samples = scan_dataset(tiny_dataset)
    model_dir = make_tiny_model_dir(tmp_path / "model")
    thresholds = calibrate_model(model_dir, samples[:6], record=tmp_path / "calibration.json")
    info = ModelInfo.load(model_dir)
    assert info.defect_threshold == thresholds.defect_threshold
    assert info.mask_threshold == thresholds.mask_threshold
    assert info.thresholds_from.startswith("validation split, 6 images")
    assert (tmp_path / "calibration.json").exists()


# ---------------------------------------------------------------- temperature and confidence


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def synthetic(scale: float, n: int = 4000, classes: int = 6, seed: int = 0):
    """Labels drawn from softmax(z), the model saying softmax(scale * z): over-confident when
    scale > 1 (the temperature that calibrates it is `scale`), under-confident below 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, classes)) * 2.0
    truth = softmax(z)
    labels = np.array([rng.choice(classes, p=p) for p in truth])
    return softmax(scale * z), labels


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_temperature_fit_recovers_the_known_temperature(scale):
    probs, labels = synthetic(scale)
    temperature, before, after = fit_temperature(probs, labels)
    assert temperature == pytest.approx(scale, rel=0.1)  # 0.5: sharpen, 2.0: soften
    assert after < before
    assert negative_log_likelihood(probs, labels, temperature) == pytest.approx(after)


def test_temperature_stays_one_when_no_temperature_lowers_the_nll():
    uniform = np.full((20, 4), 0.25)  # any temperature gives the same probabilities
    assert fit_temperature(uniform, np.arange(20) % 4) == (
        1.0,
        pytest.approx(np.log(4)),
        pytest.approx(np.log(4)),
    )


def test_temperature_scaling_lowers_ece_on_an_over_confident_set():
    probs, labels = synthetic(3.0, n=3000)
    out = calibrate_classes(probs, labels, temperature_scaling=True, accept_target_accuracy=0.9)
    assert out["temperature"] == pytest.approx(3.0, rel=0.1)
    assert out["val_ece_before"] > 0.1 and out["val_ece_after"] < out["val_ece_before"] / 3
    assert out["val_nll_after"] < out["val_nll_before"]
    off = calibrate_classes(probs, labels, temperature_scaling=False, accept_target_accuracy=0.9)
    assert off["temperature"] == 1.0 and off["val_ece_after"] == pytest.approx(
        off["val_ece_before"]
    )
    assert off["temperature_from"].startswith("off")


def test_apply_temperature_keeps_the_order_and_sums_to_one():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    soft, sharp = apply_temperature(p, 2.0), apply_temperature(p, 0.5)
    assert np.allclose(soft.sum(axis=1), 1) and np.allclose(sharp.sum(axis=1), 1)
    assert (soft.argmax(axis=1) == p.argmax(axis=1)).all() and (
        sharp.argmax(axis=1) == p.argmax(axis=1)
    ).all()
    assert soft.max() < p.max() < sharp.max()
    assert np.allclose(apply_temperature(p[0], 2.0), np.sqrt(p[0]) / np.sqrt(p[0]).sum())
    assert apply_temperature(p, 1.0) is not None and np.array_equal(apply_temperature(p, 1.0), p)
    with pytest.raises(ValueError):
        apply_temperature(p, 0.0)


def test_coverage_curve_points():
    curve = coverage_curve([0.9, 0.6, 0.9, 0.7], [1, 0, 0, 1])
    assert curve == [
        {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.5},
        {"threshold": 0.6, "coverage": 1.0, "accuracy": 0.5},
        {"threshold": 0.7, "coverage": 0.75, "accuracy": pytest.approx(2 / 3)},
        {"threshold": 0.9, "coverage": 0.5, "accuracy": 0.5},
    ]


def test_confidence_threshold_is_the_lowest_reaching_the_target():
    confidence = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5]
    correct = [1, 1, 0, 1, 1, 0]
    # accepted accuracy as the threshold rises: 0.5 -> 4/6, 0.6 -> 4/5, 0.7 -> 3/4, 0.8 -> 2/3, 0.9 -> 1
    assert choose_confidence_threshold(confidence, correct, 0.99) == {
        "threshold": 0.9,
        "coverage": pytest.approx(2 / 6),
        "accuracy": 1.0,
        "target_reached": True,
    }
    assert (
        choose_confidence_threshold(confidence, correct, 0.75)["threshold"] == 0.6
    )  # 4/5, not 0.7's 3/4
    everything = choose_confidence_threshold(confidence, correct, 0.6)
    # Everything is accepted, at the least confident answer seen: anything below it is uncertain.
    assert everything["threshold"] == 0.5 and everything["coverage"] == 1.0


def test_confidence_threshold_reports_an_unreachable_target():
    # The most confident answer is wrong: no threshold reaches 0.99; best is 0.9 (1 of 2 right).
    chosen = choose_confidence_threshold([0.95, 0.9, 0.8], [0, 1, 0], 0.99)
    assert chosen == {
        "threshold": 0.9,
        "coverage": pytest.approx(2 / 3),
        "accuracy": 0.5,
        "target_reached": False,
    }
    with pytest.raises(ValueError):
        choose_confidence_threshold([], [], 0.9)


def test_prediction_carries_calibrated_confidence_and_status():
    classes = ["good", "crack", "poke"]
    soft = np.zeros((4, 4), np.float32)
    raw = np.array([0.2, 0.7, 0.1])
    sure = postprocess(raw, soft, (4, 4), DecisionPolicy(classes, 0.5, confidence_threshold=0.6))
    assert sure.status == ACCEPTED and sure.confidence == pytest.approx(0.7)
    softened = postprocess(
        raw, soft, (4, 4), DecisionPolicy(classes, 0.5, temperature=2.0, confidence_threshold=0.6)
    )
    expected = apply_temperature(raw, 2.0)
    assert softened.label == "crack" and softened.status == UNCERTAIN
    assert softened.confidence == pytest.approx(expected[1]) and softened.confidence < 0.6
    assert softened.probabilities == pytest.approx(dict(zip(classes, expected, strict=True)))
    body = softened.to_json()
    assert body["status"] == "uncertain" and body["confidence"] == round(expected[1], 6)
    assert {
        "class",
        "probabilities",
        "is_defective",
        "defect_area_fraction",
        "mask_png_base64",
        "mask_size",
    } <= set(body)
    # With a P(defect) threshold the answered class need not be the most probable: its
    # probability is the confidence (here good at 0.45, the defect threshold 0.6 not exceeded).
    good = postprocess(
        np.array([0.45, 0.5, 0.05]),
        soft,
        (4, 4),
        DecisionPolicy(classes, 0.5, defect_threshold=0.6),
    )
    assert (
        good.label == "good" and good.confidence == pytest.approx(0.45) and good.status == ACCEPTED
    )


def test_old_model_json_without_the_new_fields_loads_and_accepts_everything(tmp_path, tiny_dataset):
    import json

    from helpers_models import make_tiny_model_dir

    from defectflow.inference.predictor import Predictor
    from defectflow.inference.preprocessing import read_image

    model_dir = make_tiny_model_dir(tmp_path / "model")
    old = json.loads((model_dir / "model.json").read_text())
    for key in ("temperature", "confidence_threshold", "confidence_calibration"):
        old.pop(key)
    (model_dir / "model.json").write_text(json.dumps(old))
    info = ModelInfo.load(model_dir)
    assert info.temperature == 1.0 and info.confidence_threshold is None
    predictor = Predictor.load(model_dir)
    images = [read_image(s.path) for s in scan_dataset(tiny_dataset)[:4]]
    raw = predictor.raw_outputs(images).probabilities
    for prediction, row in zip(predictor.predict_arrays(images), raw, strict=True):
        assert prediction.status == "accepted"
        assert list(prediction.probabilities.values()) == pytest.approx(row.tolist())


def test_calibration_stores_temperature_and_confidence_threshold_that_predictions_apply(
    tmp_path, tiny_dataset
):
    import json

    from helpers_models import make_tiny_model_dir

    from defectflow.inference.predictor import Predictor
    from defectflow.inference.preprocessing import read_image
    from defectflow.serving.settings import ServingSettings, metadata

    samples = scan_dataset(tiny_dataset)
    model_dir = make_tiny_model_dir(tmp_path / "model")
    thresholds = calibrate_model(
        model_dir, samples, record=tmp_path / "calibration.json", accept_target_accuracy=0.9
    )
    info = ModelInfo.load(model_dir)
    assert info.temperature == thresholds.temperature > 0
    assert info.confidence_threshold == thresholds.confidence_threshold is not None
    assert info.confidence_calibration["fitted_on"] == f"validation split, {len(samples)} images"
    assert info.confidence_calibration["val_ece_after"] == thresholds.val_ece_after
    assert thresholds.val_nll_after <= thresholds.val_nll_before
    record = json.loads((tmp_path / "calibration.json").read_text())
    for key in (
        "temperature",
        "confidence_threshold",
        "val_ece_before",
        "val_ece_after",
        "val_coverage",
        "target_reached",
    ):
        assert key in record
    assert "| temperature |" in thresholds.markdown() and "| confidence |" in thresholds.markdown()

    # Predictions carry the calibrated probabilities and the status the stored threshold decides.
    info.temperature, info.confidence_threshold = (
        0.5,
        0.5,
    )  # a sharper temperature, a threshold mid-way
    info.save(model_dir)
    predictor = Predictor.load(model_dir)
    images = [read_image(s.path) for s in samples[:8]]
    raw = predictor.raw_outputs(images).probabilities
    calibrated = apply_temperature(raw, 0.5)
    for prediction, row in zip(predictor.predict_arrays(images), calibrated, strict=True):
        assert list(prediction.probabilities.values()) == pytest.approx(row.tolist())
        assert prediction.status == (ACCEPTED if prediction.confidence >= 0.5 else UNCERTAIN)
    meta = metadata("defectflow:x", None, model_dir, info, ServingSettings.for_model(model_dir))
    assert meta["confidence_threshold"] == 0.5 and meta["temperature"] == 0.5


def test_with_agreement_the_confidence_threshold_is_chosen_on_the_answers_the_score_agrees_with():
    """Six right answers and one confidently wrong defect answer (a good part called crack at
    0.99) that the anomaly score does not flag: on confidence alone no threshold reaches 0.99
    (the error is the most confident answer); without the answers the score contradicts, the
    least confident right answer is the threshold, and the coverage counts all seven."""
    from defectflow.evaluation.calibration import agreeing_confidence_threshold

    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    probs = np.array([[0.9, 0.1]] * 3 + [[0.1, 0.9]] * 2 + [[0.2, 0.8]] + [[0.01, 0.99]])
    scores = np.array([1, 1, 1, 5, 5, 5, 1.0])
    alone = choose_confidence_threshold(probs.max(axis=1), probs.argmax(axis=1) == labels, 0.99)
    assert not alone["target_reached"]
    chosen = agreeing_confidence_threshold(probs, labels, 0.5, scores, 3.0, 0.99)
    assert chosen == {
        "anomaly_agreement": True,
        "val_uncertain_by_disagreement": 1,
        "confidence_threshold": 0.8,
        "target_reached": True,
        "val_coverage": pytest.approx(6 / 7),
        "val_accepted_accuracy": 1.0,
    }
    # No answer the score agrees with: nothing is accepted.
    flipped = np.array([5, 5, 5, 1, 1, 1, 1.0])
    none = agreeing_confidence_threshold(probs, labels, 0.5, flipped, 3.0, 0.99)
    assert none["val_coverage"] == 0.0 and none["target_reached"] is False
