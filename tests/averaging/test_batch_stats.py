import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxmerge


def _batches(n=3, size=16, features=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.standard_normal((size, features)) * (i + 1) + i, jnp.float32),) for i in range(n)]


def _expected(inputs_per_batch):
    """update_bn's answer: the mean over batches of each batch's mean and (biased) variance."""
    means = [np.mean(np.asarray(x, np.float64), 0) for x in inputs_per_batch]
    variances = [np.var(np.asarray(x, np.float64), 0) for x in inputs_per_batch]
    return np.mean(means, 0), np.mean(variances, 0)


def test_nnx_batch_norm_statistics_are_recomputed():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 4, rngs=rngs)
            self.norm = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.dense(x))

    model = Net(nnx.Rngs(0))
    batches = _batches()
    returned = jaxmerge.update_batch_stats(model, batches)
    assert returned is model and model.norm.use_running_average  # left in eval mode
    mean, var = _expected([model.dense(x) for (x,) in batches])
    np.testing.assert_allclose(model.norm.mean[...], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.norm.var[...], var, rtol=1e-5, atol=1e-6)
    assert model.norm.momentum == 0.9  # restored


def test_linen_batch_norm_statistics_are_recomputed():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.BatchNorm(use_running_average=not train, momentum=0.8)(nn.Dense(4)(x))

    module = Net()
    batches = _batches(seed=1)
    variables = module.init(jax.random.key(0), batches[0][0], train=False)
    updated = jaxmerge.update_batch_stats(
        lambda v, b: module.apply(v, b[0], train=True, mutable=["batch_stats"]), batches, variables=variables)
    kernel, bias = variables["params"]["Dense_0"]["kernel"], variables["params"]["Dense_0"]["bias"]
    mean, var = _expected([x @ kernel + bias[None] for (x,) in batches])
    stats = updated["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-4, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="the model has no nnx.BatchNorm layer"):
        jaxmerge.update_batch_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), _batches())
    with pytest.raises(ValueError, match="variables are required"):
        jaxmerge.update_batch_stats(lambda v, b: None, _batches())
