"""Exponential moving average of the parameters, as an optax wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmerge._tree import PyTree, is_float
from jaxmerge.averaging._wrapper import (
    blend,
    check,
    check_dtype,
    counter,
    registers_average,
    shadow,
    wrap,
)


def _debiased(state: EmaState) -> PyTree:
    scale = jnp.where(state.decay_product < 1, 1 - state.decay_product, 1)
    return jax.tree.map(lambda e: (e / scale.astype(e.dtype)) if is_float(e.dtype) else e, state.ema)


@registers_average(_debiased)
class EmaState(NamedTuple):
    """State of :func:`ema`.

    Attributes:
      count: updates seen so far.
      num_averaged: EMA updates applied so far (the warmup schedule's step).
      decay_product: product of the decays applied since the EMA started from zero (for
        debiasing; 0 when the EMA started from a copy of the parameters).
      ema: the (biased, if ``debias``) moving average, in the shadow dtype.
      inner_state: the wrapped optimizer's state.
    """
    count: jax.Array
    num_averaged: jax.Array
    decay_product: jax.Array
    ema: PyTree
    inner_state: optax.OptState


def ema_warmup(inv_gamma: float = 1.0, power: float = 2 / 3) -> Callable[[jax.Array], jax.Array]:
    """The common EMA warmup: ``decay_n = 1 - (1 + n / inv_gamma) ** -power`` at EMA update ``n``.

    The returned schedule starts at 0 at ``n = 0`` (so the first EMA update copies the
    parameters) and rises toward 1; :func:`ema` uses ``min(decay, decay_n)``. With
    ``inv_gamma=1``, ``power=1`` gives ``n / (n + 1)``, the equal-weight running mean;
    ``power=2/3`` reaches 0.999 after about 31.6k updates and 0.9999 after 1M, and
    ``power=3/4`` after 10k and 215k (the values suggested for diffusers' ``EMAModel``).

    Args:
      inv_gamma: the time scale of the warmup, in EMA updates (> 0); larger is slower.
      power: the exponent (> 0); larger rises faster.

    Returns:
      A function ``fn(n) -> decay`` of the EMA update index ``n`` (an integer or integer
      array), returning a float32 array; pass it as ``warmup`` to :func:`ema`.

    Raises:
      JaxmergeError: ``inv_gamma <= 0`` or ``power <= 0``.

    References:
      Katherine Crowson's EMA warmup (k-diffusion's ``EMAWarmup``), as in diffusers'
      ``EMAModel`` (``use_ema_warmup``, ``inv_gamma``, ``power``).

    Examples:
      With ``inv_gamma=1`` and ``power=1``, ``decay_n = 1 - 1 / (1 + n)``:

      >>> import jaxmerge
      >>> warmup = jaxmerge.ema_warmup(inv_gamma=1.0, power=1.0)
      >>> [float(warmup(n)) for n in (0, 1, 3)]
      [0.0, 0.5, 0.75]
    """
    check(inv_gamma, "inv_gamma", lambda v: v > 0, "must be > 0")
    check(power, "power", lambda v: v > 0, "must be > 0")
    return lambda n: 1 - (1 + jnp.asarray(n, jnp.float32) / inv_gamma) ** (-power)


def scale_ema_decay(decay, batch_scale):
    """The EMA scaling rule (Busbridge et al., arXiv 2307.13813): ``decay ** batch_scale``.

    When the batch size is multiplied by ``batch_scale`` (and the optimizer's learning rate
    scaled by its own rule), there are ``batch_scale`` times fewer updates per epoch; an EMA
    with decay ``decay ** batch_scale`` then keeps its time scale, measured in examples seen.

    Args:
      decay: the EMA decay tuned at the reference batch size, in [0, 1).
      batch_scale: the new batch size divided by the reference one (> 0).

    Returns:
      The scaled decay ``decay ** batch_scale`` (a Python float for Python floats, an
      array for arrays); pass it as ``decay`` to :func:`ema`.

    Raises:
      JaxmergeError: ``decay`` is not in [0, 1), or ``batch_scale <= 0`` (traced values are not
        checked).

    References:
      Busbridge et al., "How to Scale Your EMA", arXiv 2307.13813.

    Examples:
      Doubling the batch squares the decay; halving it takes the square root:

      >>> import jaxmerge
      >>> jaxmerge.scale_ema_decay(0.5, 2)
      0.25
      >>> jaxmerge.scale_ema_decay(0.25, 0.5)
      0.5
    """
    check(decay, "decay", lambda v: 0 <= v < 1, "must be in [0, 1)")
    check(batch_scale, "batch_scale", lambda v: v > 0, "must be > 0")
    return decay ** batch_scale


def ema(inner: optax.GradientTransformation, decay, *, warmup: Callable | None = None, debias: bool = False,
        update_every=1, start_step=0, dtype=None) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` and keep an exponential moving average of the parameters.

    At update ``t`` (0-based) with new parameters ``theta = params + updates``:

    - while ``t < start_step`` the average is a copy of ``theta``;
    - then every ``update_every`` updates (``t = start_step``, ``start_step + update_every``,
      ...), ``ema = d * ema + (1 - d) * theta`` with ``d = decay``, or
      ``d = min(decay, warmup(n))`` at the ``n``-th EMA update, counting from 0 (see
      :func:`ema_warmup`); in between, the average is kept as it is;
    - with ``debias``, the EMA starts from zero and :func:`jaxmerge.averaged_params` divides
      it by ``1 - prod(d)`` over the EMA updates so far (as Adam corrects its moments);
      otherwise it starts from the initial parameters, as ``flax.nnx.EMA`` does.
      ``start_step=1`` gives the rule of PyTorch's ``AveragedModel`` with
      ``get_ema_multi_avg_fn`` (the first update copies).

    Unlike ``optax.ema``, which averages *updates*, this averages the parameters. The
    updates of ``inner`` are returned unchanged; the average lives in the optimizer state,
    read it with :func:`jaxmerge.averaged_params`. Memory: one copy of the parameters.

    Args:
      inner: the optimizer to run.
      decay: in [0, 1); 0 tracks the parameters.
      warmup: ``fn(n) -> decay`` at EMA update ``n`` (e.g. :func:`ema_warmup`), or None.
      debias: start from zero and correct the bias (see above); before the first update,
        :func:`jaxmerge.averaged_params` then returns zeros.
      update_every: apply the EMA every this many updates (>= 1).
      start_step: copy the parameters before this update index (>= 0).
      dtype: dtype of the EMA copy of float parameters, e.g. ``jnp.float32`` to average
        bf16 parameters without losing the ``(1 - decay) * delta`` that bf16 rounds away
        (None: each parameter's own dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

    Raises:
      TypeError: ``inner`` is not an ``optax.GradientTransformation``.
      JaxmergeError: ``decay`` not in [0, 1), ``update_every < 1`` or ``start_step < 0``
        (values traced under ``jax.jit`` or ``optax.inject_hyperparams`` are not checked);
        from ``update``, when it is called without ``params``.

    References:
      Polyak & Juditsky, "Acceleration of stochastic approximation by averaging", 1992;
      the warmup is Katherine Crowson's, as in diffusers' ``EMAModel``.

    Examples:
      SGD with learning rate 0.5 and a constant gradient moves ``w`` from ``[0, 4]`` to
      ``[-1, 6]`` and then ``[-2, 8]``; the EMA goes ``0.5 * [0, 4] + 0.5 * [-1, 6] =
      [-0.5, 5]``, then ``0.5 * [-0.5, 5] + 0.5 * [-2, 8] = [-1.25, 6.5]``:

      >>> import jax, jax.numpy as jnp, optax, jaxmerge
      >>> params = {"w": jnp.asarray([0.0, 4.0])}
      >>> grads = {"w": jnp.asarray([2.0, -4.0])}
      >>> tx = jaxmerge.ema(optax.sgd(0.5), decay=0.5)
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(2):
      ...     updates, state = update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["w"].tolist()
      [-2.0, 8.0]
      >>> jaxmerge.averaged_params(state)["w"].tolist()
      [-1.25, 6.5]
    """
    check(decay, "decay", lambda v: 0 <= v < 1, "must be in [0, 1)")
    check_dtype(dtype)
    check(update_every, "update_every", lambda v: v >= 1, "must be >= 1")
    check(start_step, "start_step", lambda v: v >= 0, "must be >= 0")

    def init_average(params, inner_state):
        copy = shadow(params, dtype)
        start = jax.tree.map(jnp.zeros_like, copy) if debias else copy
        return EmaState(counter(), counter(), jnp.asarray(1.0 if debias else 0.0, jnp.float32), start, inner_state)

    def update_average(state, inner_state, new_params):
        copying = state.count < start_step
        averaging = ~copying & ((state.count - start_step) % update_every == 0)
        step_decay = jnp.asarray(decay, jnp.float32)
        if warmup is not None:
            step_decay = jnp.minimum(step_decay, jnp.asarray(warmup(state.num_averaged), jnp.float32))
        keep = jnp.where(copying, 0.0, jnp.where(averaging, step_decay, 1.0))
        product = jnp.where(copying, 0.0, jnp.where(averaging, state.decay_product * step_decay, state.decay_product))
        return EmaState(optax.safe_increment(state.count), state.num_averaged + averaging.astype(jnp.int32),
                        product, blend(state.ema, new_params, keep), inner_state)

    return wrap("ema", inner, init_average, update_average)
