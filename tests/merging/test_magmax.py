import jax
import numpy as np

import jaxmerge
from tests.helpers import assert_trees_match, tree_reference
from tests.merging.test_task_vectors import _models


def numpy_magmax(base, models, lam):
    deltas = np.stack([m - base for m in models])
    chosen = np.take_along_axis(deltas, np.argmax(np.abs(deltas), axis=0)[None], axis=0)[0]
    return base + lam * chosen


def test_magmax_matches_numpy():
    base, models = _models(3, seed=30)
    out = jax.jit(lambda b, ms: jaxmerge.magmax(b, ms, lambda_=0.8))(base, models)
    assert_trees_match(out, tree_reference(lambda xs: numpy_magmax(xs[0], xs[1:], 0.8), base, *models))


def test_magmax_of_one_model_is_task_arithmetic():
    base, models = _models(1, seed=31)
    assert_trees_match(jaxmerge.magmax(base, models, lambda_=0.5),
                       jaxmerge.task_arithmetic(base, models, lambda_=0.5), f32_tol=1e-6)


def test_magmax_picks_the_largest_magnitude_with_its_sign():
    base = {"w": np.zeros(4, np.float32)}
    models = [{"w": np.asarray([1.0, -3.0, 2.0, 2.0], np.float32)},
              {"w": np.asarray([-2.0, 1.0, 2.0, -2.0], np.float32)}]
    # equal magnitudes keep the first model's entry
    np.testing.assert_array_equal(jaxmerge.magmax(base, models)["w"], [-2.0, -3.0, 2.0, 2.0])
