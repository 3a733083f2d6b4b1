import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmerge
from tests.helpers import assert_trees_match, random_tree, tree_reference


def numpy_slerp(a, b, t, eps=1e-8, threshold=0.9995):
    """SLERP from its definition (Shoemake 1985), in float64, with mergekit's lerp fallback."""
    a, b = a.ravel(), b.ravel()
    ua = a / np.linalg.norm(a) if np.linalg.norm(a) > eps else a
    ub = b / np.linalg.norm(b) if np.linalg.norm(b) > eps else b
    cos = float(ua @ ub)
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_numpy(jit, t):
    a, b = random_tree(0), random_tree(1)
    fn = jax.jit(jaxmerge.slerp) if jit else jaxmerge.slerp
    expected = tree_reference(lambda xs: numpy_slerp(xs[0], xs[1], t).reshape(xs[0].shape), a, b)
    assert_trees_match(fn(a, b, t), expected)


def test_slerp_ends_are_exact():
    a, b = random_tree(0), random_tree(1)
    assert_trees_match(jaxmerge.slerp(a, b, 0.0), a, f32_tol=0)
    b_with_a_step = dict(b, step=a["step"])
    assert_trees_match(jaxmerge.slerp(a, b, 1.0), b_with_a_step, f32_tol=0)


def test_slerp_of_colinear_leaves_is_lerp():
    a = {"w": jnp.asarray([1.0, 2.0, 3.0])}
    b = {"w": 3 * a["w"]}
    np.testing.assert_allclose(jaxmerge.slerp(a, b, 0.25)["w"], 1.5 * a["w"], rtol=1e-6)
    opposite = {"w": -a["w"]}
    np.testing.assert_allclose(jaxmerge.slerp(a, opposite, 0.25)["w"], 0.5 * a["w"], rtol=1e-6)


def test_slerp_with_a_zero_leaf_follows_the_definition():
    a = {"w": jnp.zeros(3)}
    b = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    expected = numpy_slerp(np.zeros(3), np.asarray([1.0, -2.0, 0.5]), 0.4)
    np.testing.assert_allclose(jaxmerge.slerp(a, b, 0.4)["w"], expected, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 2 ** 16))
def test_slerp_of_unit_vectors_stays_on_the_sphere(t, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(64) for _ in range(2))
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    out = jaxmerge.slerp({"w": jnp.asarray(a, jnp.float32)}, {"w": jnp.asarray(b, jnp.float32)}, t)["w"]
    assert np.linalg.norm(np.asarray(out, np.float64)) == pytest.approx(1.0, abs=1e-5)


def test_slerp_layer_gradient():
    a = {f"layers.{i}.w": jnp.asarray([1.0, 0.0]) for i in range(3)}
    b = {f"layers.{i}.w": jnp.asarray([0.0, 1.0]) for i in range(3)}
    out = jaxmerge.slerp(a, b, [0.0, 1.0])
    angle = {k: np.degrees(np.arctan2(v[1], v[0])) for k, v in out.items()}
    assert angle["layers.0.w"] == pytest.approx(0.0, abs=1e-4)
    assert angle["layers.1.w"] == pytest.approx(45.0, abs=1e-4)
    assert angle["layers.2.w"] == pytest.approx(90.0, abs=1e-4)


def test_slerp_dot_threshold_is_checked():
    with pytest.raises(ValueError, match="dot_threshold must be in"):
        jaxmerge.slerp(random_tree(0), random_tree(1), 0.5, dot_threshold=1.5)


def test_slerp_thresholds_may_be_traced():
    a, b = random_tree(0), random_tree(1)
    out = jax.jit(lambda eps, dot: jaxmerge.slerp(a, b, 0.3, epsilon=eps, dot_threshold=dot))(1e-8, 0.9995)
    assert_trees_match(out, jaxmerge.slerp(a, b, 0.3))


def numpy_nuslerp(t, v0, v1, row_wise, flatten):
    """mergekit 0.1.5's nuslerp, in float64 NumPy."""
    shape = v0.shape
    if flatten or v0.ndim == 0:  # a 0-d leaf is a vector of one entry
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

    cos = np.clip(np.sum(unit(v0) * unit(v1), -1, keepdims=True), -1, 1)
    colinear = (1 - cos ** 2) <= 1e-16
    theta = np.arccos(np.where(colinear, 0, cos))
    with np.errstate(invalid="ignore", divide="ignore"):
        result = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
    result = np.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten and result.ndim == len(shape):
        result = np.swapaxes(result, 0, -1)
    return result.reshape(shape)


@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_numpy(row_wise, flatten, with_base):
    base, a, b = random_tree(0), random_tree(1), random_tree(2)
    weights = [0.3, 0.9]

    def leaf(xs):  # xs[0]: the base, or a (whose dtypes the output has) standing in for none
        origin = xs[0] if with_base else 0.0
        return origin + numpy_nuslerp(0.9 / 1.2, xs[1] - origin, xs[2] - origin, row_wise, flatten)

    out = jaxmerge.nuslerp(base if with_base else None, [a, b], weights, nuslerp_row_wise=row_wise,
                           nuslerp_flatten=flatten)
    assert_trees_match(out, tree_reference(leaf, base if with_base else a, a, b), f32_tol=1e-5)


def test_nuslerp_weights_summing_to_zero_give_the_midpoint_and_need_two_models():
    a, b = random_tree(1), random_tree(2)
    assert_trees_match(jaxmerge.nuslerp(None, [a, b], [1.0, -1.0]), jaxmerge.nuslerp(None, [a, b], [1.0, 1.0]))
    with pytest.raises(ValueError, match="nuslerp merges exactly 2 models, got 3"):
        jaxmerge.nuslerp(None, [a, b, a])


def numpy_multislerp(xs, weights, base=None, eps=1e-8):
    """mergekit 0.1.5's multislerp (weights normalised), in float64 NumPy."""
    flat = np.stack([x.reshape(-1) - (0 if base is None else base.reshape(-1)) for x in xs])
    w = np.asarray(weights) / np.sum(weights)
    norms = np.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangent = ((units - (units * mean).sum(-1, keepdims=True) * mean) * w[:, None]).sum(0)
    size = np.linalg.norm(tangent) + eps
    result = (mean * np.cos(size) + tangent * np.sin(size) / size) * (norms[:, 0] * w).sum()
    return result.reshape(xs[0].shape) + (0 if base is None else base)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_numpy(with_base):
    base, models = random_tree(0), [random_tree(i) for i in (1, 2, 3)]
    weights = [1.0, 0.5, 2.0]
    out = jaxmerge.multislerp(base if with_base else None, models, weights)
    expected = tree_reference(lambda xs: numpy_multislerp(xs[1:], weights, xs[0] if with_base else None),
                              base if with_base else models[0], *models)
    assert_trees_match(out, expected, f32_tol=1e-5)


def test_multislerp_of_one_model_is_the_model_and_cancelling_directions_are_refused():
    a = random_tree(1)
    assert_trees_match(jaxmerge.multislerp(None, [a]), a)
    minus = jax.tree.map(lambda x: -x if jnp.issubdtype(x.dtype, jnp.floating) else x, a)
    with pytest.raises(ValueError, match="multislerp: the weighted mean direction at '.*' is zero"):
        jaxmerge.multislerp(None, [a, minus, a], [1.0, 2.0, 1.0])
    linear = jaxmerge.multislerp(None, [a, minus], [1.0, 1.0])  # two cancelling: the linear blend, zeros
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(linear) if x.dtype != jnp.int32)
