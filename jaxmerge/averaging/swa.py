"""Stochastic weight averaging, as an optax wrapper, and recomputing BatchNorm statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmerge._tree import PyTree
from jaxmerge.averaging._wrapper import (
    blend,
    check,
    counter,
    registers_average,
    shadow,
    wrap,
)
from jaxmerge.errors import JaxmergeError
from jaxmerge.statistics._data import inputs_of


@registers_average(lambda state: state.mean)
class SwaState(NamedTuple):
    """State of :func:`swa`: ``count`` updates seen, ``num_averaged`` snapshots in ``mean``."""
    count: jax.Array
    num_averaged: jax.Array
    mean: PyTree
    inner_state: optax.OptState


def swa(inner: optax.GradientTransformation, *, start_step=0, every=1, dtype=None
        ) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` and keep the equal-weight running mean of the parameters (SWA).

    From update ``start_step`` (0-based) on, every ``every`` updates, the new parameters
    ``theta = params + updates`` join the mean: ``mean += (theta - mean) / n`` for the
    ``n``-th one (so the first one replaces the initial copy). This is PyTorch's
    ``AveragedModel`` default averaging, called every ``every`` steps.

    Args:
      inner: the optimizer to run (SWA usually pairs it with a high constant or cyclical
        learning rate).
      start_step: first update index that is averaged.
      every: average every this many updates (>= 1).
      dtype: dtype of the running mean of float parameters (e.g. ``jnp.float32``).

    Recompute BatchNorm statistics for the averaged parameters with
    :func:`update_batch_stats` before evaluating.

    References:
      Izmailov et al., arXiv 1803.05407.
    """
    check(start_step, "start_step", lambda v: v >= 0, "must be >= 0")
    check(every, "every", lambda v: v >= 1, "must be >= 1")

    def init_average(params, inner_state):
        return SwaState(counter(), counter(), shadow(params, dtype), inner_state)

    def update_average(state, inner_state, new_params):
        joining = (state.count >= start_step) & ((state.count - start_step) % every == 0)
        n = state.num_averaged + joining.astype(jnp.int32)
        keep = jnp.where(joining, 1 - 1 / jnp.maximum(n, 1).astype(jnp.float32), 1.0)
        return SwaState(optax.safe_increment(state.count), n, blend(state.mean, new_params, keep), inner_state)

    return wrap("swa", inner, init_average, update_average)


def _reset_nnx_batch_norms(model: nnx.Module) -> list:
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    for norm in norms:
        norm.mean.set_value(jnp.zeros_like(norm.mean.get_value()))
        norm.var.set_value(jnp.ones_like(norm.var.get_value()))
    return norms


def _update_nnx(model: nnx.Module, data: Iterable) -> nnx.Module:
    norms = _reset_nnx_batch_norms(model)
    if not norms:
        raise JaxmergeError("the model has no nnx.BatchNorm layer")
    momenta = [norm.momentum for norm in norms]
    model.train()
    seen = 0
    try:
        for batch in data:
            for norm in norms:  # a cumulative mean: batch k enters with weight 1 / (k + 1)
                norm.momentum = seen / (seen + 1)
            model(inputs_of(batch))
            seen += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    if not seen:
        raise JaxmergeError("data yielded no batches")
    return model


def _update_linen(apply_fn: Callable, variables: dict, data: Iterable) -> dict:
    if "batch_stats" not in variables:
        raise JaxmergeError("variables have no 'batch_stats' collection")

    def run(stats_value, batch):
        reset = dict(variables, batch_stats=jax.tree.map(lambda s: jnp.full_like(s, stats_value),
                                                         variables["batch_stats"]))
        _, updates = apply_fn(reset, batch)
        return updates["batch_stats"]

    total, momentum, seen = None, None, 0
    for batch in data:
        from_zero = run(0.0, batch)  # = (1 - m) * batch statistic
        if momentum is None:  # m = (stats after starting from 1) - (stats after starting from 0)
            momentum = jax.tree.map(lambda one, zero: one - zero, run(1.0, batch), from_zero)
        statistic = jax.tree.map(lambda z, m: z / (1 - m), from_zero, momentum)
        total = statistic if total is None else jax.tree.map(jnp.add, total, statistic)
        seen += 1
    if not seen:
        raise JaxmergeError("data yielded no batches")
    return dict(variables, batch_stats=jax.tree.map(lambda t: t / seen, total))


def update_batch_stats(model, data: Iterable, *, variables: dict | None = None):
    """Recompute BatchNorm running statistics for (averaged) parameters over ``data``.

    The running mean and variance of every BatchNorm become the average over the batches
    of ``data`` of each batch's statistics (PyTorch's ``swa_utils.update_bn``), whatever
    the layers' momentum.

    Args:
      model: a Flax NNX module (updated in place, left in eval mode, and returned), or a
        Linen ``apply_fn(variables, batch) -> (outputs, updates)`` that runs in training
        mode with ``mutable=['batch_stats']``, e.g.
        ``lambda v, b: module.apply(v, b[0], train=True, mutable=['batch_stats'])``.
      data: batches ``(inputs, ...)`` or ``{'inputs': ...}`` (NNX) / as ``apply_fn`` takes
        them (Linen).
      variables: the Linen variables (with the averaged ``params``); a new dict with the
        recomputed ``batch_stats`` is returned.
    """
    if isinstance(model, nnx.Module):
        return _update_nnx(model, data)
    if variables is None:
        raise JaxmergeError("variables are required with a Linen apply_fn")
    return _update_linen(model, variables, data)
