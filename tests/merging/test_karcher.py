import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from tests.helpers import assert_trees_match, random_tree, tree_reference


def numpy_karcher(xs, weights, max_iter=10, tol=1e-5):
    """Weighted Karcher mean on the sphere by Riemannian gradient steps, in float64."""
    alphas = np.asarray(weights) / np.sum(weights)
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / n if n > 0 else np.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return np.zeros_like(xs[0])
    a = alphas[valid] / alphas[valid].sum()
    mean = sum(ai * units[i] for ai, i in zip(a, valid))
    mean = units[valid[0]] if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for ai, i in zip(a, valid):
            dot = np.clip(np.sum(mean * units[i]), -1, 1)
            theta = np.arccos(dot)
            if theta >= tol:
                tangent += ai * theta / np.sin(theta) * (units[i] - dot * mean)
        size = np.linalg.norm(tangent)
        if size < tol:
            break
        mean = np.cos(size) * mean + np.sin(size) * tangent / size
        mean = mean / np.linalg.norm(mean)
    return float(np.sum(alphas * norms)) * mean


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_karcher_matches_numpy(weights):
    models = [random_tree(i) for i in range(3)]
    out = jax.jit(lambda ms: jaxmerge.karcher(ms, weights))(models)
    w = weights or [1.0] * 3
    assert_trees_match(out, tree_reference(lambda xs: numpy_karcher(xs, w), *models), f32_tol=2e-5)


def test_karcher_of_two_is_the_normalized_midpoint():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(50), rng.standard_normal(50)
    out = jaxmerge.karcher([{"w": jnp.asarray(a, jnp.float32)}, {"w": jnp.asarray(b, jnp.float32)}])["w"]
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    mid = (ua + ub) / np.linalg.norm(ua + ub)
    expected = (np.linalg.norm(a) + np.linalg.norm(b)) / 2 * mid
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_karcher_of_one_model_and_of_zero_leaves():
    model = random_tree(0)
    assert_trees_match(jaxmerge.karcher([model]), model, f32_tol=0)
    zeros = {"w": jnp.zeros(4)}
    np.testing.assert_array_equal(jaxmerge.karcher([zeros, zeros])["w"], np.zeros(4, np.float32))


def test_karcher_errors():
    with pytest.raises(ValueError, match=r"tol must be in \(0, inf\), got 0.0"):
        jaxmerge.karcher([random_tree(0)] * 2, tol=0.0)
    with pytest.raises(ValueError, match=r"max_iter must be in \[0, inf\), got -1"):
        jaxmerge.karcher([random_tree(0)] * 2, max_iter=-1)


def test_tol_may_be_traced():
    models = [random_tree(i) for i in range(2)]
    out = jax.jit(lambda tol: jaxmerge.karcher(models, tol=tol))(1e-5)
    assert_trees_match(out, jaxmerge.karcher(models), f32_tol=1e-6)


@pytest.mark.parametrize("size", [1, 1000])
def test_a_direction_opposite_to_the_mean_adds_no_step(size):
    """``[x, x, -x]``: the mean direction starts at ``x``'s, and the third direction, opposite,
    has no part orthogonal to it, so the mean stays ``x``'s. (Steps over the arrays divide that
    part's rounding error, 1e-16, by ``sin(pi)``, also 1e-16: a full step in a direction of
    rounding errors for ``size=1000`` in float64, none for ``size=1``, where it is exactly 0.)"""
    x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    out = jaxmerge.karcher([{"w": jnp.asarray(v)} for v in (x, x, -x)])["w"]
    np.testing.assert_allclose(out, x, rtol=1e-6, atol=1e-6)


def test_nearly_parallel_large_leaves_match_float64():
    """Three fine-tunes of one start (angles about 0.1 apart) over 2**20 entries: the steps on
    the Gram matrix lose nothing to iterating over the arrays (mergekit's own float32 arrays
    are 1e-5 away on such leaves)."""
    rng = np.random.default_rng(3)
    start = rng.standard_normal(1 << 20)
    xs = [(start + 0.1 * rng.standard_normal(start.size)).astype(np.float32) for _ in range(3)]
    out = jaxmerge.karcher([{"w": jnp.asarray(x)} for x in xs], [1.0, 2.0, 0.5])["w"]
    expected = numpy_karcher([x.astype(np.float64) for x in xs], [1.0, 2.0, 0.5])
    assert np.abs(np.asarray(out, np.float64) - expected).max() < 1e-6 * np.abs(expected).max()
