"""The custom Keras layers a saved defectflow model refers to by name.

Loading `model.keras` needs these classes registered, and nothing else from the model code:
serving imports this module (and `defectflow.models.losses`), never the builders in
`defectflow.models.unet` / `backbones` / `efficientnet_lite`, which are training's.

- `MaskAttentionPooling`: the class head's pooling under the predicted mask (see
  `defectflow.models.unet`).
- `PatchDistance`: the anomaly head's distance of each patch to a memory bank of good-image
  patches (see `defectflow.models.anomaly_head`).
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="defectflow")
class MaskAttentionPooling(layers.Layer):
    """Features (N, h, w, C) averaged with weights from a mask (N, H, W, 1), H = k * h.

    The mask is max-pooled to the feature resolution so a one-pixel defect keeps its full
    weight, and its gradient is stopped: the mask is learnt from the mask loss only, the
    class loss must not bend it into whatever helps classification.
    """

    def __init__(self, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, inputs):
        features, weights = inputs
        weights = ops.stop_gradient(ops.cast(weights, features.dtype))
        factor = weights.shape[1] // features.shape[1]
        if factor > 1:
            weights = ops.max_pool(weights, pool_size=factor, strides=factor)
        weighted = ops.sum(features * weights, axis=(1, 2))
        return weighted / (ops.sum(weights, axis=(1, 2)) + self.epsilon)

    def compute_output_shape(self, input_shape):
        features_shape = input_shape[0]
        return (features_shape[0], features_shape[-1])

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="defectflow")
class PatchDistance(layers.Layer):
    """Patch features (N, h, w, C) to the distance of each patch to its nearest bank entry,
    (N, h, w, 1), after projecting them (C -> D) with a fixed matrix when `projection_dims` > 0
    (else D = C and the features are compared as they are).

    Squared distances as |q|^2 - 2 q.b + |b|^2: one (h*w, D) x (D, M) product per image.
    """

    def __init__(self, feature_dims: int, projection_dims: int, bank_size: int, **kwargs):
        super().__init__(**kwargs)
        self.feature_dims = feature_dims
        self.projection_dims = projection_dims
        self.bank_size = bank_size

    def build(self, input_shape):
        self.projection = None
        if self.projection_dims:
            self.projection = self.add_weight(
                name="projection",
                shape=(self.feature_dims, self.projection_dims),
                initializer="zeros",
                trainable=False,
            )
        self.bank = self.add_weight(
            name="bank",
            shape=(self.bank_size, self.projection_dims or self.feature_dims),
            initializer="zeros",
            trainable=False,
        )

    def call(self, features):
        queries = ops.cast(features, "float32")
        if self.projection is not None:
            queries = ops.matmul(queries, self.projection)
        bank = ops.convert_to_tensor(self.bank)
        cross = ops.matmul(queries, ops.transpose(bank))
        squared = (
            ops.sum(queries * queries, axis=-1, keepdims=True)
            - 2.0 * cross
            + ops.sum(bank * bank, axis=-1)
        )
        nearest = ops.min(squared, axis=-1, keepdims=True)
        return ops.sqrt(ops.maximum(nearest, 0.0))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)

    def get_config(self):
        return {
            **super().get_config(),
            "feature_dims": self.feature_dims,
            "projection_dims": self.projection_dims,
            "bank_size": self.bank_size,
        }
