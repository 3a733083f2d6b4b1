"""KnOTS against NumPy written from the paper, and reversible merging's recovery."""

import jax
import numpy as np
import pytest

from jaxmerge import lora
from jaxmerge.errors import JaxmergeError
from tests.lora.helpers import SHAPES, random_adapter
from tests.lora.test_combine import _reference


@pytest.fixture(scope="module")
def adapters():
    return [random_adapter(0, alpha=8), random_adapter(1, r=2, alpha=2, use_rslora=True), random_adapter(2, alpha=4)]


def test_knots_linear_is_exactly_task_arithmetic(adapters):
    merged = lora.knots(adapters, [0.5, 1.0, -0.3], merge="linear", lambda_=0.8)
    for module in SHAPES:
        expected = 0.8 * sum(w * np.asarray(a.delta(module)) for a, w in zip(adapters, [0.5, 1.0, -0.3]))
        np.testing.assert_allclose(np.asarray(merged.delta(module)), expected, atol=1e-4)
        assert merged.layers[module].a.shape[0] == min(SHAPES[module][0], 10)


@pytest.mark.parametrize("density", [1.0, 0.4])
def test_knots_ties_merges_the_blocks_in_the_shared_basis(adapters, density):
    merged = lora.knots(adapters, merge="ties", density=density, lambda_=0.6)
    for module in SHAPES:
        deltas = [np.asarray(a.delta(module)) for a in adapters]
        u, s, vh = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)
        k = merged.layers[module].a.shape[0]
        blocks = np.split(s[:k, None] * vh[:k], 3, axis=1)
        expected = 0.6 * u[:, :k] @ _reference(blocks, [1.0] * 3, "ties", density)
        np.testing.assert_allclose(np.asarray(merged.delta(module)), expected, atol=2e-4)


def test_knots_refuses_bad_arguments(adapters):
    with pytest.raises(JaxmergeError, match="merge must be one of"):
        lora.knots(adapters, merge="mean")
    with pytest.raises(JaxmergeError, match="pass key="):
        lora.knots(adapters, merge="dare_ties", density=0.5)
    with pytest.raises(JaxmergeError, match="2 weights for 3 adapters"):
        lora.knots(adapters, [1.0, 1.0])
    assert lora.knots(adapters, merge="dare_ties", density=0.5, key=jax.random.key(0)).config["r"] == 10


@pytest.mark.parametrize("basis_size", [1, 2, 3])
def test_reversible_merge_recovers_each_adapter(basis_size):
    adapters = [random_adapter(i, alpha=2 + i) for i in range(4)]
    kept = lora.reversible_merge(adapters, basis_size=basis_size)
    for module in SHAPES:
        mean_a = np.mean([np.asarray(a.layers[module].a) * np.sqrt(a.scaling(module)) for a in adapters], axis=0)
        np.testing.assert_allclose(np.asarray(kept.merged.layers[module].a), mean_a, rtol=1e-5, atol=1e-6)
    errors = []
    for i, adapter in enumerate(adapters):
        recovered = lora.recover(kept, i)
        assert recovered.scaling("model.layers.0.self_attn.q_proj") == 1.0
        for module in SHAPES:
            for side in ("a", "b"):
                x = np.asarray(getattr(adapter.layers[module], side)) * np.sqrt(adapter.scaling(module))
                errors.append(np.linalg.norm(np.asarray(getattr(recovered.layers[module], side)) - x))
    if basis_size == 3:  # n - 1: exact
        assert max(errors) < 1e-4
    else:  # the rank-p fit of the centred vectors: smaller p, larger error, never above the centred norm
        assert max(errors) > 1e-3


def test_reversible_merge_errors_shrink_with_the_basis():
    adapters = [random_adapter(i) for i in range(4)]

    def error(p):
        kept = lora.reversible_merge(adapters, basis_size=p)
        return sum(float(np.linalg.norm(np.asarray(lora.recover(kept, i).delta(m)) - np.asarray(a.delta(m))))
                   for i, a in enumerate(adapters) for m in SHAPES)

    assert error(1) > error(2) > error(3)
    with pytest.raises(JaxmergeError, match="differ in module"):
        lora.reversible_merge([adapters[0], random_adapter(5, modules={"model.q_proj": (3, 2)})])
    with pytest.raises(JaxmergeError, match="basis_size must be at least 1"):
        lora.reversible_merge(adapters, basis_size=0)
