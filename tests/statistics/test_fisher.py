import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxmerge
from jaxmerge.statistics.fisher import log_probabilities


def mlp_params(seed=0, sizes=(6, 8, 3)):
    rng = np.random.default_rng(seed)
    return {f"layer{i}": {"w": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
                          "b": jnp.asarray(0.1 * rng.standard_normal(b), jnp.float32)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def mlp_apply(params, batch):
    x = batch[0]
    def dense(layer, h):
        return h @ layer["w"] + layer["b"].reshape((1,) * (h.ndim - 1) + (-1,))
    return dense(params["layer1"], jnp.tanh(dense(params["layer0"], x)))


def data(n=37, seed=1, classes=3):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((n, 6)), jnp.float32), jnp.asarray(rng.integers(0, classes, n)))


def loop_reference(params, x, y, estimator):
    """Mean over examples, one example at a time with jax.grad, of squared score gradients."""
    def log_prob(p, xi, c):
        return log_probabilities(mlp_apply(p, (xi[None],)))[0, c]

    total = jax.tree.map(lambda p: np.zeros(p.shape), params)
    for xi, yi in zip(x, y):
        if estimator == "empirical":
            terms = [(1.0, jax.grad(log_prob)(params, xi, yi))]
        else:
            probs = np.exp(np.asarray(log_probabilities(mlp_apply(params, (xi[None],)))[0]))
            terms = [(probs[c], jax.grad(log_prob)(params, xi, c)) for c in range(len(probs))]
        for weight, grad in terms:
            total = jax.tree.map(lambda t, g: t + weight * np.asarray(g, np.float64) ** 2, total, grad)
    return jax.tree.map(lambda t: t / len(x), total)


def assert_close(actual, expected, rtol=2e-5):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=1e-7), actual, expected)


@pytest.mark.parametrize("estimator", ["empirical", "exact"])
@pytest.mark.parametrize("microbatch", [1, 5, 64])
def test_matches_a_per_example_loop(estimator, microbatch):
    params = mlp_params()
    x, y = data()
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    fisher = jaxmerge.diagonal_fisher(mlp_apply, batches, params=params, estimator=estimator, microbatch=microbatch)
    assert_close(fisher, loop_reference(params, x, y, estimator))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(fisher))


def test_num_examples_stops_early():
    params = mlp_params()
    x, y = data()
    fisher = jaxmerge.diagonal_fisher(mlp_apply, [(x[:20], y[:20]), (x[20:], y[20:])], params=params,
                                      num_examples=25, microbatch=4)
    assert_close(fisher, loop_reference(params, x[:25], y[:25], "empirical"))


def test_logistic_regression_closed_form():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 4))
    w, b = rng.standard_normal(4), 0.3
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    labels = (rng.random(200) < 0.5).astype(np.int32)

    def apply(p, batch):
        return (batch[0] @ p["w"] + p["b"][None])[:, None]  # one logit: p(y=1) = sigmoid(z)

    p1 = 1 / (1 + np.exp(-(x @ w + b)))
    exact = jaxmerge.diagonal_fisher(apply, [(jnp.asarray(x, jnp.float32), labels)], params=params, estimator="exact")
    np.testing.assert_allclose(exact["w"], np.mean((p1 * (1 - p1))[:, None] * x ** 2, 0), rtol=1e-4)
    np.testing.assert_allclose(exact["b"], np.mean(p1 * (1 - p1)), rtol=1e-4)
    empirical = jaxmerge.diagonal_fisher(apply, [(jnp.asarray(x, jnp.float32), labels)], params=params)
    np.testing.assert_allclose(empirical["w"], np.mean(((labels - p1) ** 2)[:, None] * x ** 2, 0), rtol=1e-4)


def test_sampled_is_deterministic_and_estimates_the_model_fisher():
    params = mlp_params()
    x, y = data(n=8)
    many = [(jnp.tile(x, (250, 1)), jnp.tile(y, 250))]
    key = jax.random.key(5)
    a = jaxmerge.diagonal_fisher(mlp_apply, many, params=params, estimator="sampled", key=key, microbatch=100)
    b = jaxmerge.diagonal_fisher(mlp_apply, many, params=params, estimator="sampled", key=key, microbatch=50)
    assert_close(a, b, rtol=1e-5)  # same key, same draws, whatever the microbatch
    exact = jaxmerge.diagonal_fisher(mlp_apply, [(x, y)], params=params, estimator="exact")
    total_a = sum(float(jnp.sum(v)) for v in jax.tree.leaves(a))
    total_exact = sum(float(jnp.sum(v)) for v in jax.tree.leaves(exact))
    assert total_a == pytest.approx(total_exact, rel=0.1)


