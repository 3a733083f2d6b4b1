"""LAWA: the mean of the latest k checkpoints, as an optax wrapper."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmerge._tree import PyTree, is_float
from jaxmerge.averaging._wrapper import check, check_dtype, counter, registers_average, shadow, wrap
from jaxmerge.errors import JaxmergeError


def _window_mean(state: LawaState) -> PyTree:
    filled = jnp.minimum(state.num_snapshots, state.window_size())
    valid = jnp.arange(state.window_size()) < filled

    def mean(buffer):
        if not is_float(buffer.dtype):
            return buffer[0]
        mask = valid.reshape((-1,) + (1,) * (buffer.ndim - 1))
        total = jnp.sum(jnp.where(mask, buffer.astype(jnp.float32), 0), axis=0)
        count = jnp.maximum(filled, 1).astype(jnp.float32)
        return jnp.where(filled > 0, total / count, buffer[0].astype(jnp.float32)).astype(buffer.dtype)
    return jax.tree.map(mean, state.snapshots)


@registers_average(_window_mean)
class LawaState(NamedTuple):
    """State of :func:`lawa`: a ring buffer of the latest ``k`` snapshots (axis 0 of every
    leaf of ``snapshots``), ``num_snapshots`` taken so far, ``count`` updates seen."""
    count: jax.Array
    num_snapshots: jax.Array
    snapshots: PyTree
    inner_state: optax.OptState

    def window_size(self) -> int:
        return jax.tree.leaves(self.snapshots)[0].shape[0]


def lawa(inner: optax.GradientTransformation, *, k: int, every=1, dtype=None) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` and keep the latest ``k`` parameter snapshots; average them (LAWA).

    A snapshot of ``theta = params + updates`` is taken after every ``every``-th update
    (updates ``every - 1``, ``2 every - 1``, ... counting from 0) into a ring buffer of
    ``k`` slots; :func:`jaxmerge.averaged_params` is the equal-weight mean of the
    ``min(k, n)`` snapshots in it after ``n`` snapshots, ``(theta_{n-k+1} + ... +
    theta_n) / k`` once the window is full, and the initial parameters before the first
    snapshot. The updates of ``inner`` are returned unchanged. Memory: ``k`` copies of the
    parameters.

    Args:
      inner: the optimizer to run.
      k: window size (an int >= 1); static, so pass it in ``static_args`` to
        ``optax.inject_hyperparams``.
      every: snapshot interval in updates (>= 1), e.g. the number of steps per epoch.
      dtype: dtype of the snapshots of float parameters (None: each parameter's own
        dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

    Raises:
      TypeError: ``inner`` is not an ``optax.GradientTransformation``.
      JaxmergeError: ``k`` is not an int >= 1, or ``every < 1`` (a traced ``every`` is not
        checked); from ``update``, when it is called without ``params``.

    References:
      Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest
      Weight Averaging", arXiv 2209.14981.

    Examples:
      SGD with learning rate 0.5 and a constant gradient moves ``w`` from ``[0, 4]`` to
      ``[-1, 6]``, ``[-2, 8]`` and ``[-3, 10]``; with ``k=2`` the average is the mean of
      the last two, ``[-2.5, 9]``:

      >>> import jax, jax.numpy as jnp, optax, jaxmerge
      >>> params = {"w": jnp.asarray([0.0, 4.0])}
      >>> grads = {"w": jnp.asarray([2.0, -4.0])}
      >>> tx = jaxmerge.lawa(optax.sgd(0.5), k=2)
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(3):
      ...     updates, state = update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> jaxmerge.averaged_params(state)["w"].tolist()
      [-2.5, 9.0]
    """
    if not isinstance(k, int) or k < 1:
        raise JaxmergeError(f"k must be an int >= 1, got {k!r}")
    check_dtype(dtype)
    check(every, "every", lambda v: v >= 1, "must be >= 1")

    def init_average(params, inner_state):
        buffer = jax.tree.map(lambda p: jnp.broadcast_to(p, (k,) + p.shape), shadow(params, dtype))
        return LawaState(counter(), counter(), buffer, inner_state)

    def update_average(state, inner_state, new_params):
        taking = (state.count + 1) % every == 0
        slot = state.num_snapshots % k

        def store(buffer, p):  # rewrites one slot only, in place when the state is donated
            return buffer.at[slot].set(jnp.where(taking, jnp.asarray(p, buffer.dtype), buffer[slot]))
        snapshots = jax.tree.map(store, state.snapshots, new_params)
        return LawaState(optax.safe_increment(state.count), state.num_snapshots + taking.astype(jnp.int32),
                         snapshots, inner_state)

    return wrap("lawa", inner, init_average, update_average)
