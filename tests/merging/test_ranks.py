import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.merging import ranks


def _reference(keys):
    """Count, per entry, the entries of its row (axis 1) with a smaller key."""
    moved = np.moveaxis(keys, 1, -1)
    counts = (moved[..., None, :] < moved[..., :, None]).sum(-1)
    return np.moveaxis(counts, -1, 1)


@pytest.mark.parametrize(("shape", "dtype"), [
    ((13, 256), np.uint32),  # the network, a power-of-two row, blocks overlapping at the end
    ((10, 200), np.uint16),  # the network, rows padded to 256, 16-bit keys at their maximum too
    ((9, 6, 3), np.uint32),  # the sort, the ranked axis not the last
])
def test_row_ranks_count_the_smaller_keys_of_each_row(shape, dtype, monkeypatch):
    monkeypatch.setattr(ranks, "NETWORK_MIN", 1024)
    monkeypatch.setattr(ranks, "RANK_BLOCK", 1024)
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 300, size=shape).astype(dtype)  # many equal keys
    keys.flat[::7] = np.iinfo(dtype).max
    np.testing.assert_array_equal(ranks.row_ranks(jnp.asarray(keys)), _reference(keys))
