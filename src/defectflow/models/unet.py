"""Two-head U-Nets: one encoder, a decoder that draws the defect mask, and a class head.

`build_model` picks the encoder: a pretrained one from `defectflow.models.backbones`
(`lite0`, EfficientNet-Lite0 with ImageNet weights read offline, is the default) or `plain`
(a small convolutional encoder trained from scratch, for tests and tiny runs: from random
weights it learns little on real data).

The class head reads the bottleneck (what the whole image looks like) together with
mask-attention pooling: encoder and decoder features averaged under the predicted mask, i.e.
what the defect itself looks like. A defect covering 0.5 % of the image is invisible to
global average pooling; under its own mask it is the whole signal.
"""

from __future__ import annotations

import keras
from keras import layers

from defectflow.models.backbones import BACKBONE, build_encoder, random_init_warning
from defectflow.models.efficientnet_lite import FEATURE_NAMES
from defectflow.models.layers import MaskAttentionPooling


def _conv_block(x, filters: int, name: str, convs: int = 2):
    for i in range(1, convs + 1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def _decoder_block(x, skip, filters: int, name: str, convs: int = 2):
    x = layers.UpSampling2D(name=f"{name}_up")(x)
    if skip is not None:
        x = layers.Concatenate(name=f"{name}_skip")([x, skip])
    return _conv_block(x, filters, name, convs)


def _heads(x, bottleneck, num_classes: int, dropout: float, attended: dict | None = None) -> dict:
    """`x`: full-resolution decoder features; `attended`: more feature maps to pool under the mask."""
    # Defects cover ~1 % of the pixels: start the mask head at that prior (sigmoid(-4.6))
    # instead of 0.5, or early training paints half the image as defect. float32 output
    # under mixed precision: the Dice sums over 65k pixels overflow float16.
    mask = layers.Conv2D(
        1,
        1,
        activation="sigmoid",
        bias_initializer=keras.initializers.Constant(-4.6),
        dtype="float32",
        name="mask",
    )(x)
    pooled = [
        layers.GlobalAveragePooling2D(name="gap")(bottleneck),
        layers.GlobalMaxPooling2D(name="gmp")(bottleneck),
        # Max pooling keeps the evidence of a defect that covers a few pixels.
        layers.GlobalMaxPooling2D(name="decoder_gmp")(x),
        MaskAttentionPooling(name="decoder_under_mask")([x, mask]),
        # Peak mask probability and mask area: direct evidence of a (small) defect.
        layers.GlobalMaxPooling2D(name="mask_peak")(mask),
        layers.GlobalAveragePooling2D(name="mask_mean")(mask),
    ]
    for name, features in (attended or {}).items():
        pooled.append(MaskAttentionPooling(name=f"{name}_under_mask")([features, mask]))
    features = layers.Concatenate(name="class_features", dtype="float32")(pooled)
    features = layers.Dropout(dropout, name="class_dropout")(features)
    features = layers.Dense(128, activation="relu", name="class_dense")(features)
    logits = layers.Dense(num_classes, name="class_logits")(features)
    probabilities = layers.Activation("softmax", name="class", dtype="float32")(logits)
    return {"class": probabilities, "mask": mask}


def build_pretrained_unet(
    backbone: str,
    input_size: int,
    num_classes: int,
    base_filters: int = 16,
    dropout: float = 0.2,
    weights: str | None = "imagenet",
) -> keras.Model:
    """Pretrained encoder (strides 2..32), U-Net decoder back to full resolution.

    The decoder is light on purpose: on a CPU the encoder costs ~0.5 GFLOP at 256 px, and a
    textbook decoder (two 3x3 convolutions per level, the 1280-channel head as the deepest
    skip) costs ten times that. So the head is first projected to 8 x base_filters channels,
    the coarse levels (16 and 32 px at 256 px input, cheap) keep two convolutions, and the
    three finest levels have one each, the full-resolution one at half width.
    """
    encoder = build_encoder(backbone, input_size, weights)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    feats = encoder(inputs)
    bottleneck = feats[FEATURE_NAMES[-1]]
    x = layers.Conv2D(base_filters * 8, 1, use_bias=False, name="head_proj")(bottleneck)
    x = layers.Activation("relu", name="head_proj_relu")(
        layers.BatchNormalization(name="head_proj_bn")(x)
    )
    widths = {
        4: (base_filters * 8, 2),
        3: (base_filters * 4, 2),
        2: (base_filters * 2, 1),
        1: (base_filters, 1),
    }
    decoded = {}
    for level, name in reversed(list(enumerate(FEATURE_NAMES[:-1]))):
        filters, convs = widths[level + 1]
        x = _decoder_block(x, feats[name], filters, f"dec{level + 1}", convs)
        decoded[level + 1] = x
    x = _decoder_block(x, None, max(base_filters // 2, 4), "dec0", convs=1)
    # Under the mask: the encoder's mid-level features (what texture the defect has) and the
    # decoder at stride 4 (its shape at a scale where cracks and pokes differ).
    attended = {"stride8": feats["stride8"], "stride16": feats["stride16"], "dec2": decoded[2]}
    return keras.Model(
        inputs,
        _heads(x, bottleneck, num_classes, dropout, attended),
        name=f"defectflow_{backbone}_unet",
    )


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


def build_model(
    backbone: str,
    input_size: int,
    num_classes: int,
    base_filters: int = 16,
    depth: int = 4,
    dropout: float = 0.2,
    weights: str | None = "imagenet",
) -> keras.Model:
    if backbone == "plain":
        random_init_warning("plain")
        return build_unet(input_size, num_classes, base_filters, depth, dropout)
    return build_pretrained_unet(backbone, input_size, num_classes, base_filters, dropout, weights)


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
    attended = {"enc_mid": skips[depth // 2]}
    return keras.Model(
        inputs, _heads(x, bottleneck, num_classes, dropout, attended), name="defectflow_unet"
    )
