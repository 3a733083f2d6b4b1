"""Karcher (Riemannian) mean of models on the unit sphere, per leaf."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge import _blocks, _hyper
from jaxmerge._hyper import Range
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, compute_dtype, exact_jit
from jaxmerge.merging.linear import average_kernel
from jaxmerge.merging.method import WEIGHTS, Param, merge_method


def karcher_kernel(leaves: Sequence[jax.Array], weights: jax.Array, tol: jax.Array, *, max_iter: int,
                   exact: bool = False) -> jax.Array:
    """Weighted Karcher mean of the leaves' directions, scaled by their weighted mean norm.

    Each leaf ``x_i`` is split into its norm ``r_i`` and direction ``u_i``. Directions of
    leaves with ``r_i > tol`` are averaged on the sphere by Riemannian gradient steps
    ``m <- exp_m(sum_i a_i log_m(u_i))`` (at most ``max_iter``, stopping when the step is
    below ``tol``), starting from the normalised weighted mean direction. The result is
    ``(sum_i w_i r_i) m`` with ``w`` the weights normalised to sum 1 and ``a`` those of the
    valid leaves normalised again.

    Every step keeps ``m`` in the span of the directions, so in float32 (float64 for float64
    leaves) the steps run on the coefficients of ``m`` and the directions' Gram matrix: one
    pass over the leaves for the Gram matrix and one for the weighted sum, kernels that compile
    in a fraction of the time of iterating over the arrays. ``exact`` 16-bit leaves are
    iterated as arrays, each step rounded to 16 bits where mergekit's torch code rounds.
    """
    if compute_dtype(leaves[0].dtype, exact) != acc_dtype(leaves[0].dtype):
        return _rounded_karcher(leaves, weights, tol, max_iter=max_iter, exact=exact)
    coefficients = _sphere_mean(_inner_products(leaves), weights, tol, max_iter=max_iter)
    return average_kernel(leaves, coefficients, normalize=False)


def _pairs(count: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(count) for j in range(i, count)]


@jax.jit
def _inner_products(leaves: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """``<x_i, x_j>`` for the pairs ``i <= j`` (:func:`_pairs`), accumulated in float32 (float64
    for float64). A tuple: assembling the matrix here would double the kernel's compile time."""
    acc = acc_dtype(leaves[0].dtype)
    return _blocks.sums(lambda c: [c[i].astype(acc) * c[j].astype(acc) for i, j in _pairs(len(leaves))], leaves, acc)


