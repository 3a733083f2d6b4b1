import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxmerge
from jaxmerge import _tree
from jaxmerge.merging import linear
from tests.helpers import random_tree


def _with(tree, path, value):
    tree = jax.tree.map(lambda x: x, tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


def test_mismatch_names_model_index_and_path_before_any_work(monkeypatch):
    models = [random_tree(i) for i in range(3)]
    models[2] = _with(models[2], ["params", "Dense_1", "kernel"], jnp.zeros((4, 5), jnp.bfloat16))
    calls = []
    monkeypatch.setattr(linear, "average_kernel", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match=r"^models\[2\] 'params/Dense_1/kernel': shape \(4, 5\) != \(4, 3\)"):
        jaxmerge.average(models)
    assert calls == []


def test_missing_and_extra_leaves_are_named():
    a = random_tree(0)
    b = random_tree(1)
    del b["params"]["Dense_0"]["bias"]
    with pytest.raises(ValueError, match=r"models\[1\] has no leaf 'params/Dense_0/bias'"):
        jaxmerge.average([a, b])
    c = _with(random_tree(2), ["params", "new"], jnp.zeros(3))
    with pytest.raises(ValueError, match=r"models\[1\] has a leaf 'params/new' that models\[0\] does not have"):
        jaxmerge.average([a, c])
    with pytest.raises(ValueError, match=r"models\[0\] has no leaf .* \(present in base\)"):
        jaxmerge.task_arithmetic(a, [b])


def test_dtype_kind_mismatch_but_float_widths_may_differ():
    a = random_tree(0)
    b = _with(random_tree(1), ["params", "Dense_0", "bias"], jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"models\[1\] 'params/Dense_0/bias': dtype int32 is not of the same kind"):
        jaxmerge.average([a, b])
    c = jax.tree.map(lambda x: x.astype(jnp.float16) if x.dtype == jnp.float32 else x, random_tree(1))
    out = jaxmerge.average([a, c])
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, a)


def test_models_must_be_a_nonempty_sequence():
    with pytest.raises(ValueError, match="models is empty"):
        jaxmerge.average([])
    with pytest.raises(TypeError, match="models must be a list or tuple of pytrees, got dict"):
        jaxmerge.average(random_tree(0))


def test_non_float_leaves_pass_through_from_the_first_model():
    a, b = random_tree(3), random_tree(7)
    out = jaxmerge.average([a, b])
    assert out["step"] is a["step"]
    out = jaxmerge.task_arithmetic(b, [a])
    assert out["step"] is b["step"]


def test_fp32_accumulation_of_bf16_leaves():
    rng = np.random.default_rng(0)
    models = [{"w": jnp.asarray(rng.standard_normal(1000), jnp.bfloat16)} for _ in range(8)]
    weights = rng.uniform(0.1, 1.0, 8)
    out = jaxmerge.average(models, list(weights))["w"]
    assert out.dtype == jnp.bfloat16
    stacked = np.stack([np.asarray(m["w"], np.float64) for m in models])
    expected = (weights[:, None] * stacked).sum(0) / weights.sum()
    expected_bf16 = np.asarray(jnp.asarray(expected, jnp.float32).astype(jnp.bfloat16), np.float64)
    mismatched = np.asarray(out, np.float64) != expected_bf16
    assert mismatched.mean() < 0.01  # f32 vs f64 accumulation may flip a rare rounding tie
    # The same average accumulated in bf16 is visibly worse: the test can tell them apart.
    naive = sum(jnp.bfloat16(w) * m["w"] for w, m in zip(weights, models)) / jnp.bfloat16(weights.sum())
    assert (np.asarray(naive, np.float64) != expected_bf16).mean() > 0.1


def test_flax_nnx_state_and_linen_variables():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 2, rngs=rngs)

    states = [nnx.state(MLP(nnx.Rngs(i)), nnx.Param) for i in range(2)]
    out = jaxmerge.average(states)
    assert isinstance(out, nnx.State)
    np.testing.assert_allclose(out["l1"]["kernel"][...],
                               (states[0]["l1"]["kernel"][...] + states[1]["l1"]["kernel"][...]) / 2,
                               rtol=1e-6)

    dense = nn.Dense(3)
    variables = [dense.init(jax.random.key(i), jnp.ones((1, 4))) for i in range(2)]
    out = jaxmerge.average(variables, [0.25, 0.75])
    np.testing.assert_allclose(out["params"]["kernel"],
                               0.25 * variables[0]["params"]["kernel"] + 0.75 * variables[1]["params"]["kernel"],
                               rtol=1e-6)


def test_tuple_and_list_trees():
    a = (jnp.ones(2), [jnp.zeros(3)])
    b = (jnp.zeros(2), [jnp.ones(3)])
    out = jaxmerge.average([a, b])
    assert isinstance(out, tuple) and isinstance(out[1], list)
    np.testing.assert_array_equal(out[0], np.full(2, 0.5, np.float32))


def test_weighted_sum_is_accumulated_in_the_given_dtype():
    leaves = [jnp.full((2,), 1, jnp.bfloat16), jnp.full((2,), 2 ** -9, jnp.bfloat16)]
    out = _tree.weighted_sum(leaves, np.asarray([1, 1], np.float32), jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, np.full(2, 1 + 2 ** -9, np.float32))
