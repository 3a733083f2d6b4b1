"""A fixed parameter trajectory to replay through the wrappers and the NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmerge


def initial_params():
    rng = np.random.default_rng(0)
    return {"dense": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal(3), jnp.float32)},
            "scale": jnp.asarray(rng.standard_normal(()), jnp.float32)}


def gradients(steps, seed=1):
    rng = np.random.default_rng(seed)
    params = initial_params()
    return [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
            for _ in range(steps)]


def run(tx, steps=12, params=None, jit=True):
    """Train with ``tx`` on fixed gradients; returns the final state and every ``params + updates``."""
    params = initial_params() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    trajectory = []
    for grads in gradients(steps):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    return state, trajectory


def leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_average(state, expected_leaves, rtol=1e-5, index=0):
    got = leaves64(jaxmerge.averaged_params(state, index=index))
    for g, e in zip(got, expected_leaves):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=1e-6)
