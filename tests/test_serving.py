"""The service's helpers that need no HTTP: the packed outputs of a batched forward pass."""

import numpy as np
import pytest

from defectflow.serving import pack_outputs, unpack_outputs


def outputs(n, classes=6, size=8, grid=None):
    rng = np.random.default_rng(n)
    out = {"class": rng.random((n, classes), np.float32), "mask": rng.random((n, size, size, 1), np.float32)}
    if grid:
        out["anomaly"] = rng.random((n, *grid, 1), np.float32)
    return out


@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_packed_outputs_unpack_to_the_same_arrays(grid):
    original = outputs(3, grid=grid)
    packed = pack_outputs(original)
    assert packed.shape == (3, 6 + 64 + (6 if grid else 0)) and packed.dtype == np.float32
    # Adaptive batching splits along the first axis: each row unpacks on its own too.
    for rows in (packed, packed[1:2]):
        back = unpack_outputs(rows, 6, 8, grid)
        assert set(back) == set(original)
        for name in original:
            np.testing.assert_array_equal(back[name], original[name][: len(rows)] if len(rows) == 3 else
                                          original[name][1:2])


def test_unpacking_with_the_wrong_shapes_says_what_does_not_fit():
    with pytest.raises(ValueError, match="2x3 anomaly map"):
        unpack_outputs(pack_outputs(outputs(2)), 6, 8, (2, 3))
    with pytest.raises(ValueError, match="6 classes, a 8px mask"):
        unpack_outputs(pack_outputs(outputs(2, grid=(2, 3))), 6, 8)
