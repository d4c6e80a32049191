import numpy as np
from omegaconf import OmegaConf

from defectflow.config import AugmentConfig
from defectflow.data.augment import JointAugmentation
from defectflow.evaluation.plots import augmentation_preview


def _cfg(**kw):
    always = {"p_geometric": 1.0, "p_photometric": 1.0, "p_noise": 1.0, "noise_std": 0.0}
    return OmegaConf.merge(OmegaConf.structured(AugmentConfig), {**always, **kw})


def test_mask_moves_with_the_image():
    # Brightness/contrast off: then the red square in the image and the mask must stay aligned.
    aug = JointAugmentation(
        _cfg(brightness=0.0, contrast=0.0, rotation=0.1, translation=0.2), seed=3
    )
    images = np.zeros((4, 32, 32, 3), np.float32)
    masks = np.zeros((4, 32, 32, 1), np.float32)
    images[:, 4:10, 20:28, 0] = 255.0
    masks[:, 4:10, 20:28, 0] = 1.0
    out_images, out_masks = aug(images, masks)
    out_images, out_masks = np.asarray(out_images), np.asarray(out_masks)
    red = out_images[..., 0] > 127
    moved = out_masks[..., 0] > 0.5
    assert (red == moved).mean() > 0.97
    assert not np.array_equal(moved, masks[..., 0] > 0.5)  # something did move
    assert out_masks.min() >= 0 and out_masks.max() <= 1
    assert out_images.min() >= 0 and out_images.max() <= 255


def test_photometric_changes_image_only_and_preview():
    aug = JointAugmentation(
        _cfg(
            horizontal_flip=False,
            vertical_flip=False,
            rotation=0.0,
            translation=0.0,
            zoom=0.0,
            brightness=0.5,
        ),
        seed=0,
    )
    assert aug.geometric is None and aug.describe()
    images = np.full((2, 16, 16, 3), 100.0, np.float32)
    masks = np.zeros((2, 16, 16, 1), np.float32)
    masks[:, 3:6, 3:6] = 1
    out_images, out_masks = aug(images, masks)
    assert not np.allclose(np.asarray(out_images), images)
    np.testing.assert_array_equal(np.asarray(out_masks), masks)
    grid = augmentation_preview(aug, images, masks, count=2)
    assert grid.ndim == 3 and grid.dtype == np.uint8


def test_probabilities_are_drawn_per_sample():
    images = np.zeros((64, 16, 16, 3), np.float32)
    masks = np.zeros((64, 16, 16, 1), np.float32)
    masks[:, 2:5, 2:5] = 1
    never = JointAugmentation(_cfg(p_geometric=0.0, brightness=0.0, contrast=0.0), seed=1)
    np.testing.assert_array_equal(np.asarray(never(images, masks)[1]), masks)
    half = JointAugmentation(
        _cfg(
            p_geometric=0.5,
            rotation=0.0,
            translation=0.0,
            zoom=0.0,
            vertical_flip=False,
            brightness=0.0,
            contrast=0.0,
        ),
        seed=1,
    )
    flipped = (np.asarray(half(images, masks)[1]) != masks).reshape(64, -1).any(axis=1)
    assert 5 < flipped.sum() < 59  # about half, never none or all


def test_noise_changes_image_only():
    aug = JointAugmentation(
        _cfg(
            horizontal_flip=False,
            vertical_flip=False,
            rotation=0.0,
            translation=0.0,
            zoom=0.0,
            brightness=0.0,
            contrast=0.0,
            noise_std=8.0,
        ),
        seed=0,
    )
    images = np.full((2, 16, 16, 3), 128.0, np.float32)
    masks = np.zeros((2, 16, 16, 1), np.float32)
    out_images, out_masks = aug(images, masks)
    assert 4 < np.asarray(out_images).std() < 12
    np.testing.assert_array_equal(np.asarray(out_masks), masks)
    assert any("noise" in name for name in aug.describe())
