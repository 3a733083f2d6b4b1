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
    check_dtype,
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

    From update ``start_step`` (0-based) on, every ``every`` updates (``start_step``,
    ``start_step + every``, ...), the new parameters ``theta = params + updates`` join the
    mean: ``mean += (theta - mean) / n`` for the ``n``-th one, so the first one replaces the
    initial copy of the parameters and the mean is ``(theta_1 + ... + theta_n) / n``. This
    is PyTorch's ``AveragedModel`` default averaging, called every ``every`` steps. The
    updates of ``inner`` are returned unchanged; read the mean with
    :func:`jaxmerge.averaged_params`, and recompute BatchNorm statistics for it with
    :func:`update_batch_stats` before evaluating. Memory: one copy of the parameters.

    Args:
      inner: the optimizer to run (SWA usually pairs it with a high constant or cyclical
        learning rate).
      start_step: first update index that is averaged (>= 0).
      every: average every this many updates (>= 1), e.g. the number of steps per epoch
        or per learning-rate cycle.
      dtype: dtype of the running mean of float parameters (e.g. ``jnp.float32``; None:
        each parameter's own dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

    Raises:
      TypeError: ``inner`` is not an ``optax.GradientTransformation``.
      JaxmergeError: ``start_step < 0`` or ``every < 1`` (traced values are not checked);
        from ``update``, when it is called without ``params``.

    References:
      Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
      arXiv 1803.05407.

    Examples:
      SGD with learning rate 0.5 and a constant gradient moves ``w`` from ``[0, 4]`` to
      ``[-1, 6]`` and then ``[-2, 8]``; their mean is ``[-1.5, 7]``:

      >>> import jax, jax.numpy as jnp, optax, jaxmerge
      >>> params = {"w": jnp.asarray([0.0, 4.0])}
      >>> grads = {"w": jnp.asarray([2.0, -4.0])}
      >>> tx = jaxmerge.swa(optax.sgd(0.5))
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(2):
      ...     updates, state = update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> jaxmerge.averaged_params(state)["w"].tolist()
      [-1.5, 7.0]
    """
    check_dtype(dtype)
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

    The running mean and variance of every BatchNorm become the average, over the batches
    of ``data``, of each batch's mean and variance (as PyTorch's ``swa_utils.update_bn``
    does), whatever the layers' momentum: the statistics collected for the parameters
    being trained do not fit their average. For an NNX module, the layers' momentum is
    restored afterwards. For Linen, the layers' momentum is inferred from the first batch
    by running ``apply_fn`` from statistics of all zeros and of all ones.

    Args:
      model: a Flax NNX module (updated in place, left in eval mode, and returned), or a
        Linen ``apply_fn(variables, batch) -> (outputs, updates)`` that runs in training
        mode with ``mutable=['batch_stats']``, e.g.
        ``lambda v, b: module.apply(v, b[0], train=True, mutable=['batch_stats'])``.
      data: an iterable of batches: ``(inputs, ...)`` or ``{'inputs': ...}`` for NNX (the
        module is called on the inputs), as ``apply_fn`` takes them for Linen.
      variables: the Linen variables (with the averaged ``params`` and a ``batch_stats``
        collection); required with an ``apply_fn``, unused with an NNX module.

    Returns:
      The NNX module, or, for Linen, a new dict of ``variables`` with the recomputed
      ``batch_stats``.

    Raises:
      JaxmergeError: ``data`` yields no batches (an NNX module's statistics are then left
        reset to mean 0 and variance 1); an NNX module without any ``nnx.BatchNorm``; an
        ``apply_fn`` without ``variables``, or ``variables`` without a ``batch_stats``
        collection.
      TypeError: (NNX) a batch that is neither a tuple or list nor a dict with ``'inputs'``.

    References:
      Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
      arXiv 1803.05407 (its batch normalization step).

    Examples:
      The batches ``[0, 2]`` and ``[4, 8]`` have means 1 and 6 and (biased) variances 1
      and 4, so the statistics become mean 3.5 and variance 2.5:

      >>> import jax.numpy as jnp, jaxmerge
      >>> from flax import nnx
      >>> model = nnx.BatchNorm(1, rngs=nnx.Rngs(0))
      >>> data = [(jnp.asarray([[0.0], [2.0]]),), (jnp.asarray([[4.0], [8.0]]),)]
      >>> model = jaxmerge.update_batch_stats(model, data)
      >>> model.mean.get_value().tolist(), model.var.get_value().tolist()
      ([3.5], [2.5])
    """
    if isinstance(model, nnx.Module):
        return _update_nnx(model, data)
    if variables is None:
        raise JaxmergeError("variables are required with a Linen apply_fn")
    return _update_linen(model, variables, data)
