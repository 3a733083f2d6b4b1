import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmerge


def linear_apply(params, batch):
    return batch[0] @ params["w"] + params["b"][None]


def _linear_models(n=3, d=6, m=4, seed=0):
    rng = np.random.default_rng(seed)
    models = [{"w": jnp.asarray(rng.standard_normal((d, m)), jnp.float32),
               "b": jnp.asarray(rng.standard_normal(m), jnp.float32)} for _ in range(n)]
    data = [jnp.asarray(rng.standard_normal((20 + 5 * i, d)), jnp.float32) for i in range(n)]
    return models, data


def test_regmean_is_the_least_squares_merge():
    models, data = _linear_models()
    grams = [jaxmerge.input_grams(linear_apply, [(x,)], params=p) for p, x in zip(models, data)]
    merged = jaxmerge.regmean(models, grams, alpha=1.0)
    stacked = np.concatenate([np.asarray(x, np.float64) for x in data])
    targets = np.concatenate([np.asarray(x, np.float64) @ np.asarray(p["w"], np.float64)
                              for p, x in zip(models, data)])
    expected, *_ = np.linalg.lstsq(stacked, targets, rcond=None)
    np.testing.assert_allclose(merged["w"], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(merged["b"], np.mean([p["b"] for p in models], 0), rtol=1e-6)  # averaged


def test_alpha_scales_the_off_diagonal():
    models, data = _linear_models(n=2)
    grams = [{"w": {"gram": jnp.asarray(x.T @ x)}} for x in data]
    alpha = 0.3
    tilde = [alpha * np.asarray(g["w"]["gram"], np.float64) + (1 - alpha) * np.diag(np.diag(g["w"]["gram"]))
             for g in grams]
    expected = np.linalg.solve(sum(tilde), sum(t @ np.asarray(p["w"], np.float64) for t, p in zip(tilde, models)))
    np.testing.assert_allclose(jaxmerge.regmean(models, grams, alpha=alpha)["w"], expected, rtol=1e-4, atol=1e-5)


def test_alpha_zero_is_a_per_input_weighted_average():
    models, data = _linear_models(n=2)
    grams = [{"w": {"gram": jnp.asarray(x.T @ x)}} for x in data]
    diagonals = [np.diag(np.asarray(g["w"]["gram"], np.float64)) for g in grams]
    expected = sum(d[:, None] * np.asarray(p["w"]) for d, p in zip(diagonals, models)) / sum(diagonals)[:, None]
    np.testing.assert_allclose(jaxmerge.regmean(models, grams, alpha=0.0)["w"], expected, rtol=1e-5)
    same = [grams[0], grams[0]]
    np.testing.assert_allclose(jaxmerge.regmean(models, same, alpha=0.0)["w"], jaxmerge.average(models)["w"],
                               rtol=1e-5)


def test_one_model_returns_it_and_the_pytorch_layout():
    models, data = _linear_models(n=1)
    grams = [jaxmerge.input_grams(linear_apply, [(data[0],)], params=models[0])]
    np.testing.assert_allclose(jaxmerge.regmean(models, grams)["w"], models[0]["w"], rtol=1e-4, atol=1e-5)
    models, data = _linear_models(n=2)
    grams = [{"w": {"gram": jnp.asarray(x.T @ x)}} for x in data]
    flax_result = jaxmerge.regmean(models, grams)["w"]
    torch_models = [{"w": p["w"].T, "b": p["b"]} for p in models]
    np.testing.assert_allclose(jaxmerge.regmean(torch_models, grams, layout="out_in")["w"], flax_result.T, rtol=1e-5)


def test_singular_gram_warns_and_uses_the_ridge():
    models, data = _linear_models(n=2)
    grams = [{"w": {"gram": jnp.asarray(x.T @ x).at[0].set(0).at[:, 0].set(0)}} for x in data]  # feature 0 unseen
    with pytest.warns(RuntimeWarning, match=r"regmean: the summed Gram at 'w' is singular; added a ridge"):
        merged = jaxmerge.regmean(models, grams, alpha=1.0)
    assert np.all(np.isfinite(merged["w"]))


@pytest.mark.parametrize("poison, message", [(np.nan, "has NaN or infinite values at 'w'"),
                                             (-1.0, "has a negative diagonal entry at 'w'")])
def test_nan_or_negative_grams_are_refused(poison, message):
    models, data = _linear_models(n=2)
    grams = [{"w": {"gram": jnp.asarray(x.T @ x)}} for x in data]
    grams[1]["w"]["gram"] = grams[1]["w"]["gram"].at[0, 0].set(poison)
    with pytest.raises(ValueError, match=r"grams\[1\] " + message):
        jaxmerge.regmean(models, grams)


def test_linear_override_and_errors():
    models, data = _linear_models(n=2)
    grams = [{"w": {"gram": jnp.asarray(x.T @ x)}} for x in data]
    averaged = jaxmerge.regmean(models, grams, linear=lambda path, leaf: False)
    np.testing.assert_allclose(averaged["w"], jaxmerge.average(models)["w"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"grams\[0\] has no statistics for the linear layer 'b'"):
        jaxmerge.regmean(models, grams, linear=lambda path, leaf: True)
    with pytest.raises(ValueError, match=r"grams\[1\] has no Gram matrices"):
        jaxmerge.regmean(models, [grams[0], {}])
    with pytest.raises(ValueError, match=r"grams\[0\] has no statistics for the linear layer 'b'"):
        jaxmerge.regmean(models, [grams[0], {"b": {"gram": jnp.eye(1)}}])
    with pytest.raises(ValueError, match=r"grams\[0\] has statistics for 'v', which is not a leaf of the models"):
        jaxmerge.regmean(models, [{"v": {"gram": jnp.eye(2)}}, grams[1]])
    with pytest.raises(ValueError, match=r"the Gram at 'w' has 5 input features, which do not match"):
        jaxmerge.regmean(models, [{"w": {"gram": jnp.eye(5)}}] * 2)
    with pytest.raises(ValueError, match=r"grams\[1\] at 'w' has shape \(6, 5\)"):
        jaxmerge.regmean(models, [grams[0], {"w": {"gram": jnp.ones((6, 5))}}])
    with pytest.raises(ValueError, match="layout must be one of"):
        jaxmerge.regmean(models, grams, layout="oi")


def _two_layer_models(n=2, seed=3):
    rng = np.random.default_rng(seed)
    models = [{"l1": {"w": jnp.asarray(rng.standard_normal((5, 6)) / 2, jnp.float32),
                      "b": jnp.asarray(rng.standard_normal(6), jnp.float32)},
               "l2": {"w": jnp.asarray(rng.standard_normal((6, 3)) / 2, jnp.float32),
                      "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}} for _ in range(n)]
    data = [jnp.asarray(rng.standard_normal((30, 5)), jnp.float32) for _ in range(n)]
    return models, data


def two_layer_apply(params, batch):
    h = jax.nn.relu(batch[0] @ params["l1"]["w"] + params["l1"]["b"][None])
    return h @ params["l2"]["w"] + params["l2"]["b"][None]


def numpy_regmean(kernels, grams, alpha):
    tilde = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    return np.linalg.solve(sum(tilde), sum(t @ w for t, w in zip(tilde, kernels)))


def test_regmean_plus_plus_takes_layer_two_statistics_from_the_merged_first_layer():
    models, data = _two_layer_models()
    merged = jaxmerge.regmean_plus_plus(two_layer_apply, models, [[(x,)] for x in data], alpha=0.9)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    w1 = numpy_regmean([f64(p["l1"]["w"]) for p in models], [f64(x).T @ f64(x) for x in data], 0.9)
    b1 = np.mean([f64(p["l1"]["b"]) for p in models], 0)
    hidden = [np.maximum(f64(x) @ w1 + b1, 0) for x in data]
    w2 = numpy_regmean([f64(p["l2"]["w"]) for p in models], [h.T @ h for h in hidden], 0.9)
    np.testing.assert_allclose(merged["l1"]["w"], w1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged["l2"]["w"], w2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged["l2"]["b"], np.mean([f64(p["l2"]["b"]) for p in models], 0), rtol=1e-6)
    # plain RegMean takes layer two's statistics from each model's own first layer instead
    grams = [jaxmerge.input_grams(two_layer_apply, [(x,)], params=p) for p, x in zip(models, data)]
    plain = jaxmerge.regmean(models, grams, alpha=0.9)
    np.testing.assert_allclose(plain["l1"]["w"], merged["l1"]["w"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain["l2"]["w"], merged["l2"]["w"], rtol=1e-3)


def test_regmean_plus_plus_with_an_nnx_module():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(5, 6, rngs=rngs)
            self.l2 = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    modules = [MLP(nnx.Rngs(i)) for i in range(2)]
    states = [nnx.state(m, nnx.Param) for m in modules]
    _, data = _two_layer_models()
    merged = jaxmerge.regmean_plus_plus(modules[0], states, [[(x,)] for x in data])
    as_dict = [{"l1": {"w": s["l1"]["kernel"][...], "b": s["l1"]["bias"][...]},
                "l2": {"w": s["l2"]["kernel"][...], "b": s["l2"]["bias"][...]}} for s in states]
    expected = jaxmerge.regmean_plus_plus(two_layer_apply, as_dict, [[(x,)] for x in data])
    assert isinstance(merged, nnx.State)
    np.testing.assert_allclose(merged["l2"]["kernel"][...], expected["l2"]["w"], rtol=1e-5, atol=1e-6)


def test_regmean_plus_plus_and_ridge_errors():
    models, data = _two_layer_models()
    with pytest.raises(ValueError, match=r"data\[0\] yielded no batches"):
        jaxmerge.regmean_plus_plus(two_layer_apply, models, [[], [(data[1],)]])
    grams = [jaxmerge.input_grams(two_layer_apply, [(x,)], params=p) for p, x in zip(models, data)]
    with pytest.raises(ValueError, match=r"ridge must be in \[0, inf\), got -1.0"):
        jaxmerge.regmean(models, grams, ridge=-1.0)
