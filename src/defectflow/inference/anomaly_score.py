"""The anomaly score of an image, and what the decision makes of it (serving side).

A classifier trained on five defect types has no answer for a sixth: it calls it whatever it
resembles, often "good". The anomaly score needs no defect examples: it measures how unlike
every good training patch an image's most unusual patches are (PatchCore, on the classifier's
own encoder, see `defectflow.models.anomaly_head`). The decision combines both
(`defectflow.inference.postprocessing.postprocess`): an image is defective when the classifier says a
defect **or** its anomaly score exceeds a threshold; a part only the anomaly score flags is
answered `unknown_defect`, with the thresholded anomaly map as its mask.

This module turns the head's patch-distance map into a score, a mask and a decision score; it
imports only NumPy and OpenCV, so serving carries it. Fitting the head and choosing its
threshold is training's job: `defectflow.training.anomaly_fitting`.
"""

from __future__ import annotations

import cv2
import numpy as np

#: The image score averages this many of its most unusual patches: PatchCore takes the single
#: maximum, but one odd patch alone is often noise. On capsule (model trained on all types, 36
#: good test images, threshold at the highest good validation score) the mean of the top 3 gave
#: 0.000 false alarms and 0.908 of the defects flagged, the maximum 0.056 and 0.917.
TOP_PATCHES = 3


def image_scores(anomaly_maps: np.ndarray) -> np.ndarray:
    """The anomaly score of each map of a batch (N, h, w[, 1]): the mean of its TOP_PATCHES
    largest patch distances."""
    maps = np.asarray(anomaly_maps, dtype=np.float64)
    flat = maps.reshape(len(maps), -1)
    top = min(TOP_PATCHES, flat.shape[1])
    return np.partition(flat, flat.shape[1] - top, axis=1)[:, -top:].mean(axis=1)


def image_score(anomaly_map: np.ndarray) -> float:
    """The anomaly score of one map (h, w[, 1]), as `image_scores`."""
    return float(image_scores(np.asarray(anomaly_map)[None])[0])


def anomaly_mask(
    anomaly_map: np.ndarray, original_hw: tuple[int, int], threshold: float
) -> np.ndarray:
    """The patches above `threshold`, as a uint8 {0, 1} mask at the image's resolution
    (the coarse map upsampled bilinearly, so the region is smooth rather than blocky)."""
    height, width = original_hw
    coarse = np.asarray(anomaly_map, dtype=np.float32).squeeze()
    full = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return (full > threshold).astype(np.uint8)


def decision_score(
    p_defect, anomaly_score, defect_threshold: float | None, anomaly_threshold: float | None
):
    """One number per image that ranks it as the combined decision does: the larger of
    P(defect) and the anomaly score, each divided by its threshold, so an image is defective
    exactly when its decision score exceeds 1 (the threshold of P(defect) is 0.5 under argmax)."""
    by_class = np.asarray(p_defect, dtype=np.float64) / (
        defect_threshold if defect_threshold is not None else 0.5
    )
    if anomaly_threshold is None or anomaly_score is None:
        return by_class
    return np.maximum(by_class, np.asarray(anomaly_score, dtype=np.float64) / anomaly_threshold)
