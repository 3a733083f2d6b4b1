"""What every averaging wrapper shares: running the inner optimizer, tracking the parameters
after each step, the shadow dtype, argument checks, and finding averages in any state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmerge._tree import PyTree, is_float
from jaxmerge.errors import JaxmergeError

# state type -> function returning the averaged parameters held in such a state
_AVERAGES: dict[type, Callable[[Any], PyTree]] = {}


def registers_average(read: Callable[[Any], PyTree]):
    """Class decorator: mark a NamedTuple state as holding averaged parameters."""
    def register(cls):
        _AVERAGES[cls] = read
        return cls
    return register


def check_dtype(dtype) -> None:
    """Refuse an averaging ``dtype`` that is neither None nor a floating dtype (an integer
    average would truncate every update)."""
    try:
        floating = dtype is None or jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise JaxmergeError(f"dtype must be a floating dtype (e.g. jnp.float32) or None, got {dtype!r}")


def shadow(params: PyTree, dtype) -> PyTree:
    """A copy of ``params`` for averaging: float leaves in ``dtype`` (their own if None).

    Always a new buffer, never an alias of ``params``, so that a training step may donate
    both the parameters and the optimizer state.
    """
    return jax.tree.map(lambda p: jnp.array(p, dtype=dtype if is_float(p.dtype) and dtype else None, copy=True),
                        params)


def counter() -> jax.Array:
    """A fresh int32 zero (each state field its own buffer, so states can be donated)."""
    return jnp.zeros([], jnp.int32)


def blend(average: PyTree, params: PyTree, keep) -> PyTree:
    """``keep * average + (1 - keep) * params`` per float leaf, in float32 (or wider), cast to
    the average's dtype; ``keep`` is a traced scalar (1 keeps the average, 0 copies params)."""
    def one(a, p):
        if not is_float(a.dtype):
            return jnp.asarray(p, a.dtype)
        dtype = jnp.promote_types(a.dtype, jnp.float32) if a.dtype != jnp.float64 else a.dtype
        k = jnp.asarray(keep, dtype)
        return (k * a.astype(dtype) + (1 - k) * p.astype(dtype)).astype(a.dtype)
    return jax.tree.map(one, average, params)


def check(value, name: str, valid: Callable[[float], bool], message: str) -> None:
    """Raise ``ValueError(f"{name} {message}, got {value}")`` for a concrete invalid value (a
    ``TypeError`` for one that is not a real number); traced values (inside ``jax.jit`` or
    ``optax.inject_hyperparams``) are not checked."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (str, bytes, bool)) or not np.isrealobj(value) or np.ndim(value) != 0:
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not valid(float(value)):
        raise JaxmergeError(f"{name} {message}, got {value!r}")


def wrap(name: str, inner: optax.GradientTransformation, init_average: Callable, update_average: Callable
         ) -> optax.GradientTransformation:
    """An optax transformation that runs ``inner`` and keeps an average of the parameters.

    ``init_average(params, inner_state) -> state``; ``update_average(state, inner_state,
    new_params) -> state``, where ``new_params = params + updates`` are the parameters
    after this step. States are NamedTuples with an ``inner_state`` field.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"{name} wraps an optax.GradientTransformation, got {type(inner).__name__}")

    def init(params):
        return init_average(params, inner.init(params))

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise JaxmergeError(f"{name} averages the parameters, so it needs them: call "
                             "tx.update(grads, opt_state, params)")
        updates, inner_state = optax.with_extra_args_support(inner).update(
            updates, state.inner_state, params, **extra_args)
        return updates, update_average(state, inner_state, optax.apply_updates(params, updates))

    return optax.GradientTransformationExtraArgs(init, update)


def plain(tree):
    """``tree`` with Flax NNX variables replaced by their values (``nnx.Optimizer`` keeps
    optimizer state leaves in ``nnx.OptState`` variables)."""
    return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, tree,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def averaging_states(opt_state) -> list:
    """Every averaging state inside a (nested) optimizer state, outer ones first, in tree order."""
    found = []
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: type(x) in _AVERAGES):
        if type(leaf) in _AVERAGES:
            found += [leaf] + averaging_states(leaf.inner_state)
    return found


def averaged_params(opt_state, *, index: int = 0) -> PyTree:
    """The averaged parameters kept by a jaxmerge averaging wrapper anywhere in ``opt_state``.

    Finds the states of :func:`jaxmerge.ema`, :func:`jaxmerge.swa`, :func:`jaxmerge.lawa`,
    :func:`jaxmerge.bema` and :func:`jaxmerge.power_ema` inside ``opt_state``, outer wrappers
    before the ones they wrap, otherwise in tree order, and reads the average of the
    ``index``-th one: the EMA (divided by ``1 - prod(decays)`` for ``ema(..., debias=True)``),
    the SWA running mean, the mean of the LAWA window, the bias-corrected BEMA output, or the
    power-function EMA of the first ``sigma_rel``. It works through ``optax.chain``,
    ``optax.inject_hyperparams``, ``optax.MultiSteps``, ``optax.contrib`` wrappers and Flax's
    ``nnx.Optimizer`` (pass ``optimizer.opt_state``; the result then has the structure of
    the ``nnx.State`` of the parameters).

    Args:
      opt_state: an optimizer state that holds at least one averaging state.
      index: which average, when the state holds several (0: the outermost wrapper).

    Returns:
      A pytree shaped like the parameters, with float leaves in the wrapper's ``dtype``.

    Raises:
      JaxmergeError: the state holds no averaging state, or fewer than ``index + 1``.

    References:
      The averages it reads: SWA, Izmailov et al., arXiv 1803.05407; LAWA, Kaddour,
      arXiv 2209.14981; BEMA, Block & Zhang, arXiv 2508.00180; power-function EMA,
      Karras et al., arXiv 2312.02696.

    Examples:
      An EMA (decay 0.5) around SWA around SGD; one step moves ``w`` from 0 to 2, so the
      SWA mean is 2 and the EMA ``0.5 * 0 + 0.5 * 2 = 1``:

      >>> import jax, jax.numpy as jnp, optax, jaxmerge
      >>> params = {"w": jnp.asarray([0.0])}
      >>> tx = jaxmerge.ema(jaxmerge.swa(optax.sgd(1.0)), decay=0.5)
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> _, state = update({"w": jnp.asarray([-2.0])}, state, params)
      >>> jaxmerge.averaged_params(state)["w"].tolist()
      [1.0]
      >>> jaxmerge.averaged_params(state, index=1)["w"].tolist()
      [2.0]
    """
    states = averaging_states(opt_state)
    if not states:
        raise JaxmergeError("opt_state holds no averaged parameters: wrap the optimizer with jaxmerge.ema, swa, "
                         "lawa, bema or power_ema")
    if index >= len(states):
        raise JaxmergeError(f"opt_state holds {len(states)} averages, so index={index} is out of range")
    state = plain(states[index])
    return _AVERAGES[type(state)](state)
