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
