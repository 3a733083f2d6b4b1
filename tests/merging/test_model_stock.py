import jax
import numpy as np
import pytest

import jaxmerge
from tests.helpers import assert_trees_match, tree_reference
from tests.merging.test_task_vectors import _models


def numpy_model_stock(base, models, filter_wise=False):
    """Model Stock from arXiv 2403.19522 with mergekit's mean pairwise cosine, in float64."""
    rows = base.reshape(1, -1) if base.ndim < 2 else base
    offsets = [m.reshape(rows.shape) - rows for m in models]
    axis = -1 if filter_wise else None
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = np.sum(offsets[i] * offsets[j], axis=axis, keepdims=filter_wise)
            norm = np.linalg.norm(offsets[i], axis=axis, keepdims=filter_wise) * np.linalg.norm(
                offsets[j], axis=axis, keepdims=filter_wise)
            cosines.append(np.clip(dot / np.maximum(norm, 1e-6), -1, 1))
    cos = np.mean(cosines, axis=0)
    n = len(models)
    denominator = 1 + (n - 1) * cos
    t = np.where(denominator == 0, 0.0, n * cos / np.where(denominator == 0, 1.0, denominator))
    return (t * np.mean([m.reshape(rows.shape) for m in models], axis=0) + (1 - t) * rows).reshape(base.shape)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_numpy(n, filter_wise):
    base, models = _models(n, seed=20)
    out = jax.jit(lambda b, ms: jaxmerge.model_stock(b, ms, filter_wise=filter_wise))(base, models)
    expected = tree_reference(lambda xs: numpy_model_stock(xs[0], xs[1:], filter_wise), base, *models)
    assert_trees_match(out, expected, f32_tol=5e-5)


def test_model_stock_ratio_for_orthogonal_and_identical_task_vectors():
    base = {"w": np.zeros(2, np.float32)}
    # orthogonal task vectors: cos = 0, t = 0, the base is returned
    ortho = [{"w": np.asarray([1.0, 0.0], np.float32)}, {"w": np.asarray([0.0, 1.0], np.float32)}]
    np.testing.assert_allclose(jaxmerge.model_stock(base, ortho)["w"], [0.0, 0.0], atol=1e-7)
    # identical task vectors: cos = 1, t = 1, the average (= each model) is returned
    same = [{"w": np.asarray([1.0, 2.0], np.float32)}] * 3
    np.testing.assert_allclose(jaxmerge.model_stock(base, same)["w"], [1.0, 2.0], rtol=1e-6)


def test_opposite_task_vectors_return_the_base_not_nan():
    base = {"w": np.ones(3, np.float32)}
    models = [{"w": np.asarray([2.0, 2.0, 2.0], np.float32)}, {"w": np.asarray([0.0, 0.0, 0.0], np.float32)}]
    np.testing.assert_array_equal(jaxmerge.model_stock(base, models)["w"], base["w"])


def test_model_stock_needs_a_base_and_two_models():
    base, models = _models(2)
    with pytest.raises(ValueError, match="model_stock merges at least 2 models, got 1"):
        jaxmerge.model_stock(base, models[:1])
    with pytest.raises(ValueError, match="model_stock needs a base model"):
        jaxmerge.model_stock(None, models)
