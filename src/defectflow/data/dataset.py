"""Turning samples into arrays and tf.data pipelines for training and tuning."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defectflow.data.mvtec import Sample
from defectflow.inference.preprocessing import prepare_image, prepare_mask, read_image, read_mask


@dataclass
class ArraySplit:
    images: np.ndarray  # (N, S, S, 3) float32 in [0, 255]
    labels: np.ndarray  # (N,) int32 class indices
    masks: np.ndarray  # (N, S, S, 1) float32 in [0, 1]

    def __len__(self) -> int:
        return len(self.labels)


def load_split(samples: list[Sample], classes: list[str], size: int) -> ArraySplit:
    index = {c: i for i, c in enumerate(classes)}
    images = np.stack([prepare_image(read_image(s.path), size) for s in samples])
    masks = np.stack(
        [prepare_mask(read_mask(s.mask_path) if s.mask_path else None, size) for s in samples]
    )
    labels = np.array([index[s.label] for s in samples], dtype=np.int32)
    return ArraySplit(images, labels, masks)


def spread_over_classes(samples: list[Sample], count: int) -> list[Sample]:
    """Up to `count` samples taken round-robin over the classes (for previews and plots)."""
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    queues = [list(v) for _, v in sorted(by_class.items())]
    out: list[Sample] = []
    while len(out) < count and any(queues):
        for queue in queues:
            if queue and len(out) < count:
                out.append(queue.pop(0))
    return out


def oversampled_indices(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices that repeat the images of each smaller class until every class is as large as
    the largest, so training batches are not dominated by `good` images."""
    rng = np.random.default_rng(seed)
    target = int(np.bincount(labels).max())
    parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        parts += [members, rng.choice(members, target - len(members), replace=True)]
    return rng.permutation(np.concatenate(parts))


def make_dataset(
    split: ArraySplit,
    batch_size: int,
    augment=None,
    shuffle: bool = False,
    seed: int = 0,
    oversample: bool = False,
    cache: bool = False,
    epoch=None,
):
    """(image, {"class": label, "mask": mask}) batches; augmentation runs per batch on the fly.

    With `oversample`, an epoch shows every class as often as the largest one; repeated
    images look different each time through augmentation. `cache` keeps the finished batches
    (for data without augmentation, e.g. validation, on a device that would wait for them).

    `epoch`, a tf.Variable (int64) holding the epoch number: the shuffle order of an iteration
    is then a function of (`seed`, its value when the iteration starts) rather than of how many
    iterations came before, so a run resumed at epoch e shuffles epoch e as an uninterrupted run
    does. Without it, each iteration reshuffles from the dataset's own running state.
    """
    import tensorflow as tf

    index = oversampled_indices(split.labels, seed) if oversample else np.arange(len(split))
    ds = tf.data.Dataset.from_tensor_slices(
        (split.images[index], split.labels[index], split.masks[index])
    )
    if shuffle and epoch is not None:
        count = len(index)

        def permuted(*split_tensors):  # runs when an iteration starts, i.e. after the epoch is set
            key = tf.stack([tf.constant(seed, tf.int64), epoch.read_value()])
            order = tf.argsort(tf.random.stateless_uniform([count], seed=key), stable=True)
            return tf.data.Dataset.from_tensor_slices(order).map(
                lambda i: tuple(t[i] for t in split_tensors)
            )

        # The whole split as one element, read in a permuted order: as much memory as a
        # shuffle buffer of the split's size.
        ds = ds.batch(count).flat_map(permuted)
        ds = ds.apply(tf.data.experimental.assert_cardinality(count))  # Keras counts the steps
    elif shuffle:
        ds = ds.shuffle(len(index), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y, m: (*augment(x, m), y), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(lambda x, m, y: (x, {"class": y, "mask": m}))
    else:
        ds = ds.map(lambda x, y, m: (x, {"class": y, "mask": m}))
        if cache:
            ds = ds.cache()
    return ds.prefetch(tf.data.AUTOTUNE)
