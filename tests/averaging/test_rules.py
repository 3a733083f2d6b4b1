"""Each averaging rule against a NumPy reference replaying the same parameter trajectory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmerge
from tests.averaging.trajectory import assert_average, initial_params, leaves64, run

SGD = optax.sgd(0.1)


def reference_ema(trajectory, decay, *, warmup=None, debias=False, every=1, start=0):
    ema = [np.zeros_like(x) for x in leaves64(initial_params())] if debias else leaves64(initial_params())
    product, n = (1.0 if debias else 0.0), 0
    for t, theta in enumerate(map(leaves64, trajectory)):
        if t < start:
            ema, product = theta, 0.0
        elif (t - start) % every == 0:
            d = decay if warmup is None else min(decay, 1 - (1 + n / warmup[0]) ** -warmup[1])
            ema = [d * e + (1 - d) * x for e, x in zip(ema, theta)]
            product, n = product * d, n + 1
    return [e / (1 - product) for e in ema] if product < 1 else ema


@pytest.mark.parametrize("kwargs", [dict(decay=0.0), dict(decay=0.9), dict(decay=0.9, update_every=3, start_step=2),
                                    dict(decay=0.99, warmup=(1.0, 2 / 3)), dict(decay=0.9, debias=True),
                                    dict(decay=0.95, debias=True, warmup=(2.0, 0.75), update_every=2)])
def test_ema(kwargs):
    warmup = kwargs.pop("warmup", None)
    tx = jaxmerge.ema(SGD, warmup=None if warmup is None else jaxmerge.ema_warmup(*warmup), **kwargs)
    state, trajectory = run(tx)
    expected = reference_ema(trajectory, kwargs["decay"], warmup=warmup, debias=kwargs.get("debias", False),
                             every=kwargs.get("update_every", 1), start=kwargs.get("start_step", 0))
    assert_average(state, expected)


def test_ema_with_decay_zero_tracks_the_params():
    state, trajectory = run(jaxmerge.ema(SGD, 0.0))
    assert_average(state, leaves64(trajectory[-1]), rtol=0)


def test_ema_matches_flax_nnx_ema():
    state, trajectory = run(jaxmerge.ema(SGD, 0.9))
    flax_ema = nnx.EMA(jax.tree.map(nnx.Param, initial_params()), 0.9)
    for theta in trajectory:
        flax_ema.update(jax.tree.map(nnx.Param, theta))
    reference = jax.tree.map(lambda v: np.asarray(v, np.float64), flax_ema.params,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert_average(state, jax.tree.leaves(reference))


def test_ema_and_swa_follow_pytorch_averaged_model():
    # torch.optim.swa_utils.AveragedModel: the first update_parameters() copies the
    # parameters (n_averaged == 0); then get_ema_multi_avg_fn(d) does lerp(avg, p, 1 - d)
    # and the default function avg + (p - avg) / (n + 1).
    state, trajectory = run(jaxmerge.ema(SGD, 0.8, start_step=1))
    thetas = list(map(leaves64, trajectory))
    avg = thetas[0]
    for theta in thetas[1:]:
        avg = [a + (1 - 0.8) * (x - a) for a, x in zip(avg, theta)]
    assert_average(state, avg)
    state, _ = run(jaxmerge.swa(SGD))
    avg, n = thetas[0], 1
    for theta in thetas[1:]:
        avg, n = [a + (x - a) / (n + 1) for a, x in zip(avg, theta)], n + 1
    assert_average(state, avg)


@pytest.mark.parametrize("start,every", [(0, 1), (3, 2), (5, 4)])
def test_swa_is_the_mean_of_the_averaged_iterates(start, every):
    state, trajectory = run(jaxmerge.swa(SGD, start_step=start, every=every))
    chosen = [leaves64(theta) for t, theta in enumerate(trajectory) if t >= start and (t - start) % every == 0]
    assert_average(state, [np.mean(xs, axis=0) for xs in zip(*chosen)])


@pytest.mark.parametrize("k,every,steps", [(3, 2, 12), (4, 1, 12), (5, 3, 12), (2, 5, 3)])
def test_lawa_is_the_mean_of_the_last_k_snapshots(k, every, steps):
    state, trajectory = run(jaxmerge.lawa(SGD, k=k, every=every), steps=steps)
    snapshots = [leaves64(theta) for t, theta in enumerate(trajectory) if (t + 1) % every == 0][-k:]
    expected = [np.mean(xs, axis=0) for xs in zip(*snapshots)] if snapshots else leaves64(initial_params())
    assert_average(state, expected)


def reference_bema(trajectory, *, ema_power, bias_power, lag, multiplier, burn_in, every):
    ema = theta0 = output = leaves64(initial_params())
    for t, theta in enumerate(map(leaves64, trajectory), start=1):
        if t <= burn_in:
            ema = theta0 = output = theta
        elif (t - burn_in) % every == 0:
            beta = (lag + multiplier * t) ** -ema_power
            alpha = (lag + multiplier * t) ** -bias_power
            ema = [(1 - beta) * e + beta * x for e, x in zip(ema, theta)]
            output = [e + alpha * (x - x0) for e, x, x0 in zip(ema, theta, theta0)]
    return output


@pytest.mark.parametrize("burn_in,every", [(0, 1), (3, 2), (4, 5)])
def test_bema(burn_in, every):
    kwargs = dict(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0, burn_in=burn_in)
    state, trajectory = run(jaxmerge.bema(SGD, update_every=every, **kwargs))
    assert_average(state, reference_bema(trajectory, every=every, **kwargs))


def test_power_ema_profiles_and_post_hoc_reconstruction():
    sigma_rels = (0.05, 0.10, 0.15)
    tx = jaxmerge.power_ema(SGD, sigma_rels=sigma_rels, snapshot_every=10)
    params = initial_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = jax.tree.map(jnp.ones_like, params)
    snapshots, thetas = [], []
    for t in range(200):  # a smooth trajectory with a little curvature
        g = jax.tree.map(lambda x: x * np.float32(np.cos(t / 40)), grads)
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        thetas.append(leaves64(params))
        if bool(state.snapshot_due):
            snapshots.append(jaxmerge.power_ema_snapshot(state))
    gammas = [float(g) for g in state.gammas]
    # the per-step rule: beta_t = (1 - 1/t) ** (gamma + 1)
    for k, gamma in enumerate(gammas):
        ema = thetas[0]
        for t, theta in enumerate(thetas[1:], start=2):
            beta = (1 - 1 / t) ** (gamma + 1)
            ema = [beta * e + (1 - beta) * x for e, x in zip(ema, theta)]
        assert_average(state, ema, rtol=1e-4, index=0) if k == 0 else None
        np.testing.assert_allclose(leaves64(state.emas[k])[0], ema[0], rtol=1e-4)
    assert len(snapshots) == 20 and snapshots[-1].step == 200
    # keep only the 0.05 and 0.15 EMAs, reconstruct 0.10 and compare with the tracked one
    thinned = [s._replace(gammas=s.gammas[0::2], emas=s.emas[0::2]) for s in snapshots]
    rebuilt = jaxmerge.post_hoc_ema(thinned, 0.10)
    for got, tracked in zip(leaves64(rebuilt), leaves64(state.emas[1])):
        np.testing.assert_allclose(got, tracked, rtol=0.02, atol=0.02 * np.abs(tracked).max())
    # reconstructing a width that was tracked returns that EMA
    exact = jaxmerge.post_hoc_ema(snapshots, 0.05)
    for got, tracked in zip(leaves64(exact), leaves64(state.emas[0])):
        np.testing.assert_allclose(got, tracked, rtol=1e-3, atol=1e-4)


def test_sigma_rel_and_gamma():
    from jaxmerge.averaging.power_ema import gamma_to_sigma_rel, sigma_rel_to_gamma
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for gamma in (0.5, 3.0, 20.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)


def test_scale_ema_decay():
    assert jaxmerge.scale_ema_decay(0.999, 4) == pytest.approx(0.999 ** 4)
    assert jaxmerge.scale_ema_decay(0.99, 0.5) == pytest.approx(np.sqrt(0.99))


@pytest.mark.parametrize("schedule,shape", [("linear", lambda x: 1 - x), ("cosine", lambda x: (1 + np.cos(np.pi * x)) / 2),
                                            ("inverse_sqrt", lambda x: 1 - np.sqrt(x))])
def test_checkpoint_merge_weights_emulate_the_decay(schedule, shape):
    k = 6
    weights = np.asarray(jaxmerge.checkpoint_merge_weights(schedule, k + 1))
    assert weights.sum() == pytest.approx(1) and np.all(weights >= 0)
    # checkpoints theta_j = theta_0 + sum_{i <= j} u_i: the merge scales update i by f(i / (k + 1))
    rng = np.random.default_rng(0)
    theta0, steps = rng.standard_normal(5), rng.standard_normal((k, 5))
    checkpoints = [theta0 + steps[:j].sum(0) for j in range(k + 1)]
    merged = jaxmerge.average([{"w": jnp.asarray(c, jnp.float32)} for c in checkpoints], list(weights), normalize=False)
    expected = theta0 + sum(shape(i / (k + 1)) * steps[i - 1] for i in range(1, k + 1))
    np.testing.assert_allclose(merged["w"], expected, rtol=1e-5, atol=1e-5)
    if schedule == "linear":
        np.testing.assert_allclose(weights, np.full(k + 1, 1 / (k + 1)))
