import numpy as np

from defectflow.data.dataset import ArraySplit, make_dataset, oversampled_indices


def test_oversampling_balances_classes_and_keeps_every_image():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    index = oversampled_indices(labels, seed=0)
    assert np.bincount(labels[index]).tolist() == [10, 10, 10]
    assert set(index.tolist()) == set(range(len(labels)))
    np.testing.assert_array_equal(index, oversampled_indices(labels, seed=0))


def test_oversampled_dataset_length():
    split = ArraySplit(np.zeros((5, 8, 8, 3), np.float32), np.array([0, 0, 0, 1, 2], np.int32),
                       np.zeros((5, 8, 8, 1), np.float32))
    seen = [int(y["class"].shape[0]) for _, y in make_dataset(split, 4, oversample=True, shuffle=True)]
    assert sum(seen) == 9
    assert sum(int(y["class"].shape[0]) for _, y in make_dataset(split, 4)) == 5
