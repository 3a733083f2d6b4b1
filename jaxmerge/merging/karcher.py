"""Karcher (Riemannian) mean of models on the unit sphere, per leaf."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxmerge import _hyper
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, apply_leafwise, flatten_models


@functools.partial(jax.jit, static_argnames="max_iter")
def karcher_kernel(leaves: Sequence[jax.Array], weights: jax.Array, tol: jax.Array, *, max_iter: int) -> jax.Array:
    """Weighted Karcher mean of the leaves' directions, scaled by their weighted mean norm.

    Each leaf ``x_i`` is split into its norm ``r_i`` and direction ``u_i``. Directions of
    leaves with ``r_i > tol`` are averaged on the sphere by Riemannian gradient steps
    ``m <- exp_m(sum_i a_i log_m(u_i))`` (at most ``max_iter``, stopping when the step is
    below ``tol``), starting from the normalised weighted mean direction. The result is
    ``(sum_i a_i r_i) m`` with ``a = weights / sum(weights)``.
    """
    dtype = acc_dtype(leaves[0].dtype)
    xs = [leaf.astype(dtype) for leaf in leaves]
    alphas = weights.astype(dtype) / weights.astype(dtype).sum()
    norms = jnp.stack([jnp.linalg.norm(x) for x in xs])
    units = [x / jnp.where(r > 0, r, 1) for x, r in zip(xs, norms)]
    valid = norms > tol
    a = jnp.where(valid, alphas, 0)
    a = a / jnp.where(a.sum() > 0, a.sum(), 1)

    def unit(v):
        n = jnp.linalg.norm(v)
        return v / jnp.where(n > 0, n, 1), n

    start, start_norm = unit(sum(a[i] * u for i, u in enumerate(units)))
    first_valid = sum(jnp.where(jnp.argmax(valid) == i, 1, 0).astype(dtype) * u for i, u in enumerate(units))
    mean = jnp.where(start_norm < tol, first_valid, start)

    def tangent_step(state):
        step, m, _ = state
        tangent = jnp.zeros_like(m)
        for i, u in enumerate(units):
            dot = jnp.clip(jnp.sum(m * u), -1, 1)
            theta = jnp.arccos(dot)
            scale = jnp.where(theta < tol, 0, theta / jnp.where(theta < tol, 1, jnp.sin(theta)))
            tangent = tangent + a[i] * scale * (u - dot * m)
        size = jnp.linalg.norm(tangent)
        moved = jnp.cos(size) * m + jnp.sin(size) * tangent / jnp.where(size > 0, size, 1)
        moved, moved_norm = unit(moved)
        moved = jnp.where(moved_norm > tol, moved, m)
        done = size < tol
        return step + 1, jnp.where(done, m, moved), done

    _, mean, _ = lax.while_loop(lambda s: (s[0] < max_iter) & ~s[2], tangent_step,
                                (jnp.zeros((), jnp.int32), mean, jnp.zeros((), bool)))
    result = jnp.where(valid.any(), jnp.sum(alphas * norms) * mean, jnp.zeros_like(mean))
    return result.astype(leaves[0].dtype)


def karcher_plan(spec: TreeSpec, weights=None, *, max_iter: int = 10, tol: float = 1e-5):
    """Leaf function for :func:`karcher`."""
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    tol = _hyper.checked(tol, "tol", _hyper.positive)
    w = _hyper.resolve_models(weights, "weights", spec, default=1.0)
    _hyper.check_nonzero_sums(w, "weights", spec)

    def leaf_fn(i, _, leaves):
        if len(leaves) == 1:
            return leaves[0]
        return karcher_kernel(leaves, w[i], _hyper.scalar_arg(tol), max_iter=max_iter)
    return leaf_fn


def karcher(models: Sequence[PyTree], weights=None, *, max_iter: int = 10, tol: float = 1e-5) -> PyTree:
    """Karcher mean of models (mergekit's ``karcher``), per leaf.

    Treats each leaf as a point ``r u`` (norm times direction) and returns the weighted
    Riemannian (Karcher) mean of the directions on the unit sphere, scaled by the weighted
    mean of the norms. With two models and equal weights this is SLERP at ``t = 0.5``
    with the norms averaged.

    Args:
      models: the models to merge; the output has ``models[0]``'s structure and dtypes.
      weights: one per-leaf weight per model (``None``: equal, as in mergekit).
      max_iter: maximum number of Riemannian gradient steps.
      tol: convergence threshold on the step size; leaves with norm at most ``tol`` do
        not contribute a direction.
    """
    spec, _, leaves = flatten_models(models)
    return apply_leafwise(spec, karcher_plan(spec, weights, max_iter=max_iter, tol=tol), None, leaves)
