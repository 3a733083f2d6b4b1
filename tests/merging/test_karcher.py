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
