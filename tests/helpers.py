"""Random nested trees and NumPy helpers shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np


def random_tree(seed: int, scale: float = 1.0):
    """A nested tree with float32 and bfloat16 leaves, a tuple node and an int step counter."""
    rng = np.random.default_rng(seed)

    def normal(shape, dtype=jnp.float32):
        return jnp.asarray(scale * rng.standard_normal(shape), dtype)

    return {
        "params": {
            "Dense_0": {"kernel": normal((5, 4)), "bias": normal((4,))},
            "Dense_1": {"kernel": normal((4, 3), jnp.bfloat16), "bias": normal((3,), jnp.bfloat16)},
        },
        "extra": (normal((2, 2, 2)), normal(())),
        "step": jnp.asarray(seed, jnp.int32),
    }


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def tree_reference(fn, *trees):
    """Apply a NumPy reference ``fn(list of float64 leaves) -> array`` to float leaves of ``trees``.

    Non-float leaves come from the first tree; results are cast to the first tree's dtypes.
    """
    def leaf(first, *rest):
        if not jnp.issubdtype(first.dtype, jnp.floating):
            return np.asarray(first)
        return np.asarray(jnp.asarray(fn([f64(first)] + [f64(r) for r in rest]), first.dtype))
    return jax.tree.map(leaf, *trees)


def assert_trees_match(actual, expected, *, f32_tol=1e-5):
    """Structure and dtypes equal; float32 leaves within ``f32_tol``, bf16 within one ulp."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        a = np.asarray(a)
        e = np.asarray(e)
        assert a.dtype == e.dtype, (jax.tree_util.keystr(path), a.dtype, e.dtype)
        assert a.shape == e.shape, (jax.tree_util.keystr(path), a.shape, e.shape)
        if a.dtype == jnp.bfloat16:
            np.testing.assert_allclose(f64(a), f64(e), rtol=2 ** -7, atol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))
        elif jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, e, rtol=f32_tol, atol=f32_tol, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))
