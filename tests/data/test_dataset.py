import numpy as np

from defectflow.data.dataset import ArraySplit, make_dataset, oversampled_indices


def test_oversampling_balances_classes_and_keeps_every_image():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    index = oversampled_indices(labels, seed=0)
    assert np.bincount(labels[index]).tolist() == [10, 10, 10]
    assert set(index.tolist()) == set(range(len(labels)))
    np.testing.assert_array_equal(index, oversampled_indices(labels, seed=0))


def test_oversampled_dataset_length():
    split = ArraySplit(
        np.zeros((5, 8, 8, 3), np.float32),
        np.array([0, 0, 0, 1, 2], np.int32),
        np.zeros((5, 8, 8, 1), np.float32),
    )
    seen = [
        int(y["class"].shape[0]) for _, y in make_dataset(split, 4, oversample=True, shuffle=True)
    ]
    assert sum(seen) == 9
    assert sum(int(y["class"].shape[0]) for _, y in make_dataset(split, 4)) == 5


def test_an_epoch_keyed_shuffle_depends_on_the_epoch_only():
    """With `epoch`, an iteration's order is a function of (seed, epoch): the same epoch again
    gives the same order (a resumed run), another epoch another order, every sample once."""
    import tensorflow as tf

    n = 10
    split = ArraySplit(
        np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 2, 2, 3), np.float32),
        np.arange(n, dtype=np.int32),
        np.zeros((n, 2, 2, 1), np.float32),
    )
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = make_dataset(split, 4, shuffle=True, seed=0, epoch=epoch)
    assert int(ds.cardinality()) == 3

    def order(value: int) -> list[int]:
        epoch.assign(value)
        seen = []
        for x, y in ds:
            assert np.array_equal(
                x.numpy()[:, 0, 0, 0], y["class"].numpy()
            )  # image and label stay together
            seen += y["class"].numpy().tolist()
        return seen

    first = order(0)
    assert sorted(first) == list(range(n)) and first != list(range(n))
    assert order(1) != first and sorted(order(1)) == list(range(n))
    assert order(0) == first
