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
    assert any(layer.trainable for layer in encoder.layers if not isinstance(layer, keras.layers.BatchNormalization))


def test_unknown_backbone():
    from defectflow.models.unet import build_model

    with pytest.raises(ValueError, match="lite0 or plain"):
        build_model("resnet", 64, 6)
