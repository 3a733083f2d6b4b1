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

    It starts at 0 (the first update copies the parameters) and rises toward 1; :func:`ema`
    uses ``min(decay, decay_n)``. ``power=2/3`` reaches 0.999 after about 31.6k updates and
    0.9999 after 1M; ``power=3/4`` after 10k and 215k (as in diffusers' ``EMAModel``).
    """
    check(inv_gamma, "inv_gamma", lambda v: v > 0, "must be > 0")
    check(power, "power", lambda v: v > 0, "must be > 0")
    return lambda n: 1 - (1 + jnp.asarray(n, jnp.float32) / inv_gamma) ** (-power)


def scale_ema_decay(decay, batch_scale):
    """The EMA scaling rule (Busbridge et al., arXiv 2307.13813): ``decay ** batch_scale``.

    When the batch size is multiplied by ``batch_scale`` (and the optimizer's learning rate
    scaled by its own rule), this decay keeps the EMA's time scale in examples seen.
    """
    check(decay, "decay", lambda v: 0 <= v < 1, "must be in [0, 1)")
    check(batch_scale, "batch_scale", lambda v: v > 0, "must be > 0")
    return decay ** batch_scale


def ema(inner: optax.GradientTransformation, decay, *, warmup: Callable | None = None, debias: bool = False,
        update_every=1, start_step=0, dtype=None) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` and keep an exponential moving average of the parameters.

    At update ``t`` (0-based) with new parameters ``theta = params + updates``:

    - while ``t < start_step`` the average is a copy of ``theta``;
    - then every ``update_every`` updates, ``ema = d * ema + (1 - d) * theta`` with
      ``d = decay``, or ``min(decay, warmup(n))`` at the ``n``-th EMA update (see
      :func:`ema_warmup`);
    - with ``debias``, the EMA starts from zero and :func:`jaxmerge.averaged_params` divides
      it by ``1 - prod(d)`` (as Adam corrects its moments); otherwise it starts from the
      initial parameters, as ``flax.nnx.EMA`` does. ``start_step=1`` gives the rule of
      PyTorch's ``AveragedModel`` with ``get_ema_multi_avg_fn`` (the first update copies).

    Unlike ``optax.ema``, which averages *updates*, this averages the parameters.

    Args:
      inner: the optimizer to run.
      decay: in [0, 1); 0 tracks the parameters.
      warmup: ``fn(n) -> decay`` at EMA update ``n`` (e.g. :func:`ema_warmup`), or None.
      debias: start from zero and correct the bias (see above).
      update_every: apply the EMA every this many updates (>= 1).
      start_step: copy the parameters before this update index.
      dtype: dtype of the EMA copy of float parameters, e.g. ``jnp.float32`` to average
        bf16 parameters without losing the ``(1 - decay) * delta`` that bf16 rounds away.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

    References:
      Polyak & Juditsky 1992; the warmup of Karras et al. and diffusers' ``EMAModel``.
    """
    check(decay, "decay", lambda v: 0 <= v < 1, "must be in [0, 1)")
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
