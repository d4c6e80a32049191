"""The anomaly head: how far each image patch is from every patch of the good training images.

PatchCore (Roth et al., 2022) in the trained U-Net's own forward pass: the mid-level encoder
maps the class head already reads (lite0: strides 8 and 16) are smoothed over 3x3
neighbourhoods, brought to one grid and concatenated into one feature vector per patch; a
fixed random projection may shorten it (off by default), and the head returns each patch's Euclidean distance to
the nearest entry of a memory bank (a coreset of good-image patches, see `defectflow.anomaly`).

The bank and the projection are non-trainable weights of the `PatchDistance` layer, so the
map is one more output of the same model ("anomaly", (N, h, w, 1)): it is saved in
model.keras, exported to TFLite with the rest, and costs one matrix product per image.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from defectflow.inference import ANOMALY_OUTPUT

#: Names of the tapped feature maps: the inputs of the class head's mask-attention pooling.
_TAPS = {"backbone": ("stride8_under_mask", "stride16_under_mask"), "plain": ("enc_mid_under_mask",)}


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
            self.projection = self.add_weight(name="projection", shape=(self.feature_dims, self.projection_dims),
                                              initializer="zeros", trainable=False)
        self.bank = self.add_weight(name="bank", shape=(self.bank_size, self.projection_dims or self.feature_dims),
                                    initializer="zeros", trainable=False)

    def call(self, features):
        queries = ops.cast(features, "float32")
        if self.projection is not None:
            queries = ops.matmul(queries, self.projection)
        bank = ops.convert_to_tensor(self.bank)
        cross = ops.matmul(queries, ops.transpose(bank))
        squared = (ops.sum(queries * queries, axis=-1, keepdims=True) - 2.0 * cross
                   + ops.sum(bank * bank, axis=-1))
        nearest = ops.min(squared, axis=-1, keepdims=True)
        return ops.sqrt(ops.maximum(nearest, 0.0))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)

    def get_config(self):
        return {**super().get_config(), "feature_dims": self.feature_dims,
                "projection_dims": self.projection_dims, "bank_size": self.bank_size}


def has_anomaly_head(model: keras.Model) -> bool:
    return any(isinstance(layer, PatchDistance) for layer in model.layers)


def _tapped_maps(model: keras.Model) -> list:
    """The encoder maps the anomaly features are made of (coarser ones after finer ones)."""
    kind = "backbone" if any(layer.name == "backbone" for layer in model.layers) else "plain"
    try:
        return [model.get_layer(name).input[0] for name in _TAPS[kind]]
    except ValueError as exc:
        raise ValueError(f"{model.name}: not a defectflow U-Net, no feature maps to score anomalies on ({exc})") from exc


def patch_features(model: keras.Model):
    """The symbolic patch-feature tensor (N, h, w, C) of a trained U-Net: each tapped map
    averaged over 3x3 neighbourhoods (a patch sees its surroundings), coarser maps upsampled
    to the finest tapped grid, concatenated."""
    maps = _tapped_maps(model)
    finest = maps[0].shape[1]
    pooled = []
    for i, feature_map in enumerate(maps):
        x = layers.AveragePooling2D(3, strides=1, padding="same", name=f"anomaly_smooth{i}")(feature_map)
        factor = finest // x.shape[1]
        if factor > 1:
            x = layers.UpSampling2D(factor, interpolation="bilinear", name=f"anomaly_up{i}")(x)
        pooled.append(x)
    if len(pooled) == 1:
        return pooled[0]
    return layers.Concatenate(name="anomaly_features", dtype="float32")(pooled)


def feature_extractor(model: keras.Model) -> keras.Model:
    """image -> patch features, sharing `model`'s layers (what the memory bank is built from)."""
    return keras.Model(model.inputs, patch_features(model), name="patch_features")


def with_anomaly_head(model: keras.Model, projection, bank) -> keras.Model:
    """`model` (outputs class, mask) with a third output, the patch-distance map to `bank`
    ((M, D) good patches, projected by `projection` (C, D) when it is not None); the same
    layers and weights."""
    features = patch_features(model)
    head = PatchDistance(int(features.shape[-1]), 0 if projection is None else int(projection.shape[1]),
                         int(bank.shape[0]), name=ANOMALY_OUTPUT, dtype="float32")
    distances = head(features)
    head.set_weights([bank.astype("float32")] if projection is None else
                     [projection.astype("float32"), bank.astype("float32")])
    outputs = {"class": model.get_layer("class").output, "mask": model.get_layer("mask").output,
               ANOMALY_OUTPUT: distances}
    return keras.Model(model.inputs, outputs, name=model.name)
