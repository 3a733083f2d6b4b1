import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmerge
from tests.helpers import assert_trees_match, random_tree, tree_reference

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


@JIT
@pytest.mark.parametrize("normalize", [True, False])
def test_average_matches_numpy(jit, normalize):
    models = [random_tree(i) for i in range(3)]
    weights = [0.2, 0.5, -0.1]
    out = _maybe_jit(lambda ms: jaxmerge.average(ms, weights, normalize=normalize), jit)(models)
    total = sum(weights) if normalize else 1.0
    expected = tree_reference(lambda xs: sum(w * x for w, x in zip(weights, xs)) / total, *models)
    assert_trees_match(out, expected)


@JIT
def test_average_default_is_the_uniform_mean(jit):
    models = [random_tree(i) for i in range(4)]
    out = _maybe_jit(jaxmerge.average, jit)(models)
    assert_trees_match(out, tree_reference(lambda xs: np.mean(xs, axis=0), *models))


def test_average_with_per_leaf_weights():
    models = [random_tree(i) for i in range(2)]
    weights = [{"params": 1.0, "extra": 0.0}, lambda path, leaf: 3.0 if "Dense_1" in path else 1.0]
    out = jaxmerge.average(models, weights)

    def expected_weights(path):
        w0 = 0.0 if path.startswith("extra") else 1.0
        return w0, 3.0 if "Dense_1" in path else 1.0

    leaves = []
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(models[0]), jax.tree.leaves(models[1])):
        p = jax.tree_util.keystr(path, simple=True, separator="/")
        if a.dtype == jnp.int32:
            leaves.append(a)
            continue
        w0, w1 = expected_weights(p)
        ref = (w0 * np.asarray(a, np.float64) + w1 * np.asarray(b, np.float64)) / (w0 + w1)
        leaves.append(jnp.asarray(ref, a.dtype))
    assert_trees_match(out, jax.tree.unflatten(jax.tree.structure(models[0]), leaves))


def test_average_with_traced_weights():
    models = [random_tree(i) for i in range(3)]

    @jax.jit
    def f(w):
        return jaxmerge.average(models, w)

    w = np.asarray([0.1, 0.3, 0.6], np.float32)
    assert_trees_match(f(jnp.asarray(w)), jaxmerge.average(models, list(w)))


def test_average_errors():
    models = [random_tree(i) for i in range(3)]
    with pytest.raises(ValueError, match="weights has 2 entries but there are 3 models"):
        jaxmerge.average(models, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights sum to 0 at '.*', so they cannot be normalized"):
        jaxmerge.average(models, [1.0, -1.0, 0.0])
    jaxmerge.average(models, [1.0, -1.0, 0.0], normalize=False)  # fine without normalisation
    with pytest.raises(ValueError, match=r"^weights of models\[1\] must be a finite number, got nan"):
        jaxmerge.average(models, [1.0, float("nan"), 1.0])


@JIT
def test_lerp_matches_numpy_and_hits_the_ends_exactly(jit):
    a, b = random_tree(0), random_tree(1)
    lerp = _maybe_jit(jaxmerge.lerp, jit)
    assert_trees_match(lerp(a, b, 0.3), tree_reference(lambda xs: 0.7 * xs[0] + 0.3 * xs[1], a, b))
    assert_trees_match(lerp(a, b, 0.0), a, f32_tol=0)
    assert_trees_match(lerp(a, b, 1.0), jax.tree.map(lambda x, y: x if x.dtype == jnp.int32 else y, a, b),
                       f32_tol=0)
    assert_trees_match(lerp(a, b, 1.5), tree_reference(lambda xs: -0.5 * xs[0] + 1.5 * xs[1], a, b))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_t_must_be_finite(bad):
    with pytest.raises(ValueError, match="^t must be a finite number"):
        jaxmerge.lerp(random_tree(0), random_tree(1), bad)
    with pytest.raises(ValueError, match="^t must be a finite number"):
        jaxmerge.slerp(random_tree(0), random_tree(1), bad)


@JIT
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_numpy(jit, normalize):
    base = random_tree(10)
    models = [random_tree(i) for i in range(3)]
    weights, lam = [1.0, 0.5, -0.3], 0.8
    out = _maybe_jit(lambda b, ms: jaxmerge.task_arithmetic(b, ms, weights, lambda_=lam, normalize=normalize),
                     jit)(base, models)
    total = sum(weights) if normalize else 1.0
    expected = tree_reference(
        lambda xs: xs[0] + lam * sum(w * (x - xs[0]) for w, x in zip(weights, xs[1:])) / total, base, *models)
    assert_trees_match(out, expected)


def test_task_arithmetic_needs_a_base():
    with pytest.raises(ValueError, match="task_arithmetic needs a base model"):
        jaxmerge.task_arithmetic(None, [random_tree(0)])


def test_task_arithmetic_of_the_base_itself_is_the_base():
    base = random_tree(0)
    assert_trees_match(jaxmerge.task_arithmetic(base, [base, base], [0.3, 0.9], lambda_=2.0), base, f32_tol=0)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0.05, 10.0), min_size=1, max_size=5), st.integers(0, 2 ** 16))
def test_average_of_identical_models_is_the_model(weights, seed):
    model = random_tree(seed)
    out = jaxmerge.average([model] * len(weights), weights)
    assert_trees_match(out, model, f32_tol=2e-6)


@settings(max_examples=15, deadline=None)
@given(st.permutations(range(4)), st.integers(0, 2 ** 16))
def test_weights_permute_with_models(perm, seed):
    models = [random_tree(seed + i) for i in range(4)]
    weights = [0.1, 0.2, 0.3, 0.4]
    out = jaxmerge.average([models[p] for p in perm], [weights[p] for p in perm])
    expected = jaxmerge.average(models, weights)
    expected["step"] = models[perm[0]]["step"]  # non-float leaves come from the first model
    assert_trees_match(out, expected, f32_tol=2e-6)
