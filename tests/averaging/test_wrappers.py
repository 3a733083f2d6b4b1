"""The suite every averaging wrapper passes: jit, composition with optax, checkpointing, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmerge
from tests.averaging.trajectory import gradients, initial_params, run

WRAPPERS = {
    "ema": lambda inner: jaxmerge.ema(inner, 0.9, warmup=jaxmerge.ema_warmup(), debias=True),
    "swa": lambda inner: jaxmerge.swa(inner, start_step=2, every=2),
    "lawa": lambda inner: jaxmerge.lawa(inner, k=3, every=2),
    "bema": lambda inner: jaxmerge.bema(inner, burn_in=2, update_every=1),
    "power_ema": lambda inner: jaxmerge.power_ema(inner, sigma_rels=(0.05, 0.1), snapshot_every=3),
}
INJECTED = {  # the numeric arguments inject_hyperparams turns into hyperparameters
    "ema": lambda: optax.inject_hyperparams(jaxmerge.ema)(optax.adam(1e-2), decay=0.9),
    "swa": lambda: optax.inject_hyperparams(jaxmerge.swa)(optax.adam(1e-2), start_step=2, every=2),
    "lawa": lambda: optax.inject_hyperparams(jaxmerge.lawa, static_args=("k",))(optax.adam(1e-2), k=3, every=2),
    "bema": lambda: optax.inject_hyperparams(jaxmerge.bema)(optax.adam(1e-2), burn_in=2, update_every=1),
    "power_ema": lambda: optax.inject_hyperparams(jaxmerge.power_ema, static_args=("sigma_rels",))(
        optax.adam(1e-2), sigma_rels=(0.05,), snapshot_every=3),
}
NAMES = list(WRAPPERS)


@pytest.fixture(autouse=True)
def _standard(standard_promotion):
    """Every wrapper test runs optax.adam or prodigy (test_rules.py runs plain SGD strictly)."""


def _close(a, b, rtol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7), a, b)


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_eager_agree_and_params_are_unchanged_by_wrapping(name):
    tx = WRAPPERS[name](optax.adam(1e-2))
    state_jit, trajectory = run(tx)
    state_eager, trajectory_eager = run(tx, jit=False)
    _close(jaxmerge.averaged_params(state_jit), jaxmerge.averaged_params(state_eager), rtol=1e-5)
    _, plain = run(optax.adam(1e-2))
    _close(trajectory[-1], plain[-1])  # the wrapper passes the inner updates through
    assert jax.tree.structure(jaxmerge.averaged_params(state_jit)) == jax.tree.structure(initial_params())


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_chain_multisteps_and_contrib(name):
    reference_state, _ = run(WRAPPERS[name](optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))))
    chained_state, _ = run(optax.chain(optax.identity(), WRAPPERS[name](
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)))))
    _close(jaxmerge.averaged_params(chained_state), jaxmerge.averaged_params(reference_state))
    multi = optax.MultiSteps(WRAPPERS[name](optax.adam(1e-2)), every_k_schedule=3)
    state, _ = run(multi, steps=12)
    assert jax.tree.structure(jaxmerge.averaged_params(state)) == jax.tree.structure(initial_params())
    contrib_state, _ = run(WRAPPERS[name](optax.contrib.prodigy()))
    jax.tree.map(lambda x: np.testing.assert_(np.all(np.isfinite(x))), jaxmerge.averaged_params(contrib_state))


def test_multisteps_averages_only_real_steps():
    state, trajectory = run(optax.MultiSteps(jaxmerge.swa(optax.sgd(0.1)), every_k_schedule=3), steps=12)
    real_steps = trajectory[2::3]  # the parameters change on every third call
    expected = jax.tree.map(lambda *xs: np.mean([np.asarray(x, np.float64) for x in xs], 0), *real_steps)
    _close(jaxmerge.averaged_params(state), expected, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
    state, _ = run(INJECTED[name]())
    assert jax.tree.structure(jaxmerge.averaged_params(state)) == jax.tree.structure(initial_params())


@pytest.mark.parametrize("name", NAMES)
def test_orbax_restore_mid_training_continues_identically(name, tmp_path):
    from orbax.checkpoint import v1 as ocp

    tx = WRAPPERS[name](optax.adam(1e-2))
    update = jax.jit(tx.update)
    grads = gradients(10)
    params = initial_params()
    state = tx.init(params)
    for g in grads[:5]:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    ocp.save(tmp_path / "step5", {"params": params, "opt_state": state})
    resumed = jax.tree.map(lambda x: x, {"params": params, "opt_state": state})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), resumed)
    restored = ocp.load(tmp_path / "step5", abstract)
    runs = []
    for start in ({"params": params, "opt_state": state}, restored):
        p, s = start["params"], start["opt_state"]
        for g in grads[5:]:
            updates, s = update(g, s, p)
            p = optax.apply_updates(p, updates)
        runs.append((p, jaxmerge.averaged_params(s)))
    jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
@pytest.mark.parametrize("name", NAMES)
def test_sharded_params_give_a_sharded_average(name, axis_type):
    mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,))
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((16, 4)), jnp.float32)}
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    sharded = {"w": jax.device_put(params["w"], sharding)}
    tx = WRAPPERS[name](optax.sgd(0.1))
    grads = {"w": jnp.ones((16, 4))}
    results = []
    for p in (params, sharded):
        state = tx.init(p)
        for _ in range(4):
            g = jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), grads, p)
            updates, state = jax.jit(tx.update)(g, state, p)
            p = optax.apply_updates(p, updates)
        results.append(jaxmerge.averaged_params(state))
    _close(results[0], results[1])
    assert results[1]["w"].sharding.is_equivalent_to(sharding, 2)


def test_nnx_optimizer():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, jaxmerge.swa(optax.sgd(0.1)), wrt=nnx.Param)
    x = jnp.ones((4, 3))
    kernels = []
    for _ in range(3):
        optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))
        kernels.append(np.asarray(model.kernel[...]))
    averaged = jaxmerge.averaged_params(optimizer.opt_state)
    assert isinstance(averaged, nnx.State)
    evaluation = nnx.clone(model)
    nnx.update(evaluation, averaged)
    np.testing.assert_allclose(evaluation.kernel[...], np.mean(kernels, 0), rtol=1e-6)


def test_errors():
    tx = jaxmerge.ema(optax.sgd(0.1), 0.9)
    state = tx.init(initial_params())
    with pytest.raises(ValueError, match=r"ema averages the parameters, so it needs them: call tx.update\(grads"):
        tx.update(initial_params(), state)
    with pytest.raises(ValueError, match="opt_state holds no averaged parameters"):
        jaxmerge.averaged_params(optax.adam(1e-3).init(initial_params()))
    with pytest.raises(ValueError, match="index=1 is out of range"):
        jaxmerge.averaged_params(state, index=1)
    for call, message in [
        (lambda: jaxmerge.ema(optax.sgd(0.1), 1.0), r"decay must be in \[0, 1\), got 1.0"),
        (lambda: jaxmerge.ema(optax.sgd(0.1), -0.1), r"decay must be in \[0, 1\)"),
        (lambda: jaxmerge.ema(optax.sgd(0.1), 0.9, update_every=0), r"update_every must be >= 1"),
        (lambda: jaxmerge.swa(optax.sgd(0.1), every=0), r"every must be >= 1"),
        (lambda: jaxmerge.lawa(optax.sgd(0.1), k=0), r"k must be an int >= 1"),
        (lambda: jaxmerge.power_ema(optax.sgd(0.1), sigma_rels=(0.5,)), r"sigma_rel must be in \(0, 0.2887\)"),
        (lambda: jaxmerge.scale_ema_decay(1.5, 2), r"decay must be in \[0, 1\)"),
        (lambda: jaxmerge.checkpoint_merge_weights("step", 3), r"schedule must be one of"),
        (lambda: jaxmerge.checkpoint_merge_weights(lambda x: x, 3), r"the schedule must be non-increasing"),
        (lambda: jaxmerge.ema(optax.sgd(0.1), float("nan")), r"decay must be in \[0, 1\), got nan"),
        (lambda: jaxmerge.ema(optax.sgd(0.1), 0.9, dtype=jnp.int32), r"dtype must be a floating dtype"),
        (lambda: jaxmerge.swa(optax.sgd(0.1), dtype="int8"), r"dtype must be a floating dtype"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="ema wraps an optax.GradientTransformation, got float"):
        jaxmerge.ema(0.9, 0.9)
    with pytest.raises(TypeError, match="decay must be a real number, got '0.9'"):
        jaxmerge.ema(optax.sgd(0.1), "0.9")


def test_post_hoc_ema_rejects_mismatched_snapshots():
    from jaxmerge.averaging.power_ema import PowerEmaSnapshot
    a = PowerEmaSnapshot(10, (6.9,), (initial_params(),))
    other = dict(initial_params(), extra=jnp.zeros(2))
    b = PowerEmaSnapshot(20, (6.9,), (other,))
    with pytest.raises(ValueError, match=r"snapshots\[1\]\.emas\[0\] has a leaf 'extra'"):
        jaxmerge.post_hoc_ema([a, b], 0.1)
    with pytest.raises(ValueError, match="no snapshot was taken at a step in"):
        jaxmerge.post_hoc_ema([a], 0.1, step=5)


@pytest.mark.parametrize("name", NAMES)
def test_params_and_state_can_be_donated(name):
    tx = WRAPPERS[name](optax.adam(1e-2))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    donating = jax.jit(step, donate_argnums=(0, 1))
    params = initial_params()
    state = tx.init(params)
    for grads in gradients(3):
        params, state = donating(params, state, grads)
    reference_state, trajectory = run(tx, steps=3)
    _close(params, trajectory[-1])
    _close(jaxmerge.averaged_params(state), jaxmerge.averaged_params(reference_state))


def test_nested_wrappers_keep_their_own_averages():
    nested = jaxmerge.ema(jaxmerge.swa(jaxmerge.lawa(optax.sgd(0.1), k=2, every=1)), 0.5)
    state, trajectory = run(nested)
    _close(jaxmerge.averaged_params(state, index=0), jaxmerge.averaged_params(run(jaxmerge.ema(optax.sgd(0.1), 0.5))[0]))
    _close(jaxmerge.averaged_params(state, index=1), jaxmerge.averaged_params(run(jaxmerge.swa(optax.sgd(0.1)))[0]))
    last_two = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, trajectory[-1], trajectory[-2])
    _close(jaxmerge.averaged_params(state, index=2), last_two)
