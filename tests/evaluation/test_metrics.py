import math

import numpy as np
import pytest

from defectflow.evaluation.metrics import (
    classification_metrics,
    dice,
    expected_calibration_error,
    iou,
    reliability_bins,
    segmentation_metrics,
)

CLASSES = ["good", "crack", "poke"]


def test_dice_and_iou_known_values():
    t = np.array([1, 1, 0, 0])
    p = np.array([1, 0, 1, 0])
    assert dice(t, p) == pytest.approx(0.5)
    assert iou(t, p) == pytest.approx(1 / 3)
    assert dice(t, t) == 1.0 and iou(t, t) == 1.0


def test_both_empty_counts_as_one():
    empty = np.zeros((4, 4))
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, np.ones((4, 4))) == 0.0


def test_classification_metrics():
    y_true = np.array([0, 0, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2])
    p_defect = np.array([0.1, 0.6, 0.9, 0.8, 0.95])
    m = classification_metrics(y_true, y_pred, p_defect, CLASSES)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["defect_accuracy"] == pytest.approx(2 / 3)
    assert m["presence_accuracy"] == pytest.approx(4 / 5)
    assert m["auroc"] == pytest.approx(1.0)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 1, 1]]
    assert m["per_class"]["crack"]["precision"] == pytest.approx(1 / 3)
    assert m["n_defect_images"] == 3


def test_auroc_undefined_with_one_class():
    m = classification_metrics(np.array([0, 0]), np.array([0, 0]), np.array([0.1, 0.2]), CLASSES)
    assert math.isnan(m["auroc"]) and math.isnan(m["defect_accuracy"])


def test_segmentation_means_overall_and_defect_only():
    rows = [
        {"dice": 1.0, "iou": 1.0, "soft_dice": 1.0, "soft_iou": 1.0},
        {"dice": 0.5, "iou": 0.25, "soft_dice": 0.4, "soft_iou": 0.3},
    ]
    m = segmentation_metrics(rows, np.array([False, True]))
    assert m["dice"] == pytest.approx(0.75)
    assert m["defect_dice"] == pytest.approx(0.5)
    assert m["defect_soft_iou"] == pytest.approx(0.3)


def test_perfectly_calibrated_confidences_have_zero_ece():
    # 0.75 confident and right 3 times in 4; 0.5 confident and right 2 times in 4.
    bins = reliability_bins([0.75] * 4 + [0.5] * 4, [1, 1, 1, 0] + [1, 0, 1, 0])
    assert expected_calibration_error(bins) == pytest.approx(0.0)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 4, 0, 4, 0, 0]


def test_ece_known_case_and_bins():
    # bin 9: 0.95 right (gap 0.05); bin 8: 0.85 wrong (gap 0.85); bin 1: 0.15 wrong (gap 0.15)
    bins = reliability_bins([0.95, 0.85, 0.15], [True, False, False])
    assert expected_calibration_error(bins) == pytest.approx((0.05 + 0.85 + 0.15) / 3)
    assert bins[8] == {
        "lower": 0.8,
        "upper": 0.9,
        "count": 1,
        "confidence": pytest.approx(0.85),
        "accuracy": 0.0,
    }
    assert math.isnan(bins[0]["accuracy"]) and bins[0]["count"] == 0
    # Weighted by count: two at 0.9, one right (gap 0.4); 0.6 right (gap 0.4); 0.3 wrong (gap 0.3).
    bins = reliability_bins([0.9, 0.9, 0.6, 0.3], [1, 0, 1, 0])
    assert expected_calibration_error(bins) == pytest.approx(0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.3)


def test_reliability_bin_edges():
    bins = reliability_bins([0.0, 0.1, 0.999, 1.0], [1, 1, 1, 1], n_bins=10)
    assert (
        bins[0]["count"] == 1 and bins[1]["count"] == 1 and bins[9]["count"] == 2
    )  # 1.0 in the last bin
    assert len(reliability_bins([0.5], [1], n_bins=4)) == 4


def test_ece_of_nothing_is_nan_and_bad_inputs_are_refused():
    assert math.isnan(expected_calibration_error(reliability_bins([], [])))
    with pytest.raises(ValueError, match="confidences"):
        reliability_bins([0.5, 0.6], [1])
    with pytest.raises(ValueError, match="0, 1"):
        reliability_bins([1.2], [1])
