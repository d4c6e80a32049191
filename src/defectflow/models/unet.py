"""A two-head U-Net: one encoder, a decoder that draws the defect mask, and a class head.

The class head reads the bottleneck (what the whole image looks like) together with the
decoder's mask (where a defect is), so a small defect the mask finds also informs the class.
"""

from __future__ import annotations

import keras
from keras import layers


def _conv_block(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(
    input_size: int,
    num_classes: int,
    base_filters: int = 16,
    depth: int = 4,
    dropout: float = 0.2,
) -> keras.Model:
    """Inputs: RGB in [0, 255], shape (input_size, input_size, 3).

    Outputs: {"class": softmax over classes, "mask": per-pixel defect probability}.
    """
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(name=f"pool{level}")(x)
    x = _conv_block(x, base_filters * 2**depth, "bottleneck")
    bottleneck = x
    for level in reversed(range(depth)):
        x = layers.UpSampling2D(name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _conv_block(x, base_filters * 2**level, f"dec{level}")
    mask = layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)

    # Max pooling keeps the evidence of a defect that covers a few pixels, which average
    # pooling would dilute; the full-resolution decoder features see the finest detail.
    features = layers.Concatenate(name="class_features")([
        layers.GlobalAveragePooling2D(name="gap")(bottleneck),
        layers.GlobalMaxPooling2D(name="gmp")(bottleneck),
        layers.GlobalMaxPooling2D(name="decoder_gmp")(x),
        # Peak mask probability and mask area: direct evidence of a (small) defect.
        layers.GlobalMaxPooling2D(name="mask_peak")(mask),
        layers.GlobalAveragePooling2D(name="mask_mean")(mask),
    ])
    features = layers.Dropout(dropout, name="class_dropout")(features)
    features = layers.Dense(64, activation="relu", name="class_dense")(features)
    logits = layers.Dense(num_classes, name="class_logits")(features)
    probabilities = layers.Activation("softmax", name="class", dtype="float32")(logits)
    return keras.Model(inputs, {"class": probabilities, "mask": mask}, name="defectflow_unet")
