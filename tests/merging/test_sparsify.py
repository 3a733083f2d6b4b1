import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmerge import sparsify
from jaxmerge._tree import compute_dtype, exact_jit
from jaxmerge.merging import ranks
from tests.merging import reference


def _data(kind, shape, rng):
    values = rng.standard_normal(shape)
    if kind == "ties":
        return np.round(values * 2) / 2  # many equal magnitudes, and zeros
    if kind == "zeros":
        return np.zeros(shape)
    return values


CASES = [((1000,), 300, jnp.float32), ((37, 23), 100, jnp.float32), ((4, 5, 6), 119, jnp.float32),
         ((50,), 0, jnp.float32), ((50,), 50, jnp.float32), ((50,), 80, jnp.float32), ((), 1, jnp.float32),
         ((37, 23), 100, jnp.bfloat16), ((37, 23), 100, jnp.float16),
         # above sparsify.SORT_LIMIT: the radix selection
         ((70, 80), 1200, jnp.float32), ((5000,), 0, jnp.float32), ((5000,), 6000, jnp.float32),
         ((70, 80), 1200, jnp.bfloat16)]


@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros"])
@pytest.mark.parametrize("shape,k,dtype", CASES)
def test_top_k_mask_matches_a_stable_sort(kind, dtype, shape, k):
    x = jnp.asarray(_data(kind, shape, np.random.default_rng(k)), dtype)
    mask = np.asarray(jax.jit(sparsify.top_k_mask)(x, k))
    np.testing.assert_array_equal(mask, reference.top_k(np.asarray(x, np.float64), k))
    assert mask.sum() == min(k, x.size)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2, 3, 64, 999, 4097]), st.floats(0.0, 1.0), st.integers(0, 2 ** 16), st.booleans())
def test_top_k_mask_property(size, fraction, seed, with_ties):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size)
    if with_ties:
        x = np.round(x)
    k = int(fraction * size)
    mask = np.asarray(_jitted_top_k(jnp.asarray(x, jnp.float32), k))
    np.testing.assert_array_equal(mask, reference.top_k(np.asarray(jnp.asarray(x, jnp.float32), np.float64), k))


_jitted_top_k = jax.jit(sparsify.top_k_mask)


def test_kth_largest_magnitude_is_exact():
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    for k in (1, 17, 50_000, 100_000):
        expected = np.partition(np.abs(x), x.size - k)[x.size - k]
        assert float(sparsify.kth_largest_magnitude(jnp.asarray(x), k)) == expected


def test_k_may_be_traced():
    x = jnp.asarray(np.random.default_rng(1).standard_normal(500), jnp.float32)
    masks = jax.jit(jax.vmap(sparsify.top_k_mask, in_axes=(None, 0)))(x, jnp.arange(0, 500, 50))
    assert [int(m.sum()) for m in masks] == list(range(0, 500, 50))


def test_magnitude_and_breadcrumbs_masks():
    x = np.random.default_rng(2).standard_normal((30, 40))
    np.testing.assert_array_equal(np.asarray(sparsify.magnitude_mask(jnp.asarray(x), 0.3)),
                                  reference.magnitude(x, 0.3))
    got = np.asarray(sparsify.breadcrumbs_mask(jnp.asarray(x), 0.5, 0.1))
    np.testing.assert_array_equal(got, reference.breadcrumbs(x, 0.5, 0.1))
    assert got.sum() == 600
    # the 120 largest are all dropped
    assert not got.ravel()[np.argsort(-np.abs(x).ravel())[:120]].any()


def test_random_mask_keeps_density_within_sampling_error():
    x = jnp.ones(200_000)
    for density in (0.1, 0.5, 0.9):
        kept = float(sparsify.random_mask(jax.random.key(3), x, density).mean())
        sigma = np.sqrt(density * (1 - density) / x.size)
        assert abs(kept - density) < 5 * sigma


@pytest.mark.parametrize("shape", [(7,), (6, 9), (3, 4, 5)])
def test_della_probabilities(shape):
    x = np.round(np.random.default_rng(4).standard_normal(shape), 1)
    got = np.asarray(sparsify.della_probabilities(jnp.asarray(x, jnp.float32), 0.4, 0.1))
    np.testing.assert_allclose(got, reference.della_probabilities(x.astype(np.float32), 0.4, 0.1), atol=1e-6)
    assert got.min() == pytest.approx(0.3) and got.max() <= 0.5 + 1e-6
    magnitudes = np.abs(x).reshape(-1)
    tied = magnitudes[:, None] == magnitudes[None, :]
    if x.ndim == 1:  # equal magnitudes in a row share one probability
        assert np.array_equal(got[:, None] == got[None, :], tied)


