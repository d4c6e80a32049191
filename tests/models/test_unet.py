import numpy as np
import pytest

from defectflow.models.losses import DiceBCELoss, WeightedCrossEntropy
from defectflow.models.unet import build_unet


def test_two_heads_shapes():
    model = build_unet(32, 6, base_filters=4, depth=2, dropout=0.0)
    out = model.predict_on_batch(np.zeros((2, 32, 32, 3), np.float32))
    assert out["class"].shape == (2, 6)
    assert out["mask"].shape == (2, 32, 32, 1)
    np.testing.assert_allclose(out["class"].sum(axis=1), 1.0, rtol=1e-5)
    assert out["mask"].min() >= 0.0 and out["mask"].max() <= 1.0


def test_dice_bce_rewards_overlap_and_ignores_dice_on_empty_targets():
    loss = DiceBCELoss()
    target = np.zeros((1, 8, 8, 1), np.float32)
    target[0, 2:4, 2:4] = 1
    good = np.clip(target, 0.01, 0.99)
    bad = np.clip(1 - target, 0.01, 0.99)
    assert float(loss(target, good)) < float(loss(target, bad))
    empty = np.zeros_like(target)
    # Empty target: only the cross-entropy part, which is small for a near-empty prediction.
    assert float(loss(empty, np.full_like(target, 0.01))) < 0.05


def test_weighted_cross_entropy_weights_classes():
    probs = np.array([[0.5, 0.5], [0.5, 0.5]], np.float32)
    labels = np.array([0, 1])
    plain = float(WeightedCrossEntropy()(labels, probs))
    weighted = float(WeightedCrossEntropy([1.0, 3.0])(labels, probs))
    assert weighted == pytest.approx(plain * 2.0, rel=1e-5)
    assert WeightedCrossEntropy([1.0, 3.0]).get_config()["class_weights"] == [1.0, 3.0]


def test_lite0_unet_two_heads_and_backbone_freezing():
    import keras

    from defectflow.models.unet import BACKBONE, build_model, set_backbone_trainable

    model = build_model("lite0", 64, 6, base_filters=4, dropout=0.0)
    out = model.predict_on_batch(np.zeros((1, 64, 64, 3), np.float32))
    assert out["class"].shape == (1, 6) and out["mask"].shape == (1, 64, 64, 1)
    encoder = model.get_layer(BACKBONE)
    set_backbone_trainable(model, False)
    assert not any(layer.trainable for layer in encoder.layers)
    set_backbone_trainable(model, True)
    bn = [layer for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)
    assert any(
        layer.trainable
        for layer in encoder.layers
        if not isinstance(layer, keras.layers.BatchNormalization)
    )


def test_unknown_backbone():
    from defectflow.models.unet import build_model

    with pytest.raises(ValueError, match="expected lite0, mobilenetv2, efficientnetb0 or plain"):
        build_model("resnet", 64, 6)


def test_mask_attention_pooling_averages_features_under_the_mask():
    from defectflow.models.unet import MaskAttentionPooling

    features = np.zeros((1, 4, 4, 2), np.float32)
    features[0, 1, 2] = [10.0, -3.0]  # the defect's features
    features[0, 0, 0] = [99.0, 99.0]  # elsewhere: must not count
    mask = np.zeros((1, 8, 8, 1), np.float32)
    mask[0, 3, 5] = 1.0  # one pixel at full resolution, inside feature cell (1, 2)
    pooled = np.asarray(MaskAttentionPooling()([features, mask]))
    np.testing.assert_allclose(pooled, [[10.0, -3.0]], rtol=1e-2)


def test_class_head_pools_features_under_the_mask_and_survives_saving(tmp_path):
    import keras

    from defectflow.models.unet import build_model

    model = build_model("lite0", 64, 6, base_filters=4, dropout=0.0)
    names = {layer.name for layer in model.layers}
    assert {"decoder_under_mask", "stride8_under_mask", "stride16_under_mask"} <= names
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(
        again.predict_on_batch(x)["class"], model.predict_on_batch(x)["class"], rtol=1e-5
    )
