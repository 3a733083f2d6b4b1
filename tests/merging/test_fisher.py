import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from tests.helpers import assert_trees_match, random_tree, tree_reference


def _fishers(n, seed=50):
    """Non-negative random Fishers shaped like random_tree (float32 everywhere float)."""
    return [jax.tree.map(lambda x: jnp.abs(x).astype(jnp.float32) if x.dtype != jnp.int32 else x,
                         random_tree(seed + i)) for i in range(n)]


def numpy_fisher_merge(xs, fs, weights, eps, favor_target=False, scales=None):
    scales = scales if scales is not None else [1.0] * len(xs)
    masses = [np.maximum(f, eps) if (i == 0 or not favor_target) else f for i, f in enumerate(fs)]
    w = [wi * si for wi, si in zip(weights, scales)]
    return sum(wi * m * x for wi, m, x in zip(w, masses, xs)) / sum(wi * m for wi, m in zip(w, masses))


@pytest.mark.parametrize("favor_target", [False, True])
def test_fisher_merge_matches_numpy(favor_target):
    models = [random_tree(i) for i in range(3)]
    fishers = _fishers(3)
    weights = [0.5, 1.0, 2.0]
    out = jax.jit(lambda ms, fs: jaxmerge.fisher_merge(ms, fs, weights, favor_target=favor_target))(models, fishers)
    expected = tree_reference(lambda xs: numpy_fisher_merge(xs[:3], xs[3:], weights, 1e-8, favor_target),
                              *models, *fishers)
    assert_trees_match(out, expected)


@pytest.mark.parametrize("how", [True, "l2"])
def test_normalize_fishers(how):
    models = [random_tree(i) for i in range(2)]
    fishers = _fishers(2)
    fishers[1] = jax.tree.map(lambda f: f * 1000 if f.dtype == jnp.float32 else f, fishers[1])
    floats = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t) if x.dtype == np.float32]  # noqa: E731
    if how is True:
        scales = [1 / sum(f.sum() for f in floats(t)) for t in fishers]
    else:
        scales = [1 / np.sqrt(sum((f ** 2).sum() for f in floats(t))) for t in fishers]
    out = jaxmerge.fisher_merge(models, fishers, normalize_fishers=how)
    expected = tree_reference(lambda xs: numpy_fisher_merge(xs[:2], xs[2:], [1, 1], 1e-8, scales=scales),
                              *models, *fishers)
    assert_trees_match(out, expected, f32_tol=2e-5)


def test_equal_fishers_give_the_average():
    models = [random_tree(i) for i in range(3)]
    same = _fishers(1) * 3
    assert_trees_match(jaxmerge.fisher_merge(models, same, [1.0, 2.0, 3.0]),
                       jaxmerge.average(models, [1.0, 2.0, 3.0]), f32_tol=2e-6)


def test_zero_fisher_everywhere_falls_back_to_the_weighted_average():
    models = [random_tree(i) for i in range(2)]
    zeros = [jax.tree.map(jnp.zeros_like, f) for f in _fishers(2)]
    assert_trees_match(jaxmerge.fisher_merge(models, zeros, [1.0, 3.0]), jaxmerge.average(models, [1.0, 3.0]),
                       f32_tol=2e-6)


def test_favor_target_keeps_the_target_where_donors_have_no_fisher():
    models = [random_tree(i) for i in range(3)]
    fishers = _fishers(3)
    fishers[1] = jax.tree.map(jnp.zeros_like, fishers[1])
    fishers[2] = jax.tree.map(jnp.zeros_like, fishers[2])
    out = jaxmerge.fisher_merge(models, fishers, favor_target=True)
    assert_trees_match(out, models[0], f32_tol=1e-6)


def test_errors_name_the_argument_and_path():
    models = [random_tree(i) for i in range(2)]
    fishers = _fishers(2)
    bad = dict(fishers[1], params=dict(fishers[1]["params"], Dense_0={"kernel": fishers[1]["params"]["Dense_0"]["kernel"]}))
    with pytest.raises(ValueError, match=r"fishers\[1\] has no Fisher for 'params/Dense_0/bias'"):
        jaxmerge.fisher_merge(models, [fishers[0], bad])
    negative = jax.tree.map(lambda f: -f if f.dtype == jnp.float32 else f, fishers[0])
    with pytest.raises(ValueError, match=r"fishers\[0\] has negative values at 'extra/0'"):
        jaxmerge.fisher_merge(models, [negative, fishers[1]])
    poisoned = jax.tree.map(lambda f: jnp.full_like(f, jnp.nan) if f.dtype == jnp.float32 else f, fishers[1])
    with pytest.raises(ValueError, match=r"fishers\[1\] has NaN or infinite values at 'extra/0'"):
        jaxmerge.fisher_merge(models, [fishers[0], poisoned])
    with pytest.raises(ValueError, match=r"fishers must be a list with one statistics tree per model \(2\), got 1"):
        jaxmerge.fisher_merge(models, fishers[:1])
    with pytest.raises(ValueError, match=r"weights of models\[1\] must be in \[0, inf\), got -1.0"):
        jaxmerge.fisher_merge(models, fishers, [1.0, -1.0])
    with pytest.raises(ValueError, match="normalize_fishers must be one of"):
        jaxmerge.fisher_merge(models, fishers, normalize_fishers="max")


def test_traced_epsilon_and_target_weight():
    models, fishers = [random_tree(i) for i in range(2)], _fishers(2)
    out = jax.jit(lambda eps: jaxmerge.fisher_merge(models, fishers, epsilon=eps))(1e-8)
    assert_trees_match(out, jaxmerge.fisher_merge(models, fishers), f32_tol=1e-6)
    with pytest.raises(ValueError, match="favor_target needs a positive weight for models"):
        jaxmerge.fisher_merge(models, fishers, [0.0, 1.0], favor_target=True)
