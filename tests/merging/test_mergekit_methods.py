"""NearSwap, Arcee Fusion, RAM, RAM+ and passthrough against NumPy written from mergekit 0.1.5's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from tests.helpers import assert_trees_match, random_tree, tree_reference


def test_nearswap_matches_numpy():
    a, b = random_tree(0), random_tree(1)

    def leaf(xs):
        weight = np.clip(0.3 / np.maximum(np.abs(xs[0] - xs[1]), 1e-6), 0, 1)
        return weight * xs[1] + (1 - weight) * xs[0]

    assert_trees_match(jaxmerge.nearswap(a, b, 0.3), tree_reference(leaf, a, b))
    assert_trees_match(jaxmerge.nearswap(a, b, 0.0), a)  # t = 0: nothing is swapped


def numpy_arcee_fusion(a, b):
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    importance = np.abs(b - a) * np.sum(p * np.log(p / q), -1, keepdims=True)
    ordered = np.sort(importance.reshape(-1))
    q1, median, q3 = (ordered[int(np.float32(q) * np.float32(ordered.size - 1))] for q in (0.25, 0.5, 0.75))
    return np.where(importance >= median + 1.5 * (q3 - q1), b, a)


def test_arcee_fusion_matches_numpy():
    rng = np.random.default_rng(3)
    a = {"w": jnp.asarray(rng.standard_normal((12, 40)), jnp.float32), "v": jnp.asarray(rng.standard_normal(50))}
    b = {k: v + jnp.asarray(rng.standard_normal(v.shape) * rng.exponential(size=v.shape) * 0.1, v.dtype)
         for k, v in a.items()}
    out = jaxmerge.arcee_fusion(a, b)
    expected = tree_reference(lambda xs: numpy_arcee_fusion(*xs), a, b)
    assert_trees_match(out, expected)
    changed = np.mean(np.asarray(out["w"]) != np.asarray(a["w"]))
    assert 0 < changed < 0.5  # only the outliers of importance are fused in


def numpy_ram(base, models, epsilon, r=None, alpha=None):
    deltas = np.stack([m - base for m in models])
    active = np.abs(deltas) > epsilon
    count = active.sum(0)
    unique, shared = count == 1, count > 1
    scales = np.ones(len(models))
    if r is not None:
        rho = (active & shared).reshape(len(models), -1).sum(1) / np.maximum(
            (active & unique).reshape(len(models), -1).sum(1), epsilon)
        scales = 1 + r * np.clip(rho, 0, alpha)
    kept = np.where(active, deltas, 0)
    merged = sum(np.where(unique, kept[i] * scales[i], 0) + np.where(shared, kept[i] / np.maximum(count, 1), 0)
                 for i in range(len(models)))
    return base + merged


def _sparse_tunes(base, n=3):
    """Fine-tunes that each change a random third of the entries."""
    def tune(i):
        rng = np.random.default_rng(10 + i)
        return jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape) * (rng.random(x.shape) < 0.33),
                                                      x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, base)
    return [tune(i) for i in range(n)]


@pytest.mark.parametrize("plus", [False, True])
def test_ram_matches_numpy(plus):
    base = random_tree(0)
    models = _sparse_tunes(base)
    if plus:
        out = jaxmerge.ramplus_tl(base, models, r=0.5, alpha=0.8, epsilon=1e-3)
        expected = tree_reference(lambda xs: numpy_ram(xs[0], xs[1:], 1e-3, 0.5, 0.8), base, *models)
    else:
        out = jaxmerge.ram(base, models, epsilon=1e-3)
        expected = tree_reference(lambda xs: numpy_ram(xs[0], xs[1:], 1e-3), base, *models)
    assert_trees_match(out, expected)


def test_passthrough_scales_only_what_it_is_told_to():
    model = random_tree(0)
    assert_trees_match(jaxmerge.passthrough([model]), model)
    out = jaxmerge.passthrough([model], scale=[{"filter": "Dense_0", "value": 0.5}])
    expected = tree_reference(lambda xs: xs[0] * 0.5, model)
    np.testing.assert_allclose(out["params"]["Dense_0"]["kernel"], expected["params"]["Dense_0"]["kernel"])
    np.testing.assert_array_equal(out["params"]["Dense_1"]["kernel"], model["params"]["Dense_1"]["kernel"])
    with pytest.raises(ValueError, match="passthrough merges exactly 1 model, got 2"):
        jaxmerge.passthrough([model, model])
