"""Linear merges: weighted average, linear interpolation and task arithmetic.

Each method is a jitted leaf kernel, a *plan* that turns a :class:`~jaxmerge._tree.TreeSpec`
and the hyperparameters into a leaf function (validating everything first), and the public
tree function.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from jaxmerge import _hyper
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, apply_leafwise, flatten_models, weighted_sum


@functools.partial(jax.jit, static_argnames="normalize")
def average_kernel(leaves: Sequence[jax.Array], weights: jax.Array, *, normalize: bool) -> jax.Array:
    """``sum_i w_i x_i`` (divided by ``sum_i w_i`` when ``normalize``), accumulated in float32."""
    dtype = acc_dtype(leaves[0].dtype)
    total = weighted_sum(leaves, weights, dtype)
    if normalize:
        total = total / weights.astype(dtype).sum()
    return total.astype(leaves[0].dtype)


@jax.jit
def task_arithmetic_kernel(base: jax.Array, leaves: Sequence[jax.Array], weights: jax.Array,
                           scale: jax.Array) -> jax.Array:
    """``base + scale * sum_i w_i (x_i - base)``, accumulated in float32."""
    dtype = acc_dtype(base.dtype)
    base32 = base.astype(dtype)
    deltas = [leaf.astype(dtype) - base32 for leaf in leaves]
    return (base32 + scale.astype(dtype) * weighted_sum(deltas, weights, dtype)).astype(base.dtype)


def average_plan(spec: TreeSpec, weights=None, *, normalize: bool = True):
    """Leaf function for :func:`average` (validates ``weights`` against ``spec``)."""
    w = _hyper.per_model(weights, "weights", spec, default=1.0)
    if normalize:
        _hyper.check_nonzero_sums(w, "weights", spec)
    return lambda i, _, leaves: average_kernel(leaves, w[i], normalize=normalize)


def lerp_plan(spec: TreeSpec, t):
    """Leaf function for :func:`lerp`: weights ``(1 - t, t)`` without normalisation."""
    ts = _hyper.per_leaf(t, "t", spec)
    w = [None if v is None else _hyper.f32_vector([1 - v, v]) for v in ts]
    return lambda i, _, leaves: average_kernel(leaves, w[i], normalize=False)


def task_arithmetic_plan(spec: TreeSpec, weights=None, *, lambda_=1.0, normalize: bool = False):
    """Leaf function for :func:`task_arithmetic`."""
    w = _hyper.per_model(weights, "weights", spec, default=1.0)
    if normalize:
        _hyper.check_nonzero_sums(w, "weights", spec)
    lam = _hyper.per_leaf(lambda_, "lambda_", spec)
    # Normalising the weighted sum of task vectors is a division of lambda by sum(w).
    scales = [None if v is None else _hyper.f32_vector([lam[i] / v.sum() if normalize else lam[i]])[0]
              for i, v in enumerate(w)]
    return lambda i, base, leaves: task_arithmetic_kernel(base, leaves, w[i], scales[i])


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


def task_arithmetic(base: PyTree, models: Sequence[PyTree], weights=None, *, lambda_=1.0,
                    normalize: bool = False) -> PyTree:
    """Task arithmetic (Ilharco et al., arXiv 2212.04089), mergekit's ``task_arithmetic``.

    With task vectors ``d_i = theta_i - base``, returns
    ``base + lambda_ * sum_i w_i d_i`` (the sum divided by ``sum_i w_i`` when
    ``normalize``). Negative weights subtract a task ("forgetting via negation").

    Args:
      base: the pre-trained model the fine-tunes started from; the output has its
        structure and dtypes.
      models: fine-tuned models.
      weights: one per-leaf weight per model; ``None`` for 1.0 each.
      lambda_: per-leaf scaling of the merged task vector.
      normalize: divide the weighted sum of task vectors by the sum of the weights.
    """
    if base is None:
        raise ValueError("task_arithmetic needs a base model (base is None)")
    spec, base_leaves, leaves = flatten_models(models, base)
    plan = task_arithmetic_plan(spec, weights, lambda_=lambda_, normalize=normalize)
    return apply_leafwise(spec, plan, base_leaves, leaves)