@pytest.mark.parametrize("norm", [None, "l1", "l2", "linf", "density"])
def test_rescale(norm):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(100)
    mask = rng.random(100) < 0.3
    got = np.asarray(sparsify.rescale(jnp.asarray(x, jnp.float32), jnp.asarray(mask), norm, 0.3))
    np.testing.assert_allclose(got, reference.rescaled(x, mask, norm, 0.3), rtol=1e-5)
    if norm in ("l1", "l2", "linf"):
        order = {"l1": 1, "l2": 2, "linf": np.inf}[norm]
        assert np.linalg.norm(got, order) == pytest.approx(np.linalg.norm(x, order), rel=1e-5)


def test_rescale_leaves_tiny_vectors_alone():
    x = jnp.full(4, 1e-9)
    np.testing.assert_array_equal(sparsify.rescale(x, jnp.asarray([True, False, True, False]), "l1"),
                                  np.asarray([1e-9, 0, 1e-9, 0], np.float32))


@pytest.mark.parametrize(("dtype", "n"), [(jnp.float32, 3000), (jnp.float32, 5000), (jnp.bfloat16, 5000),
                                          (jnp.float16, 5000)])  # sorted up to SORT_LIMIT, radix-selected above
def test_kth_largest_orders_signed_values(dtype, n):
    assert (n <= sparsify.SORT_LIMIT) == (n == 3000)
    x = np.random.default_rng(4).standard_normal(n)
    x[:7] = 0.0
    x[7] = -0.0
    x = np.asarray(jnp.asarray(x, dtype), np.float64)
    expected = np.sort(x)[::-1]
    for k in (1, 2, 1500, n - 10, n - 7, n):
        assert float(sparsify.kth_largest(jnp.asarray(x, dtype), k)) == expected[k - 1]


@pytest.mark.parametrize("shape", [(7,), (6, 9), (3, 4, 5), (9, 256)])
def test_della_mask_draws_each_entry_at_its_flat_index(shape, monkeypatch):
    """Unsharded, DELLA draws each block of rows as it sorts it (the last shape takes the
    sorting network, in several blocks): the documented keep test on the stream drawn in order."""
    monkeypatch.setattr(ranks, "NETWORK_MIN", 1024)
    monkeypatch.setattr(ranks, "RANK_BLOCK", 1024)
    x = np.round(np.random.default_rng(5).standard_normal(shape), 2).astype(np.float32)
    key = jax.random.key(9)
    mask, probabilities = jax.jit(sparsify.della_mask)(key, jnp.asarray(x), 0.4, 0.1)
    np.testing.assert_allclose(probabilities, reference.della_probabilities(x, 0.4, 0.1), atol=1e-6)
    np.testing.assert_array_equal(mask, reference.della_keep(key, x, 0.4, 0.1))


@pytest.mark.parametrize(("shape", "dtype"), [((9, 64), np.float32), ((33, 50), jnp.bfloat16)])
def test_della_masks_made_on_the_host_follow_the_documented_test(shape, dtype, monkeypatch):
    """A matrix whose rows the network sorts, outside jax.jit, is drawn by a loop on the host
    over blocks of rows (small blocks here stand for large ones); the rest is left to the kernel."""
    monkeypatch.setattr(ranks, "NETWORK_MIN", 256)
    monkeypatch.setattr(ranks, "RANK_BLOCK", 256)
    rng = np.random.default_rng(6)
    base = jnp.asarray(rng.standard_normal(shape), dtype)
    model = jnp.asarray(np.asarray(base, np.float32) + np.round(rng.standard_normal(shape), 1), dtype)
    delta = np.asarray(model, np.float32) - np.asarray(base, np.float32)
    key, params = jax.random.key(2), sparsify.RankedParams(0.4, 0.1)
    x = sparsify.difference(model, base, np.float32)
    mask, probabilities = sparsify.RANKED.host_mask(x, params, key, exact=False, with_keep=True)
    np.testing.assert_array_equal(mask, reference.della_keep(key, delta, 0.4, 0.1))
    np.testing.assert_allclose(probabilities, reference.della_probabilities(delta, 0.4, 0.1), atol=1e-6)
    assert sparsify.RANKED.host_mask(x, params, key, exact=False, with_keep=False)[1] is None
    flat = sparsify.difference(model.reshape(-1), base.reshape(-1), np.float32)
    assert sparsify.RANKED.host_mask(flat, params, key, exact=False, with_keep=False) is None  # one row: the kernel
    under_jit = []
    jax.jit(lambda m, b: under_jit.append(sparsify.RANKED.host_mask(sparsify.difference(m, b, np.float32), params,
                                                                     key, exact=False, with_keep=False)))(model, base)
    assert under_jit == [None]


