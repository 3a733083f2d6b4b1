"""NearSwap: take the other model's value only where it is already near the base's."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmerge import _hyper
from jaxmerge._hyper import Range
from jaxmerge._tree import PyTree, TreeSpec, compute_dtype, exact_jit, scaled
from jaxmerge.merging.method import Param, merge_method


@exact_jit()
def nearswap_kernel(a: jax.Array, b: jax.Array, t: jax.Array, *, exact: bool = False) -> jax.Array:
    """``w b + (1 - w) a`` with ``w = clip(t / max(|a - b|, 1e-6), 0, 1)``, in float32 (``exact``:
    as mergekit computes it in ``a``'s dtype)."""
    dtype = compute_dtype(a.dtype, exact)
    a_c, b_c = a.astype(dtype), b.astype(dtype)
    distance = jnp.maximum(jnp.abs(a_c - b_c), 1e-6)
    weight = jnp.clip(scaled(1 / distance, t), 0, 1)  # torch's number / tensor: reciprocal, then product
    return (weight * b_c + (1 - weight) * a_c).astype(a.dtype)


def _nearswap_plan(spec: TreeSpec, hp: dict):
    ts = hp["t"]
    return lambda i, _, leaves: nearswap_kernel(*leaves, _hyper.scalar_arg(ts[i]), exact=hp["exact"])


@merge_method("nearswap", base="pair", plan=_nearswap_plan, params=(
    Param("t", "leaf", "the distance within which the other model's value is taken", check=Range(0)),))
def nearswap(a: PyTree, b: PyTree, t) -> PyTree:
    """NearSwap, mergekit's ``nearswap``: move each parameter of ``a`` toward ``b`` when they are close.

    Per entry, ``w = clip(t / |a - b|, 0, 1)`` (the distance floored at 1e-6) and the result
    is ``w b + (1 - w) a``: entries of ``b`` within ``t`` of ``a`` are taken whole, farther
    ones only in part, so ``a`` keeps what sets it apart. Computed in float32.

    Args:
      a: the base model (in a merge config, the ``base_model``); the output has its
        structure and dtypes.
      b: the other model.
      t: the distance scale, a non-negative per-leaf hyperparameter.

    Returns:
      A pytree shaped like ``a``.

    Raises:
      JaxmergeError: a structure or shape mismatch, or a negative or non-finite ``t``.

    References:
      mergekit's ``nearswap`` method (arcee-ai/mergekit; alchemonaut, QuartetAnemoi-70B).

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"w": jnp.asarray([0.0, 0.0, 0.0])}, {"w": jnp.asarray([0.1, 0.5, 2.0])}
      >>> [round(x, 4) for x in jaxmerge.nearswap(a, b, 0.2)["w"].tolist()]  # weights 1, 0.4, 0.1
      [0.1, 0.2, 0.2]
    """
