"""Augmentation of image and mask together, with Keras augmentation layers.

Geometric layers run once on the image and mask stacked as one 4-channel tensor, so the mask
moves exactly with its defect; photometric layers and noise then touch the image only. Each
group is applied to a sample with its configured probability, drawn per sample.
"""

from __future__ import annotations

import keras
from keras import layers, ops


def _per_sample(x, transform, probability: float, seed):
    """`transform(x)` for a random `probability` share of the samples of batch `x`."""
    if probability >= 1.0:
        return transform(x)
    if probability <= 0.0:
        return x
    chosen = keras.random.uniform((ops.shape(x)[0], 1, 1, 1), seed=seed) < probability
    return ops.where(chosen, transform(x), x)


class JointAugmentation:
    def __init__(self, cfg, seed: int = 0):
        # Nearest neighbour: bilinear resampling blurs defects that are one or two pixels
        # wide, and a model trained on blurred defects learns nothing about sharp ones.
        interpolation = cfg.interpolation
        k = float(cfg.strength)  # one knob for the tuner: scales every magnitude below
        rotation, translation, zoom = cfg.rotation * k, cfg.translation * k, cfg.zoom * k
        brightness, contrast = min(cfg.brightness * k, 1.0), min(cfg.contrast * k, 1.0)
        geometric = []
        flip = {
            (True, True): "horizontal_and_vertical",
            (True, False): "horizontal",
            (False, True): "vertical",
        }.get((cfg.horizontal_flip, cfg.vertical_flip))
        if flip:
            geometric.append(layers.RandomFlip(flip, seed=seed))
        if rotation > 0:
            geometric.append(
                layers.RandomRotation(
                    rotation, fill_mode="reflect", interpolation=interpolation, seed=seed + 1
                )
            )
        if translation > 0:
            geometric.append(
                layers.RandomTranslation(
                    translation,
                    translation,
                    fill_mode="reflect",
                    interpolation=interpolation,
                    seed=seed + 2,
                )
            )
        if zoom > 0:
            geometric.append(
                layers.RandomZoom(
                    zoom, fill_mode="reflect", interpolation=interpolation, seed=seed + 3
                )
            )
        photometric = []
        if brightness > 0:
            photometric.append(
                layers.RandomBrightness(brightness, value_range=(0, 255), seed=seed + 4)
            )
        if contrast > 0:
            photometric.append(layers.RandomContrast(contrast, value_range=(0, 255), seed=seed + 5))
        self.geometric = keras.Sequential(geometric, name="geometric") if geometric else None
        self.photometric = (
            keras.Sequential(photometric, name="photometric") if photometric else None
        )
        self.noise_std = float(cfg.noise_std) * k
        self.probabilities = (cfg.p_geometric, cfg.p_photometric, cfg.p_noise)
        # The per-sample choices and the noise: a generator of its own, not Keras' global one,
        # so that every random draw of the augmentation is in `seed_generators`.
        self.generator = keras.random.SeedGenerator(seed + 6)

    def seed_generators(self) -> list:
        """Every random generator the augmentation draws from (its layers' and its own): what
        must be set to make a batch's augmentation reproducible (see defectflow.training.train)."""
        layers_ = [
            layer for seq in (self.geometric, self.photometric) if seq for layer in seq.layers
        ]
        return [layer.generator for layer in layers_] + [self.generator]

    def _noise(self, images):
        return images + keras.random.normal(
            ops.shape(images), stddev=self.noise_std, seed=self.generator
        )

    def __call__(self, images, masks):
        """Batched images (N, H, W, 3) in [0, 255] and masks (N, H, W, 1) in [0, 1]."""
        p_geometric, p_photometric, p_noise = self.probabilities
        if self.geometric is not None:
            stacked = ops.concatenate([images, masks], axis=-1)
            stacked = _per_sample(
                stacked, lambda x: self.geometric(x, training=True), p_geometric, self.generator
            )
            images, masks = stacked[..., :3], stacked[..., 3:]
        if self.photometric is not None:
            images = _per_sample(
                images, lambda x: self.photometric(x, training=True), p_photometric, self.generator
            )
        if self.noise_std > 0:
            images = _per_sample(images, self._noise, p_noise, self.generator)
        return ops.clip(images, 0.0, 255.0), ops.clip(masks, 0.0, 1.0)

    def describe(self) -> list[str]:
        names = [
            layer.name for seq in (self.geometric, self.photometric) if seq for layer in seq.layers
        ]
        return names + ([f"gaussian_noise(std={self.noise_std})"] if self.noise_std > 0 else [])
