"""MagMax (Marczak et al., arXiv 2407.06322): per parameter, the task vector of largest magnitude."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmerge import _hyper
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, apply_leafwise, flatten_models


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


def magmax_plan(spec: TreeSpec, *, lambda_=1.0):
    """Leaf function for :func:`magmax`."""
    if not spec.has_base:
        raise ValueError("magmax needs a base model (base is None)")
    lam = _hyper.resolve(lambda_, "lambda_", spec)
    return lambda i, base, leaves: magmax_kernel(base, leaves, _hyper.scalar_arg(lam[i]))


def magmax(base: PyTree, models: Sequence[PyTree], *, lambda_=1.0) -> PyTree:
    """MagMax merge (arXiv 2407.06322): maximum-magnitude selection of task vectors.

    For every parameter, takes the task vector ``theta_i - base`` whose entry has the
    largest magnitude across models, and adds it to the base scaled by ``lambda_``.

    Args:
      base: the pre-trained model; the output has its structure and dtypes.
      models: fine-tuned models (for continual learning, the fine-tunes of each task).
      lambda_: per-leaf scale of the selected task vector.
    """
    if base is None:
        raise ValueError("magmax needs a base model (base is None)")
    spec, base_leaves, leaves = flatten_models(models, base)
    return apply_leafwise(spec, magmax_plan(spec, lambda_=lambda_), base_leaves, leaves)