def test_per_token_labels():
    params = mlp_params()
    x, y = data(n=12)
    tokens = (x.reshape(4, 3, 6), y.reshape(4, 3))

    def apply(p, batch):
        return mlp_apply(p, (batch[0],))  # (batch, 3 positions, classes)

    fisher = jaxmerge.diagonal_fisher(apply, [tokens], params=params)

    def token_loglik(p, xs, ys):
        return jnp.sum(jnp.take_along_axis(log_probabilities(mlp_apply(p, (xs,))), ys[:, None], -1))

    grads = [jax.grad(token_loglik)(params, xs, ys) for xs, ys in zip(*tokens)]
    expected = jax.tree.map(lambda *g: np.mean([np.asarray(v, np.float64) ** 2 for v in g], 0), *grads)
    assert_close(fisher, expected)
    with pytest.raises(ValueError, match="estimator='exact' needs one label per example"):
        jaxmerge.diagonal_fisher(apply, [tokens], params=params, estimator="exact")


def test_nnx_module_and_linen_apply_fn_agree():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    x, y = data()
    fisher = jaxmerge.diagonal_fisher(model, [{"inputs": x, "labels": y}], microbatch=8)
    assert isinstance(fisher, nnx.State)
    params = {"layer0": {"w": model.l1.kernel[...], "b": model.l1.bias[...]},
              "layer1": {"w": model.l2.kernel[...], "b": model.l2.bias[...]}}
    expected = jaxmerge.diagonal_fisher(mlp_apply, [(x, y)], params=params)
    np.testing.assert_allclose(fisher["l1"]["kernel"][...], expected["layer0"]["w"], rtol=1e-5)

    class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))

    linen = LinenMLP()
    variables = linen.init(jax.random.key(0), x)
    fisher = jaxmerge.diagonal_fisher(lambda p, batch: linen.apply(p, batch[0]), [(x, y)], params=variables)
    assert jax.tree.structure(fisher) == jax.tree.structure(variables)


def test_errors():
    params = mlp_params()
    x, y = data()
    with pytest.raises(ValueError, match="data yielded no examples"):
        jaxmerge.diagonal_fisher(mlp_apply, [], params=params)
    with pytest.raises(ValueError, match="estimator must be one of"):
        jaxmerge.diagonal_fisher(mlp_apply, [(x, y)], params=params, estimator="hessian")
    with pytest.raises(ValueError, match="estimator='sampled' draws labels: pass key="):
        jaxmerge.diagonal_fisher(mlp_apply, [(x, y)], params=params, estimator="sampled")
    with pytest.raises(ValueError, match="params are required with an apply_fn"):
        jaxmerge.diagonal_fisher(mlp_apply, [(x, y)])
    with pytest.raises(ValueError, match="microbatch must be a positive int"):
        jaxmerge.diagonal_fisher(mlp_apply, [(x, y)], params=params, microbatch=0)


def test_fisher_saves_and_loads_with_orbax(tmp_path):
    from orbax.checkpoint import v1 as ocp

    params = mlp_params()
    fisher = jaxmerge.diagonal_fisher(mlp_apply, [data()], params=params)
    ocp.save(tmp_path / "fisher", fisher)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fisher)
    loaded = ocp.load(tmp_path / "fisher", abstract)
    jax.tree.map(np.testing.assert_array_equal, loaded, fisher)


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_data_parallel_batch_gives_the_same_fisher(axis_type):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    params = mlp_params()
    x, y = data(n=64)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = (jax.device_put(x, sharding), jax.device_put(y, sharding))
    fisher = jaxmerge.diagonal_fisher(mlp_apply, [sharded], params=params, microbatch=16)
    assert_close(fisher, loop_reference(params, x, y, "empirical"))
