import numpy as np
import pytest

from defectflow.models.backbones import BACKBONE, WeightsUnavailable, build_encoder
from defectflow.models.efficientnet_lite import FEATURE_NAMES
from defectflow.models.unet import build_model


@pytest.mark.parametrize("backbone", ["mobilenetv2", "efficientnetb0"])
def test_keras_applications_encoders_give_five_strides(backbone):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        encoder = build_encoder(backbone, 64, weights="none")
    assert encoder.name == BACKBONE
    out = encoder.predict_on_batch(np.zeros((1, 64, 64, 3), np.float32))
    assert [out[n].shape[1] for n in FEATURE_NAMES] == [32, 16, 8, 4, 2]


def test_local_weights_file_is_loaded(tmp_path):
    """model.weights=PATH: the weights of that file, not a random initialisation."""
    import keras

    reference = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(64, 64, 3)
    )
    path = tmp_path / "mobilenetv2.weights.h5"
    reference.save_weights(path)
    encoder = build_encoder("mobilenetv2", 64, weights=str(path))
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    expected = reference.predict_on_batch(x / 127.5 - 1.0)
    np.testing.assert_allclose(
        encoder.predict_on_batch(x)["stride32"], expected, rtol=1e-4, atol=1e-4
    )


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailable, match="no such file"):
        build_encoder("mobilenetv2", 64, weights=str(tmp_path / "absent.h5"))


def test_imagenet_download_failure_says_what_to_do(monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(keras.applications, "MobileNetV2", offline)
    with pytest.raises(WeightsUnavailable, match="model.weights=/path/to/it"):
        build_encoder("mobilenetv2", 64, weights="imagenet")


def test_plain_backbone_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        build_model("plain", 32, 3, base_filters=4, depth=2)
