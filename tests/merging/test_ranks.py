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


def test_host_row_blocks_give_each_block_its_rows_and_first_row(monkeypatch):
    monkeypatch.setattr(ranks, "NETWORK_MIN", 64)
    monkeypatch.setattr(ranks, "RANK_BLOCK", 64)  # blocks of 4 rows of 16: the last one overlapping
    keys = np.random.default_rng(1).integers(0, 50, size=(10, 13)).astype(np.uint32)
    firsts = []

    def keys_of(blocks):
        return jnp.asarray(blocks[0]) + jnp.asarray(blocks[1]).astype(jnp.uint32)

    def finish(ordered, keys, first_row):
        firsts.append(int(first_row))
        np.testing.assert_array_equal(ordered, np.sort(keys, axis=-1))
        return ranks.smaller(jnp.asarray(ordered), keys), jnp.zeros(keys.shape, jnp.int32) + first_row

    counts, offsets = ranks.host_row_blocks(keys_of, finish, [keys, np.zeros_like(keys, np.int32)])
    assert firsts == [0, 4, 6]
    np.testing.assert_array_equal(counts, _reference(keys))
    np.testing.assert_array_equal(offsets[:, 0], [0, 0, 0, 0, 4, 4, 6, 6, 6, 6])
