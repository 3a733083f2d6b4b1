"""DAM against NumPy written from the authors' formulas: the merge along each tensor's feature
axis, the regularisers, the distillation loss; and training lowers the loss."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmerge.coefficients import dam, dam_coefficients, dam_merge, dam_regularizer, distillation_kl
from jaxmerge.errors import JaxmergeError

RNG = np.random.default_rng(3)
MODELS = [{"kernel": jnp.asarray(RNG.standard_normal((4, 3)), jnp.float32), "norm": jnp.asarray(RNG.standard_normal(3)),
           "count": jnp.asarray(2, jnp.int32)} for _ in range(3)]


@pytest.mark.parametrize("feature_axis", [-2, -1])
def test_merge_scales_each_input_feature_of_each_model(feature_axis):
    mergers = [{"kernel": jnp.asarray(RNG.standard_normal(4 if feature_axis == -2 else 3), jnp.float32),
                "norm": jnp.asarray(RNG.standard_normal(3), jnp.float32), "count": None} for _ in MODELS]
    merged = dam_merge(MODELS, mergers, feature_axis=feature_axis)
    column = (lambda m: np.tanh(np.asarray(m))[:, None]) if feature_axis == -2 else (lambda m: np.tanh(np.asarray(m)))
    expected = sum(column(c["kernel"]) * np.asarray(m["kernel"]) for c, m in zip(mergers, MODELS))
    np.testing.assert_allclose(merged["kernel"], expected, rtol=1e-5)
    np.testing.assert_allclose(merged["norm"], sum(np.tanh(np.asarray(c["norm"])) * np.asarray(m["norm"])
                                                    for c, m in zip(mergers, MODELS)), rtol=1e-5)
    assert int(merged["count"]) == 2


def test_regularizer_is_the_authors_sum_of_penalties():
    coefficients = [{"a": jnp.asarray(RNG.standard_normal(5), jnp.float32), "b": jnp.asarray(RNG.standard_normal(2),
                                                                                               jnp.float32)}
                    for _ in range(3)]
    expected = 0.0
    for name in ("a", "b"):
        vectors = [np.asarray(c[name], np.float64) for c in coefficients]
        pairs = list(itertools.combinations(vectors, 2))
        expected += 0.3 * np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in pairs])
        expected += 0.2 * np.mean([np.minimum(abs(a), abs(b)).sum() for a, b in pairs])
        expected += sum(0.05 * abs(v).sum() + 0.07 * np.linalg.norm(v) for v in vectors)
    got = dam_regularizer(coefficients, similarity=0.3, overlap=0.2, l1=0.05, l2=0.07)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_distillation_kl_matches_numpy():
    student, teacher = RNG.standard_normal((6, 4)), RNG.standard_normal((6, 4))
    p = np.exp(teacher / 2) / np.exp(teacher / 2).sum(1, keepdims=True)
    q = np.exp(student / 2) / np.exp(student / 2).sum(1, keepdims=True)
    expected = 4 * np.mean((p * np.log(p / q)).sum(1))
    np.testing.assert_allclose(distillation_kl(jnp.asarray(student), jnp.asarray(teacher)), expected, rtol=1e-5)


def test_dam_training_lowers_the_loss_and_returns_the_merge_of_its_coefficients():
    data = [[jnp.asarray(RNG.standard_normal((8, 4)), jnp.float32)] * 30 for _ in MODELS]
    apply = lambda p, x: jnp.tanh(x @ p["kernel"]) * p["norm"][None]
    result = dam(apply, MODELS, data, optimizer=optax.sgd(0.1))
    assert float(result.losses[-1]) < float(result.losses[0])
    start = dam_coefficients(MODELS)
    assert jax.tree.structure(start[0]) == jax.tree.structure(result.coefficients[0])
    jax.tree.map(np.testing.assert_array_equal, result.params, dam_merge(MODELS, result.coefficients))
    with pytest.raises(JaxmergeError, match="one dataset"):
        dam(apply, MODELS, data[:2])
