"""Losses of the two heads, and the mask Dice Keras reports while training."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="defectflow")
class DiceBCELoss(keras.losses.Loss):
    """Binary cross-entropy plus soft Dice.

    Cross-entropy alone is dominated by the background when a defect covers < 1 % of the
    image; the Dice term scores the overlap of the defect itself. Images with an empty
    target mask contribute only through cross-entropy (their Dice is undefined).
    """

    def __init__(self, smooth: float = 1.0, name: str = "dice_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
        inter = ops.sum(y_true * y_pred, axis=(1, 2, 3))
        total = ops.sum(y_true, axis=(1, 2, 3)) + ops.sum(y_pred, axis=(1, 2, 3))
        dice = (2.0 * inter + self.smooth) / (total + self.smooth)
        has_defect = ops.cast(ops.sum(y_true, axis=(1, 2, 3)) > 0, y_pred.dtype)
        return bce + has_defect * (1.0 - dice)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="defectflow")
class WeightedCrossEntropy(keras.losses.Loss):
    """Sparse categorical cross-entropy with a weight per class (for imbalanced data); with
    `gamma` > 0 it is the focal loss, (1 - p_true)^gamma * CE, which down-weights the images
    the model already gets right."""

    def __init__(
        self,
        class_weights: list[float] | None = None,
        gamma: float = 0.0,
        name: str = "weighted_ce",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.class_weights = list(class_weights) if class_weights is not None else None
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
        if self.gamma > 0:
            p_true = ops.exp(-ce)
            ce = ops.power(1.0 - p_true, self.gamma) * ce
        if self.class_weights is None:
            return ce
        weights = ops.take(ops.convert_to_tensor(self.class_weights, dtype=ce.dtype), y_true)
        return ce * weights

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights, "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="defectflow")
class MaskDice(keras.metrics.Metric):
    """Dice of the thresholded mask, pooled over all pixels of all images seen (a cheap
    training-time proxy of the per-image Dice that `defectflow.evaluation.metrics` reports)."""

    def __init__(self, threshold: float = 0.5, name: str = "dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(y_true > 0.5, "float32")
        y_pred = ops.cast(y_pred > self.threshold, "float32")
        self.intersection.assign_add(ops.sum(y_true * y_pred))
        self.total.assign_add(ops.sum(y_true) + ops.sum(y_pred))

    def result(self):
        return ops.where(
            self.total > 0, 2.0 * self.intersection / ops.maximum(self.total, 1.0), 1.0
        )

    def reset_state(self):
        self.intersection.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}
