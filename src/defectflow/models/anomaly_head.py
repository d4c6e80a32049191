"""The anomaly head: how far each image patch is from every patch of the good training images.

PatchCore (Roth et al., 2022) in the trained U-Net's own forward pass: the mid-level encoder
maps the class head already reads (lite0: strides 8 and 16) are smoothed over 3x3
neighbourhoods, brought to one grid and concatenated into one feature vector per patch; a
fixed random projection may shorten it (off by default), and the head returns each patch's Euclidean distance to
the nearest entry of a memory bank (a coreset of good-image patches, see `defectflow.training.anomaly_fitting`).

The bank and the projection are non-trainable weights of the `PatchDistance` layer
(`defectflow.models.layers`), so the
map is one more output of the same model ("anomaly", (N, h, w, 1)): it is saved in
model.keras, exported to TFLite with the rest, and costs one matrix product per image.
"""

from __future__ import annotations

import keras
from keras import layers

from defectflow.artifacts import ANOMALY_OUTPUT
from defectflow.models.layers import PatchDistance

#: Names of the tapped feature maps: the inputs of the class head's mask-attention pooling.
_TAPS = {
    "backbone": ("stride8_under_mask", "stride16_under_mask"),
    "plain": ("enc_mid_under_mask",),
}


def has_anomaly_head(model: keras.Model) -> bool:
    return any(isinstance(layer, PatchDistance) for layer in model.layers)


def _tapped_maps(model: keras.Model) -> list:
    """The encoder maps the anomaly features are made of (coarser ones after finer ones)."""
    kind = "backbone" if any(layer.name == "backbone" for layer in model.layers) else "plain"
    try:
        return [model.get_layer(name).input[0] for name in _TAPS[kind]]
    except ValueError as exc:
        raise ValueError(
            f"{model.name}: not a defectflow U-Net, no feature maps to score anomalies on ({exc})"
        ) from exc


def patch_features(model: keras.Model):
    """The symbolic patch-feature tensor (N, h, w, C) of a trained U-Net: each tapped map
    averaged over 3x3 neighbourhoods (a patch sees its surroundings), coarser maps upsampled
    to the finest tapped grid, concatenated."""
    maps = _tapped_maps(model)
    finest = maps[0].shape[1]
    pooled = []
    for i, feature_map in enumerate(maps):
        x = layers.AveragePooling2D(3, strides=1, padding="same", name=f"anomaly_smooth{i}")(
            feature_map
        )
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
    head = PatchDistance(
        int(features.shape[-1]),
        0 if projection is None else int(projection.shape[1]),
        int(bank.shape[0]),
        name=ANOMALY_OUTPUT,
        dtype="float32",
    )
    distances = head(features)
    head.set_weights(
        [bank.astype("float32")]
        if projection is None
        else [projection.astype("float32"), bank.astype("float32")]
    )
    outputs = {
        "class": model.get_layer("class").output,
        "mask": model.get_layer("mask").output,
        ANOMALY_OUTPUT: distances,
    }
    return keras.Model(model.inputs, outputs, name=model.name)