@pytest.mark.parametrize(("shape", "dtype", "exact", "epsilon"), [
    ((33, 50), jnp.float16, True, 0.2),  # 16-bit arithmetic, rows padded to 64 in the network
    ((129, 2), jnp.bfloat16, False, 0.0),  # rows of two; epsilon 0: one probability for all
    ((300, 1), jnp.float32, True, 0.2),  # rows of one entry
])
def test_della_masks_made_on_the_host_are_the_kernels(shape, dtype, exact, epsilon, monkeypatch):
    """The host loop (keys made by a kernel, rows sorted by NumPy, the block drawn by another
    kernel) gives the jitted path's mask and keep probabilities bit for bit, for task vectors
    with infinities, NaNs and signed zeros too."""
    monkeypatch.setattr(ranks, "NETWORK_MIN", 256)
    monkeypatch.setattr(ranks, "RANK_BLOCK", 256)
    rng = np.random.default_rng(7)
    base = rng.standard_normal(shape)
    model = base + 0.1 * rng.standard_normal(shape)
    model.flat[::11] = np.resize([np.inf, -np.inf, np.nan, 0.0, -0.0], model.flat[::11].shape)
    base, model = jnp.asarray(base, dtype), jnp.asarray(model, dtype)
    vector_dtype = compute_dtype(dtype, exact)
    key, params = jax.random.key(3), sparsify.RANKED.leaf_params(model.size, density=0.5, epsilon=epsilon)

    @exact_jit()
    def kernel(m, b, exact=False):
        return sparsify.RANKED.mask(sparsify.difference(m, b, vector_dtype), params, key)
    mask, probabilities = kernel(model, base, exact=exact)
    x = sparsify.difference(model, base, vector_dtype)
    for with_keep in (False, True):
        host_mask, host_probabilities = sparsify.RANKED.host_mask(x, params, key, exact=exact, with_keep=with_keep)
        np.testing.assert_array_equal(host_mask, mask)
        if with_keep:
            np.testing.assert_array_equal(np.asarray(host_probabilities).view(np.uint32),
                                          np.asarray(probabilities).view(np.uint32))
        else:
            assert host_probabilities is None


def test_rescale_of_a_given_mask_needs_no_temporary_as_large_as_the_vector():
    """The original's norm is taken before the kept entries are made, so that they can overwrite
    the task vector in place (otherwise XLA may hold both at once)."""
    shape = (256, 1024)
    arrays = [jax.ShapeDtypeStruct(shape, jnp.float32)] * 2 + [jax.ShapeDtypeStruct(shape, jnp.bool_)]
    kernel = jax.jit(lambda a, b, mask: sparsify.rescale(a - b, mask, "l1"))
    assert kernel.lower(*arrays).compile().memory_analysis().temp_size_in_bytes < 4 * 256 * 1024


def test_ties_at_the_threshold_are_broken_across_blocks(monkeypatch):
    """The entry ending the kept ties is found by counting each block's ties: in a middle
    block, in the last (overlapping) one, and at a block's first or last entry."""
    from jaxmerge import _blocks

    monkeypatch.setattr(_blocks, "BLOCK", 1024)  # five blocks, the last starting at 3979, rows of 256
    x = np.zeros(5003, np.float32)
    x[[7, 1023, 1024, 2500, 3978, 3979, 4100, 5002]] = 1.0  # ties at the threshold, around the blocks' ends
    x[[5, 9]] = 2.0
    kernel = jax.jit(sparsify.top_k_mask)
    for k in range(1, 11):
        np.testing.assert_array_equal(kernel(jnp.asarray(x), k), reference.top_k(x.astype(np.float64), k))


def test_both_ends_of_a_band_break_their_ties_in_one_pass(monkeypatch):
    """Both ranks of a band end among ties, counted together block by block."""
    from jaxmerge import _blocks

    monkeypatch.setattr(_blocks, "BLOCK", 1024)
    x = np.random.default_rng(4).integers(-3, 4, 5003).astype(np.float64)  # a few values, each often
    for density, gamma in [(0.5, 0.1), (0.3, 0.45), (0.9, 0.05)]:
        params = sparsify.BREADCRUMBS.leaf_params(x.size, density=density, gamma=gamma)
        mask = jax.jit(sparsify.band_mask)(jnp.asarray(x, jnp.float32), params.top, params.k)
        np.testing.assert_array_equal(mask, reference.breadcrumbs(x, density, gamma))


def test_ranks_selected_together_are_each_the_sorted_entry():
    """Several ranks share each pass of one radix selection: ranks whose digits agree so far
    share a histogram, the others count their own keys (here ties, both signs, and ranks in
    one and in different top digits)."""
    x = np.round(np.random.default_rng(2).standard_normal(9000), 2).astype(np.float32)
    ks = np.asarray([1, 2, 17, 4500, 4501, 8999, 9000], np.int32)
    expected = np.sort(x)[::-1][ks - 1]
    np.testing.assert_array_equal(sparsify.kth_largest(jnp.asarray(x), jnp.asarray(ks)), expected)


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.9, 0.3), (0.01, 0.0)])
def test_band_mask_with_ties_matches_the_reference(density, gamma):
    x = np.round(np.random.default_rng(3).standard_normal((90, 80)), 1)  # above SORT_LIMIT, many ties
    params = sparsify.BREADCRUMBS.leaf_params(x.size, density=density, gamma=gamma)
    mask = jax.jit(sparsify.band_mask)(jnp.asarray(x, jnp.float32), params.top, params.k)
    np.testing.assert_array_equal(mask, reference.breadcrumbs(x, density, gamma))
