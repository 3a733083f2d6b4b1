"""MagMax (Marczak et al., arXiv 2407.06322): per parameter, the task vector entry of largest magnitude."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmerge import _hyper
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype
from jaxmerge.merging.method import LAMBDA, merge_method


@jax.jit
def magmax_kernel(base: jax.Array, leaves: Sequence[jax.Array], lambda_: jax.Array) -> jax.Array:
    """``base + lambda_ * d*``, ``d*`` the entry of largest ``|leaf_i - base|`` (first on ties)."""
    dtype = acc_dtype(base.dtype)
    base32 = base.astype(dtype)
    chosen = leaves[0].astype(dtype) - base32
    for leaf in leaves[1:]:
        delta = leaf.astype(dtype) - base32
        chosen = jnp.where(jnp.abs(delta) > jnp.abs(chosen), delta, chosen)
    return (base32 + lambda_.astype(dtype) * chosen).astype(base.dtype)


def _magmax_plan(spec: TreeSpec, hp: dict):
    lam = hp["lambda_"]
    return lambda i, base, leaves: magmax_kernel(base, leaves, _hyper.scalar_arg(lam[i]))


@merge_method("magmax", base="required", plan=_magmax_plan, references=("2407.06322",), params=(LAMBDA,))
def magmax(base: PyTree, models: Sequence[PyTree], *, lambda_=1.0) -> PyTree:
    """MagMax: per parameter, the task vector entry of largest magnitude, added to the base.

    For every parameter, takes the task vector ``theta_i - base`` whose entry has the
    largest magnitude across models (the first on ties), and adds it to the base scaled by
    ``lambda_``.

    Args:
      base: the pre-trained model; the output has its structure and dtypes.
      models: fine-tuned models (for continual learning, the fine-tunes of each task).
      lambda_: per-leaf scale of the selected task vector.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base, a structure or shape mismatch, or a non-finite ``lambda_``.

    References:
      Marczak et al., "MagMax: leveraging model merging for seamless continual learning",
      arXiv 2407.06322.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(2)}
      >>> tunes = [{"w": jnp.asarray([1.0, -3.0])}, {"w": jnp.asarray([-2.0, 1.0])}]
      >>> jaxmerge.magmax(base, tunes)["w"].tolist()
      [-2.0, -3.0]
    """
