import jax
import numpy as np
import pytest

import jaxmerge
from tests.helpers import assert_trees_match, tree_reference
from tests.merging import reference
from tests.merging.test_task_vectors import _models


def numpy_sce(base, models, select_topk):
    deltas = np.stack([m - base for m in models])
    if select_topk < 1:
        variance = deltas.var(axis=0)
        k = int(select_topk * np.count_nonzero(variance))
        deltas = deltas * reference.top_k(variance, k)[None]
    energy = np.array([np.mean(d ** 2) for d in deltas])
    weights = np.full(len(deltas), 1 / len(deltas)) if abs(energy.sum()) < 1e-6 else energy / energy.sum()
    elected = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
    kept = (np.sign(deltas) == elected) * weights[(slice(None),) + (None,) * base.ndim]
    divisor = kept.sum(0)
    return base + (deltas * kept).sum(0) / np.maximum(divisor, 1e-6)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce_matches_numpy(select_topk):
    base, models = _models(3, seed=40)
    out = jax.jit(lambda b, ms: jaxmerge.sce(b, ms, select_topk=select_topk))(base, models)
    assert_trees_match(out, tree_reference(lambda xs: numpy_sce(xs[0], xs[1:], select_topk), base, *models))


def test_sce_errors():
    base, models = _models(2)
    with pytest.raises(ValueError, match=r"select_topk must be in \(0, 1\]"):
        jaxmerge.sce(base, models, select_topk=0.0)
    with pytest.raises(ValueError, match="sce needs a base model"):
        jaxmerge.sce(None, models)
