import numpy as np
import pytest

from defectflow.calibration import calibrate_model, choose_thresholds
from defectflow.data.mvtec import class_names, scan_dataset
from defectflow.inference import ModelInfo
from defectflow.preprocessing import prepare_mask, read_mask


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
            p = np.full(len(self.classes), 0.7 / (len(self.classes) - 1) if defect else 0.3 / (len(self.classes) - 1))
            p[0] = 0.3 if defect else 0.7
            if defect:  # the true class a little ahead of the other defect classes
                p[self.classes.index(sample.label)] += 0.01
                p[1:] *= 0.7 / p[1:].sum()
            probs.append(p)
            truth = prepare_mask(read_mask(sample.mask_path), self.size) if sample.mask_path else np.zeros(
                (self.size, self.size, 1), np.float32)
            masks.append((truth > 0.5) * 0.3)
        return np.array(probs), np.array(masks, np.float32)


@pytest.fixture()
def samples_and_predictor(tiny_dataset):
    samples = scan_dataset(tiny_dataset)
    return samples, FakePredictor(samples, class_names(samples))


def test_thresholds_are_chosen_where_validation_is_answered_best(samples_and_predictor):
    samples, predictor = samples_and_predictor
    thresholds = choose_thresholds(predictor, samples)
    assert 0.3 <= thresholds.defect_threshold < 0.7  # separates 0.3 (good) from 0.7 (defect)
    assert thresholds.val_presence_accuracy == 1.0
    assert thresholds.mask_threshold < 0.3  # masks at p = 0.3 need a threshold below it
    assert thresholds.val_defect_dice > 0.8 > thresholds.val_defect_dice_default
    assert "P(defect)" in thresholds.markdown()


def test_ties_go_to_the_value_nearest_one_half(samples_and_predictor):
    samples, predictor = samples_and_predictor
    assert choose_thresholds(predictor, samples).defect_threshold == 0.5  # every t in [0.3, 0.7) ties


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
