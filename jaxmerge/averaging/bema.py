"""BEMA: bias-corrected exponential moving average, as an optax wrapper."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmerge._tree import PyTree, is_float
from jaxmerge.averaging._wrapper import blend, check, check_dtype, registers_average, shadow, wrap


@registers_average(lambda state: state.output)
class BemaState(NamedTuple):
    """State of :func:`bema`: ``count`` updates seen, the EMA ``ema``, the reference
    parameters ``theta0`` (at the end of burn-in), the bias-corrected ``output``."""
    count: jax.Array
    ema: PyTree
    theta0: PyTree
    output: PyTree
    inner_state: optax.OptState


def bema(inner: optax.GradientTransformation, *, ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0,
         burn_in=0, update_every=400, min_ema_multiplier=0.0, dtype=None) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` and keep a bias-corrected EMA of the parameters (BEMA).

    At step ``t = update index + 1`` with parameters ``theta_t = params + updates``: while
    ``t <= burn_in``, the reference ``theta_0``, the EMA and the output are all set to
    ``theta_t`` (with ``burn_in=0`` they start as the initial parameters); after that,
    every ``update_every`` steps (``t = burn_in + update_every``, ``burn_in + 2
    update_every``, ...)

        beta_t  = max((lag + multiplier t) ** -ema_power, min_ema_multiplier)
        alpha_t = (lag + multiplier t) ** -bias_power
        ema     = (1 - beta_t) ema + beta_t theta_t
        output  = ema + alpha_t (theta_t - theta_0)

    and between those steps the output keeps its last value. The correction
    ``alpha_t (theta_t - theta_0)`` removes the lag an EMA has behind a drifting iterate.
    :func:`jaxmerge.averaged_params` returns the output; the updates of ``inner`` are
    returned unchanged. Defaults follow the reference implementation (TRL's
    ``BEMACallback``): ``kappa = ema_power = 0.5``, ``eta = bias_power = 0.2``,
    ``rho = lag = 10``, ``gamma = multiplier = 1``, ``phi = update_every = 400``.
    Memory: three copies of the parameters.

    Args:
      inner: the optimizer to run.
      ema_power: ``kappa``, the exponent of the EMA weight ``beta_t`` (>= 0; 0 makes the EMA
        follow ``theta_t``).
      bias_power: ``eta``, the exponent of the correction weight ``alpha_t``.
      lag: ``rho``, the offset of the step in both weights (> 0): a virtual age at the start.
      multiplier: ``gamma``, the scale of the step in both weights (> 0).
      burn_in: ``tau``, the steps before averaging starts (>= 0); ``theta_0`` is the
        parameters after step ``burn_in``.
      update_every: ``phi``, the steps between updates of the EMA and output (>= 1).
      min_ema_multiplier: a floor on ``beta_t``.
      dtype: dtype of the three copies of float parameters (None: each parameter's own
        dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

    Raises:
      TypeError: ``inner`` is not an ``optax.GradientTransformation``.
      JaxmergeError: ``ema_power < 0``, ``lag <= 0``, ``multiplier <= 0``, ``burn_in < 0``
        or ``update_every < 1`` (traced values are not checked); from ``update``, when it
        is called without ``params``.

    References:
      Block & Zhang, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes",
      arXiv 2508.00180.

    Examples:
      With ``lag = multiplier = 1``, step 1 has ``lag + multiplier t = 2``, so
      ``beta_1 = 2 ** -1 = 0.5`` and ``alpha_1 = 2 ** -2 = 0.25``. One SGD step moves ``w``
      from ``theta_0 = [0, 4]`` to ``theta_1 = [-1, 6]``; the EMA is ``[-0.5, 5]`` and the
      output ``[-0.5, 5] + 0.25 * [-1, 2] = [-0.75, 5.5]``:

      >>> import jax, jax.numpy as jnp, optax, jaxmerge
      >>> params = {"w": jnp.asarray([0.0, 4.0])}
      >>> tx = jaxmerge.bema(optax.sgd(0.5), ema_power=1.0, bias_power=2.0, lag=1.0, multiplier=1.0,
      ...                    update_every=1)
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> _, state = update({"w": jnp.asarray([2.0, -4.0])}, state, params)
      >>> jaxmerge.averaged_params(state)["w"].tolist()
      [-0.75, 5.5]
    """
    check_dtype(dtype)
    check(ema_power, "ema_power", lambda v: v >= 0, "must be >= 0")
    check(lag, "lag", lambda v: v > 0, "must be > 0")
    check(multiplier, "multiplier", lambda v: v > 0, "must be > 0")
    check(burn_in, "burn_in", lambda v: v >= 0, "must be >= 0")
    check(update_every, "update_every", lambda v: v >= 1, "must be >= 1")

    def init_average(params, inner_state):
        return BemaState(jnp.zeros([], jnp.int32), shadow(params, dtype), shadow(params, dtype), shadow(params, dtype),
                         inner_state)

    def update_average(state, inner_state, new_params):
        step = state.count + 1
        resetting = step <= burn_in
        averaging = ~resetting & ((step - burn_in) % update_every == 0)
        base = jnp.asarray(lag, jnp.float32) + jnp.asarray(multiplier, jnp.float32) * step.astype(jnp.float32)
        beta = jnp.maximum(base ** -jnp.asarray(ema_power, jnp.float32), jnp.asarray(min_ema_multiplier, jnp.float32))
        alpha = base ** -jnp.asarray(bias_power, jnp.float32)
        keep = jnp.where(resetting, 0.0, jnp.where(averaging, 1 - beta, 1.0))
        ema = blend(state.ema, new_params, keep)
        theta0 = blend(state.theta0, new_params, jnp.where(resetting, 0.0, 1.0))

        def corrected(e, t0, p, previous):
            if not is_float(e.dtype):
                return previous
            value = e.astype(jnp.float32) + alpha * (jnp.asarray(p, jnp.float32) - t0.astype(jnp.float32))
            value = jnp.where(averaging, value, previous.astype(jnp.float32))
            value = jnp.where(resetting, jnp.asarray(p, jnp.float32), value)
            return value.astype(e.dtype)
        output = jax.tree.map(corrected, ema, theta0, new_params, state.output)
        return BemaState(optax.safe_increment(state.count), ema, theta0, output, inner_state)

    return wrap("bema", inner, init_average, update_average)
