"""Fisher-weighted averaging (Matena & Raffel, arXiv 2111.09832)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import _hyper
from jaxmerge._tree import (
    PyTree,
    TreeSpec,
    acc_dtype,
    apply_leafwise,
    flatten_like,
    flatten_models,
)

NORMALIZATIONS = (False, True, "sum", "l2")


@functools.partial(jax.jit, static_argnames="favor_target")
def fisher_kernel(leaves: Sequence[jax.Array], fishers: Sequence[jax.Array], weights: jax.Array,
                  epsilon: jax.Array, *, favor_target: bool) -> jax.Array:
    """``sum_i w_i F_i x_i / sum_i w_i F_i`` with ``F_i = max(fisher_i, epsilon)``.

    With ``favor_target`` only the first model's Fisher is floored, so where no other model
    has any Fisher mass the result is the first model's value.
    """
    dtype = acc_dtype(leaves[0].dtype)
    w = weights.astype(dtype)
    floor = epsilon.astype(dtype)
    masses = [jnp.maximum(f.astype(dtype), floor) if (i == 0 or not favor_target) else f.astype(dtype)
              for i, f in enumerate(fishers)]
    numerator = sum(w[i] * m * x.astype(dtype) for i, (m, x) in enumerate(zip(masses, leaves)))
    denominator = sum(w[i] * m for i, m in enumerate(masses))
    return (numerator / denominator).astype(leaves[0].dtype)


def _fisher_scales(fisher_leaves: list[list], spec: TreeSpec, how) -> np.ndarray | jax.Array:
    """One factor per model that scales its Fisher to unit total mass (``'sum'``) or L2 norm."""
    how = "sum" if how is True else how
    floats = spec.float_indices()
    if how == "sum":
        totals = [sum(jnp.sum(leaves[i].astype(jnp.float32)) for i in floats) for leaves in fisher_leaves]
    else:
        totals = [jnp.sqrt(sum(jnp.sum(jnp.square(leaves[i].astype(jnp.float32))) for i in floats))
                  for leaves in fisher_leaves]
    totals = jnp.stack(totals)
    return 1 / jnp.where(totals > 0, totals, 1)


def _check_nonnegative(fisher_leaves: list[list], spec: TreeSpec) -> None:
    for j, leaves in enumerate(fisher_leaves):
        for i in spec.float_indices():
            leaf = leaves[i]
            if not isinstance(leaf, jax.core.Tracer) and (lowest := float(np.asarray(leaf).min())) < 0:
                raise ValueError(f"fishers[{j}] has negative values at {spec.paths[i]!r} "
                                 f"(min {lowest:g}); a Fisher is a mean of squares")


def fisher_plan(spec: TreeSpec, fisher_leaves: list[list], weights=None, *, epsilon=1e-8,
                normalize_fishers=False, favor_target: bool = False):
    """Leaf function for :func:`fisher_merge`; the model leaves come first, then the Fishers'."""
    if normalize_fishers not in NORMALIZATIONS:
        raise ValueError(f"normalize_fishers must be one of {NORMALIZATIONS}, got {normalize_fishers!r}")
    w = _hyper.resolve_models(weights, "weights", spec, default=1.0, check=_hyper.in_range(0, float("inf")))
    _hyper.check_nonzero_sums(w, "weights", spec)
    eps = _hyper.checked(epsilon, "epsilon", _hyper.positive)
    if favor_target:
        for path, row in zip(spec.paths, w):
            if isinstance(row, np.ndarray) and row[0] <= 0:
                raise ValueError(f"favor_target needs a positive weight for models[0] (the target), got {row[0]} "
                                 f"at {path!r}")
    _check_nonnegative(fisher_leaves, spec)
    if normalize_fishers:
        scales = _fisher_scales(fisher_leaves, spec, normalize_fishers)
        w = [None if row is None else jnp.asarray(row, jnp.float32) * scales for row in w]
    n = spec.num_models

    def leaf_fn(i, _, leaves):
        return fisher_kernel(leaves[:n], leaves[n:], w[i], _hyper.scalar_arg(eps), favor_target=favor_target)
    return leaf_fn


def fisher_merge(models: Sequence[PyTree], fishers: Sequence[PyTree], weights=None, *, epsilon=1e-8,
                 normalize_fishers=False, favor_target: bool = False) -> PyTree:
    """Fisher-weighted average of models (arXiv 2111.09832).

    Per parameter, ``sum_i w_i F_i theta_i / sum_i w_i F_i`` with each Fisher floored at
    ``epsilon``, so parameters that no model's Fisher cares about fall back to the weighted
    average. With equal Fishers this is :func:`jaxmerge.average`.

    Args:
      models: the models; the output has ``models[0]``'s structure and dtypes.
      fishers: one diagonal Fisher per model, shaped like the models (for example from
        :func:`jaxmerge.diagonal_fisher`).
      weights: one non-negative per-leaf weight per model (``None``: equal).
      epsilon: the floor on the Fisher values.
      normalize_fishers: scale each model's Fisher before merging to unit total mass
        (``True`` or ``'sum'``), or to unit L2 norm over all leaves (``'l2'``, what the
        paper's code does), so that models with larger gradients do not dominate.
      favor_target: ``models[0]`` is the target (as in the paper's robust fine-tuning
        experiment): only its Fisher is floored, so parameters that the other models'
        Fishers do not cover keep the target's value.

    Raises:
      ValueError: fishers whose structure or shapes differ from the models (naming
        ``fishers[i]`` and the path), negative Fisher values, negative weights or weights
        summing to 0, ``epsilon <= 0``.
    """
    spec, _, model_leaves = flatten_models(models)
    fisher_leaves = flatten_like(spec, fishers, "fishers")
    plan = fisher_plan(spec, fisher_leaves, weights, epsilon=epsilon, normalize_fishers=normalize_fishers,
                       favor_target=favor_target)
    return apply_leafwise(spec, plan, None, model_leaves + fisher_leaves)
