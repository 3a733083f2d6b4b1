"""Linear merges: weighted average and linear interpolation.

Each method is a jitted leaf kernel, a *plan* that turns a :class:`~jaxmerge._tree.TreeSpec`
and the hyperparameters into a leaf function (validating everything first), and the public
tree function.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from jaxmerge import _hyper
from jaxmerge._tree import (
    PyTree,
    TreeSpec,
    acc_dtype,
    apply_leafwise,
    flatten_models,
    weighted_sum,
)


@functools.partial(jax.jit, static_argnames="normalize")
def average_kernel(leaves: Sequence[jax.Array], weights: jax.Array, *, normalize: bool) -> jax.Array:
    """``sum_i w_i x_i`` (divided by ``sum_i w_i`` when ``normalize``), accumulated in float32."""
    dtype = acc_dtype(leaves[0].dtype)
    total = weighted_sum(leaves, weights, dtype)
    if normalize:
        total = total / weights.astype(dtype).sum()
    return total.astype(leaves[0].dtype)


def average_plan(spec: TreeSpec, weights=None, *, normalize: bool = True):
    """Leaf function for :func:`average` (validates ``weights`` against ``spec``)."""
    w = _hyper.resolve_models(weights, "weights", spec, default=1.0)
    if normalize:
        _hyper.check_nonzero_sums(w, "weights", spec)
    return lambda i, _, leaves: average_kernel(leaves, w[i], normalize=normalize)


def lerp_plan(spec: TreeSpec, t):
    """Leaf function for :func:`lerp`: weights ``(1 - t, t)`` without normalisation."""
    ts = _hyper.resolve(t, "t", spec)
    w = [None if v is None else _hyper.vector([1 - v, v]) for v in ts]
    return lambda i, _, leaves: average_kernel(leaves, w[i], normalize=False)


def average(models: Sequence[PyTree], weights=None, *, normalize: bool = True) -> PyTree:
    """Weighted average of models, leaf by leaf (mergekit's ``linear``).

    ``sum_i w_i theta_i / sum_i w_i``; with ``normalize=False`` the plain weighted sum.
    Float leaves accumulate in float32 (bf16/fp16 in, same dtype out); other leaves are
    taken from ``models[0]``. This is also the uniform model soup (arXiv 2203.05482).

    Args:
      models: a list of pytrees of the same structure, shapes and dtype kinds.
      weights: one weight per model, each a per-leaf hyperparameter (scalar, pytree,
        ``fn(path, leaf)``, layer gradient list or filter list); ``None`` for equal weights.
      normalize: divide by the sum of the weights.

    Returns:
      A pytree shaped like ``models[0]``, with its dtypes.

    Raises:
      ValueError: no models, a structure/shape mismatch, weights of the wrong length, a
        non-finite weight, or weights that sum to 0 with ``normalize``.
    """
    spec, _, leaves = flatten_models(models)
    return apply_leafwise(spec, average_plan(spec, weights, normalize=normalize), None, leaves)


def lerp(a: PyTree, b: PyTree, t) -> PyTree:
    """Linear interpolation ``(1 - t) a + t b`` of two models, leaf by leaf.

    Args:
      a, b: pytrees of the same structure; the result has ``a``'s dtypes.
      t: a finite per-leaf hyperparameter; 0 gives ``a``, 1 gives ``b``, values outside
        [0, 1] extrapolate.
    """
    spec, _, leaves = flatten_models([a, b])
    return apply_leafwise(spec, lerp_plan(spec, t), None, leaves)
