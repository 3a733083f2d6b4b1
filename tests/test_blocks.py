import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import _blocks


@pytest.mark.parametrize("shape", [(0,), (5,), (8,), (3, 7), (4, 4)])  # one block, exact blocks, an overlapping last
def test_sums_count_every_entry_once(shape, monkeypatch):
    monkeypatch.setattr(_blocks, "BLOCK", 8)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    products, squares, ones = jax.jit(lambda a, b: _blocks.sums(
        lambda c: [c[0] * c[1], jnp.square(c[0]), jnp.ones_like(c[1])], [a, b], jnp.float32))(a, b)
    np.testing.assert_allclose(products, np.sum(a.astype(np.float64) * b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(squares, np.sum(np.square(a.astype(np.float64))), rtol=1e-5, atol=1e-6)
    assert ones == a.size


def test_fold_gives_each_block_its_flat_indices_and_marks_the_repeated_ones(monkeypatch):
    monkeypatch.setattr(_blocks, "BLOCK", 4)
    seen = _blocks.fold(lambda chunks, index, fresh, acc: acc.at[index].add(fresh.astype(jnp.int32)),
                        [jnp.zeros((2, 5))], jnp.zeros(10, jnp.int32))
    np.testing.assert_array_equal(seen, np.ones(10))  # blocks [0, 4), [4, 8), [6, 10): 6 and 7 counted once