def _step_weights(weights: jax.Array, norms: jax.Array, tol) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(w, valid, a)``: the weights normalised to sum 1 (in the norms' dtype), which leaves
    have a norm above ``tol``, and the valid leaves' weights normalised again (the steps')."""
    alphas = weights.astype(norms.dtype) / weights.astype(norms.dtype).sum()
    valid = norms > tol
    a = jnp.where(valid, alphas, 0)
    return alphas, valid, a / jnp.where(a.sum() > 0, a.sum(), 1)


OPPOSITE = 2.0 ** -17  # 1 + cos(theta) at which a direction counts as opposite to the mean (theta > pi - 0.004)


@functools.partial(jax.jit, static_argnames="max_iter")
def _sphere_mean(products: Sequence[jax.Array], weights: jax.Array, tol: jax.Array, *, max_iter: int) -> jax.Array:
    """The coefficients ``c`` of the leaves whose sum ``sum_i c_i x_i`` is the Karcher merge
    (see :func:`karcher_kernel`), from their inner products (:func:`_inner_products`): the mean
    direction is ``m = sum_i b_i u_i``, and each step's dot products, tangent and norms are
    ``G b`` and quadratic forms ``b^T G b`` in the directions' Gram matrix ``G``.

    A direction at most ``OPPOSITE`` from ``-m`` (``1 + <m, u_i> <= OPPOSITE``) adds no step:
    its part orthogonal to ``m``, of norm ``sin(theta_i)``, is below what a float32 Gram matrix
    resolves (a direction exactly opposite adds none in mergekit's arithmetic either, where
    ``u_i - <m, u_i> m`` is 0), and the step would divide by it."""
    acc, count = products[0].dtype, weights.shape[0]
    rows, columns = np.asarray(_pairs(count)).T
    gram = jnp.zeros((count, count), acc).at[rows, columns].set(jnp.stack(products))
    gram = gram.at[columns, rows].set(gram[rows, columns])
    norms = jnp.sqrt(jnp.diagonal(gram))
    divisors = jnp.where(norms == 0, 1, norms)
    g = jnp.clip(gram / divisors[:, None] / divisors[None, :], -1, 1)
    alphas, valid, a = _step_weights(weights, norms, tol)

    def norm(b):
        return jnp.sqrt(jnp.maximum(b @ g @ b, 0))

    def normalized(b, size):
        return b / jnp.where(size > 0, size, 1)
    start = norm(a)
    first_valid = jax.nn.one_hot(jnp.argmax(valid), count, dtype=acc)
    mean = jnp.where(start < tol, first_valid, normalized(a, start))  # b of the start

    def tangent_step(state):
        step, b, _ = state
        dots = jnp.clip(g @ b, -1, 1)
        thetas = jnp.arccos(dots)
        skips = (thetas < tol) | (1 + dots <= OPPOSITE) | ~valid
        coefs = jnp.where(skips, 0, a * thetas / jnp.where(skips, 1, jnp.sin(thetas)))
        tangent = coefs - jnp.sum(coefs * dots) * b  # sum_i coefs_i (u_i - dots_i m)
        size = norm(tangent)
        moved = jnp.cos(size) * b + jnp.sin(size) * normalized(tangent, size)
        moved_norm = norm(moved)
        moved = jnp.where(moved_norm > tol, normalized(moved, moved_norm), moved)
        done = size < tol
        return step + 1, jnp.where(done, b, moved), done

    _, mean, _ = lax.while_loop(lambda s: (s[0] < max_iter) & ~s[2], tangent_step,
                                (jnp.zeros((), jnp.int32), mean, jnp.zeros((), bool)))
    return jnp.where(valid.any() & (norms > 0), jnp.sum(alphas * norms) * mean / divisors, 0)


@exact_jit(("max_iter",))
def _rounded_karcher(leaves: Sequence[jax.Array], weights: jax.Array, tol: jax.Array, *, max_iter: int,
                     exact: bool = False) -> jax.Array:
    """:func:`karcher_kernel` by steps over the arrays: the directions are computed in the
    compute dtype (the leaves' own, ``exact``), rounded after each operation as mergekit's
    torch code rounds them; norms and dot products are accumulated in float32."""
    dtype = compute_dtype(leaves[0].dtype, exact)
    acc = acc_dtype(dtype)
    count = len(leaves)

    def norms_of(values_of, arrays):
        """The norms of the values ``values_of(chunks)`` makes from ``arrays``, block by block."""
        return jnp.sqrt(jnp.stack(_blocks.sums(lambda c: [jnp.square(v.astype(acc)) for v in values_of(c)],
                                               arrays, acc)))

    def divided(v, n):  # a tensor over a float32 scalar, rounded to the compute dtype (torch's promotion)
        return (v.astype(acc) / n).astype(dtype)

    def times(c, v):  # a float32 scalar times a tensor, rounded to the compute dtype
        return (c * v.astype(acc)).astype(dtype)

    norms = norms_of(lambda xs: [x.astype(dtype) for x in xs], leaves)

    def unit(xs, i, step=None):
        """Direction ``i`` of the leaves' values ``xs``; in the loop it is divided by the norm
        times ``step >= 0`` (exactly the norm), which XLA cannot prove loop-invariant, so it
        does not hoist the directions out of the loop into arrays of their own."""
        r = norms[i] if step is None else norms[i] * (step >= 0).astype(norms.dtype)
        x = xs[i].astype(dtype)
        return jnp.where(r == 0, jnp.zeros_like(x), divided(x, jnp.where(r == 0, 1, r)))
    alphas, valid, a = _step_weights(weights, norms, tol)

    def start(xs):
        return functools.reduce(lambda m, i: m + times(a[i], unit(xs, i)), range(count),
                                jnp.zeros_like(xs[0], dtype))
    start_norm = norms_of(lambda xs: [start(xs)], leaves)[0]

    def first_valid(xs):
        return functools.reduce(lambda m, i: jnp.where(jnp.argmax(valid) == i, unit(xs, i), m), range(count),
                                unit(xs, 0))
    mean = jnp.where(start_norm < tol, first_valid(leaves),
                     divided(start(leaves), jnp.where(start_norm > 0, start_norm, 1)))

    def tangent_step(state):
        step, m, _ = state
        dots = _blocks.sums(lambda c: [c[-1].astype(acc) * unit(c, i, step).astype(acc) for i in range(count)],
                            [*leaves, m], acc)
        dots = [jnp.clip(d.astype(dtype), -1, 1) for d in dots]  # torch.dot: exact products
        thetas = [jnp.arccos(d) for d in dots]
        skips = [(theta.astype(acc) < tol) | ~valid[i] for i, theta in enumerate(thetas)]
        coefs = [times(a[i], theta / jnp.where(skip, 1, jnp.sin(theta)))
                 for i, (theta, skip) in enumerate(zip(thetas, skips))]

        def tangent(c):  # c: blocks of the leaves and of m, or the whole arrays
            t = jnp.zeros_like(c[-1])
            for i in range(count):
                t = jnp.where(skips[i], t, t + coefs[i] * (unit(c, i, step) - dots[i] * c[-1]))
            return t
        size = norms_of(lambda c: [tangent(c)], [*leaves, m])[0]
        done = size < tol

        def moved(c):
            return times(jnp.cos(size), c[-1]) + times(jnp.sin(size), divided(tangent(c), jnp.where(size > 0, size, 1)))
        moved_norm = norms_of(lambda c: [moved(c)], [*leaves, m])[0]
        new = moved([*leaves, m])
        new = jnp.where(moved_norm > tol, divided(new, jnp.where(moved_norm > 0, moved_norm, 1)), new)
        return step + 1, jnp.where(done, m, new), done

    _, mean, _ = lax.while_loop(lambda s: (s[0] < max_iter) & ~s[2], tangent_step,
                                (jnp.zeros((), jnp.int32), mean, jnp.zeros((), bool)))
    result = jnp.where(valid.any(), times(jnp.sum(alphas * norms), mean), jnp.zeros_like(mean))
    return result.astype(leaves[0].dtype)


def _karcher_plan(spec: TreeSpec, hp: dict):
    w, tol, max_iter = hp["weights"], _hyper.scalar_arg(hp["tol"]), hp["max_iter"]
    _hyper.check_nonzero_sums(w, "weights", spec)

    def leaf_fn(i, _, leaves):
        if len(leaves) == 1:
            return leaves[0]
        return karcher_kernel(leaves, w[i], tol, max_iter=max_iter, exact=hp["exact"])
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
