"""Karcher (Riemannian) mean of models on the unit sphere, per leaf."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxmerge import _hyper
from jaxmerge._hyper import Range
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype
from jaxmerge.merging.method import WEIGHTS, Param, merge_method


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


def _karcher_plan(spec: TreeSpec, hp: dict):
    w, tol, max_iter = hp["weights"], _hyper.scalar_arg(hp["tol"]), hp["max_iter"]
    _hyper.check_nonzero_sums(w, "weights", spec)

    def leaf_fn(i, _, leaves):
        if len(leaves) == 1:
            return leaves[0]
        return karcher_kernel(leaves, w[i], tol, max_iter=max_iter)
    return leaf_fn


@merge_method("karcher", base="none", plan=_karcher_plan, references=("2603.04972",), params=(
    dataclasses.replace(WEIGHTS, config=None),
    Param("max_iter", "option", "maximum number of Riemannian gradient steps", kind=int, check=Range(0)),
    Param("tol", "option", "convergence threshold on the step size", kind=float, check=Range(0, lo_open=True))))
def karcher(models: Sequence[PyTree], weights=None, *, max_iter: int = 10, tol: float = 1e-5) -> PyTree:
    """Karcher mean of models, mergekit's ``karcher``: the Riemannian mean of directions, per leaf.

    Treats each leaf as a point ``r u`` (norm times direction) and returns the weighted
    Riemannian (Karcher) mean of the directions on the unit sphere, scaled by the weighted
    mean of the norms. With two models and equal weights this is SLERP at ``t = 0.5``
    with the norms averaged.

    Args:
      models: the models to merge; the output has ``models[0]``'s structure and dtypes.
      weights: one per-leaf weight per model (``None``: equal, as in mergekit, whose
        configs do not set them).
      max_iter: maximum number of Riemannian gradient steps.
      tol: convergence threshold on the step size; leaves with norm at most ``tol`` do
        not contribute a direction.

    Returns:
      A pytree shaped like ``models[0]``.

    Raises:
      JaxmergeError: a structure or shape mismatch, weights summing to 0, or a bad
        ``max_iter`` or ``tol``.

    References:
      The Karcher mean on the sphere, as mergekit's ``karcher`` method (arXiv 2603.04972).

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"w": jnp.asarray([2.0, 0.0])}, {"w": jnp.asarray([0.0, 2.0])}
      >>> [round(x, 4) for x in jaxmerge.karcher([a, b])["w"].tolist()]
      [1.4142, 1.4142]
    """
