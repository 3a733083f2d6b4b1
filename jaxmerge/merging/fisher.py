"""Fisher-weighted averaging (Matena & Raffel, arXiv 2111.09832)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import _hyper
from jaxmerge._hyper import Range
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, leaf_spec
from jaxmerge.errors import JaxmergeError
from jaxmerge.merging.method import WEIGHTS, Param, merge_method


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


def _check_fishers(fishers: Sequence, spec: TreeSpec) -> None:
    """Every float leaf has a Fisher of its shape in every store, and no store has a Fisher of no leaf."""
    shapes = {spec.paths[i]: leaf_spec(spec.leaves[i]).shape for i in spec.float_indices()}
    known = set(spec.paths)
    for j, store in enumerate(fishers):
        names = set(store.names)
        if missing := sorted(set(shapes) - names):
            raise JaxmergeError(f"fishers[{j}] has no Fisher for {missing[0]!r}")
        if extra := sorted(names - known):
            raise JaxmergeError(f"fishers[{j}] has a Fisher for {extra[0]!r}, which is not a leaf of the models")
        for name, shape in shapes.items():
            if tuple(store.shape_dtype(name)[0]) != tuple(shape):
                raise JaxmergeError(f"fishers[{j}] {name!r}: shape {store.shape_dtype(name)[0]} != {shape} of the "
                                    "models")


def _fisher_scales(fishers: Sequence, spec: TreeSpec, how) -> jax.Array:
    """One factor per model that scales its Fisher to unit total mass (``'sum'``) or L2 norm
    (a pass over every Fisher, one leaf at a time)."""
    names = [spec.paths[i] for i in spec.float_indices()]
    if how in (True, "sum"):
        totals = [sum(jnp.sum(jnp.asarray(store.read(n), jnp.float32)) for n in names) for store in fishers]
    else:
        totals = [jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(store.read(n), jnp.float32))) for n in names))
                  for store in fishers]
    totals = jnp.stack(totals)
    return 1 / jnp.where(totals > 0, totals, 1)


def _nonnegative(fisher, j: int, path: str):
    """``fisher``, refused (when concrete) if it holds NaN, infinities or negative values."""
    if isinstance(fisher, jax.core.Tracer):
        return fisher
    values = np.asarray(fisher, np.float32)
    if not np.isfinite(values).all():
        raise JaxmergeError(f"fishers[{j}] has NaN or infinite values at {path!r}")
    if values.size and (lowest := float(values.min())) < 0:
        raise JaxmergeError(f"fishers[{j}] has negative values at {path!r} (min {lowest:g}); a Fisher is a mean "
                            "of squares")
    return fisher


def _fisher_plan(spec: TreeSpec, hp: dict, fishers: Sequence):
    w, favor_target, eps = hp["weights"], hp["favor_target"], _hyper.scalar_arg(hp["epsilon"])
    _hyper.check_nonzero_sums(w, "weights", spec)
    if favor_target:
        for path, row in zip(spec.paths, w):
            if isinstance(row, np.ndarray) and row[0] <= 0:
                raise JaxmergeError(f"favor_target needs a positive weight for models[0] (the target), got {row[0]} "
                                    f"at {path!r}")
    _check_fishers(fishers, spec)
    if hp["normalize_fishers"]:
        scales = _fisher_scales(fishers, spec, hp["normalize_fishers"])
        w = [None if row is None else jnp.asarray(row, jnp.float32) * scales for row in w]

    def leaf_fn(i, _, leaves):
        path = spec.paths[i]
        masses = [_nonnegative(store.read(path), j, path) for j, store in enumerate(fishers)]
        return fisher_kernel(leaves, masses, w[i], eps, favor_target=favor_target)
    return leaf_fn


@merge_method("fisher", base="none", plan=_fisher_plan, statistics="fishers", references=("2111.09832",), params=(
    dataclasses.replace(WEIGHTS, check=Range(0), config_required=False),
    Param("epsilon", "option", "the floor on the Fisher values", kind=float, check=Range(0, lo_open=True)),
    Param("normalize_fishers", "option", "scale each Fisher to unit total mass (True/'sum') or L2 norm ('l2')",
          choices=(False, True, "sum", "l2")),
    Param("favor_target", "option", "floor only models[0]'s Fisher, keeping its values where the others have none",
          kind=bool)))
def fisher_merge(models: Sequence[PyTree], fishers: Sequence[PyTree], weights=None, *, epsilon=1e-8,
                 normalize_fishers: Literal[False, True, "sum", "l2"] = False, favor_target: bool = False) -> PyTree:
    """Fisher-weighted average of models: per parameter, weighted by each model's Fisher.

    Per parameter, ``sum_i w_i F_i theta_i / sum_i w_i F_i`` with each Fisher floored at
    ``epsilon``, so parameters that no model's Fisher cares about fall back to the weighted
    average. With equal Fishers this is :func:`jaxmerge.average`. In a merge config
    (``merge_method: fisher``) each model's ``statistics`` parameter names its Fisher
    checkpoint.

    Args:
      models: the models; the output has ``models[0]``'s structure and dtypes.
      fishers: one diagonal Fisher per model, shaped like the models (for example from
        :func:`jaxmerge.diagonal_fisher`).
      weights: one non-negative per-leaf weight per model (``None``: equal).
      epsilon: the floor on the Fisher values, > 0.
      normalize_fishers: scale each model's Fisher before merging to unit total mass
        (``True`` or ``'sum'``), or to unit L2 norm over all leaves (``'l2'``, what the
        paper's code does), so that models with larger gradients do not dominate.
      favor_target: ``models[0]`` is the target (as in the paper's robust fine-tuning
        experiment): only its Fisher is floored, so parameters that the other models'
        Fishers do not cover keep the target's value.

    Returns:
      A pytree shaped like ``models[0]``.

    Raises:
      JaxmergeError: a Fisher missing for a leaf, of another shape, or for no leaf (naming
        ``fishers[i]`` and the path), negative Fisher values, negative weights or weights
        summing to 0, ``epsilon <= 0``.

    References:
      Matena & Raffel, "Merging models with Fisher-weighted averaging", arXiv 2111.09832.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"w": jnp.asarray([0.0, 0.0])}, {"w": jnp.asarray([4.0, 4.0])}
      >>> fa, fb = {"w": jnp.asarray([3.0, 1.0])}, {"w": jnp.asarray([1.0, 1.0])}
      >>> jaxmerge.fisher_merge([a, b], [fa, fb])["w"].tolist()
      [1.0, 2.0]
    """
