"""Two-head U-Nets: one encoder, a decoder that draws the defect mask, and a class head.

`build_model` picks the encoder: `lite0` (EfficientNet-Lite0 with ImageNet weights, read
offline) or `plain` (a small convolutional encoder trained from scratch, for tests and tiny
runs: from random weights it learns little on real data).

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


def _decoder_block(x, skip, filters: int, name: str):
    x = layers.UpSampling2D(name=f"{name}_up")(x)
    if skip is not None:
        x = layers.Concatenate(name=f"{name}_skip")([x, skip])
    return _conv_block(x, filters, name)


def _heads(x, bottleneck, num_classes: int, dropout: float) -> dict:
    # Defects cover ~1 % of the pixels: start the mask head at that prior (sigmoid(-4.6))
    # instead of 0.5, or early training paints half the image as defect.
    mask = layers.Conv2D(1, 1, activation="sigmoid", bias_initializer=keras.initializers.Constant(-4.6),
                         name="mask")(x)
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
    features = layers.Dense(128, activation="relu", name="class_dense")(features)
    logits = layers.Dense(num_classes, name="class_logits")(features)
    probabilities = layers.Activation("softmax", name="class", dtype="float32")(logits)
    return {"class": probabilities, "mask": mask}


#: Name prefix of the pretrained encoder's layers (what `set_backbone_trainable` touches).
BACKBONE = "backbone"


def build_lite0_unet(input_size: int, num_classes: int, base_filters: int = 16, dropout: float = 0.2,
                     weights: str | None = "imagenet") -> keras.Model:
    """EfficientNet-Lite0 encoder (strides 2..32), U-Net decoder back to full resolution."""
    from defectflow.models.efficientnet_lite import FEATURE_NAMES, build_lite0

    lite0 = build_lite0((input_size, input_size, 3), include_top=False, weights=weights)
    encoder = keras.Model(lite0.inputs, {n: lite0.get_layer(n).output for n in FEATURE_NAMES}, name=BACKBONE)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    feats = encoder(inputs)
    x = feats[FEATURE_NAMES[-1]]
    bottleneck = x
    for level, name in reversed(list(enumerate(FEATURE_NAMES[:-1]))):
        x = _decoder_block(x, feats[name], base_filters * 2 ** (level + 1), f"dec{level + 1}")
    x = _decoder_block(x, None, base_filters, "dec0")
    return keras.Model(inputs, _heads(x, bottleneck, num_classes, dropout), name="defectflow_lite0_unet")


def set_backbone_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze or unfreeze the pretrained encoder; its BatchNorm layers stay frozen always,
    since batches of 8 give poor statistics and would undo the ImageNet ones."""
    try:
        encoder = model.get_layer(BACKBONE)
    except ValueError:
        return
    encoder.trainable = True
    for layer in encoder.layers:
        layer.trainable = trainable and not isinstance(layer, layers.BatchNormalization)


def build_model(backbone: str, input_size: int, num_classes: int, base_filters: int = 16, depth: int = 4,
                dropout: float = 0.2) -> keras.Model:
    if backbone == "lite0":
        return build_lite0_unet(input_size, num_classes, base_filters, dropout)
    if backbone == "plain":
        return build_unet(input_size, num_classes, base_filters, depth, dropout)
    raise ValueError(f"unknown model.backbone {backbone!r}: expected lite0 or plain")


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
        x = _decoder_block(x, skips[level], base_filters * 2**level, f"dec{level}")
    return keras.Model(inputs, _heads(x, bottleneck, num_classes, dropout), name="defectflow_unet")
