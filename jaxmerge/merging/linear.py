"""Linear merges: weighted average (mergekit's ``linear``) and linear interpolation."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmerge import _hyper
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, total, weighted_sum
from jaxmerge.merging.method import WEIGHTS, Param, merge_method


@functools.partial(jax.jit, static_argnames="normalize")
def average_kernel(leaves: Sequence[jax.Array], weights: jax.Array, *, normalize: bool) -> jax.Array:
    """``sum_i w_i x_i`` (divided by ``sum_i w_i`` when ``normalize``), accumulated in float32."""
    dtype = acc_dtype(leaves[0].dtype)
    total = weighted_sum(leaves, weights, dtype)
    if normalize:
        total = total / weights.astype(dtype).sum()
    return total.astype(leaves[0].dtype)


@functools.partial(jax.jit, static_argnames="normalize")
def _fused_average(leaves: Sequence[jax.Array], weights: jax.Array, *, normalize: bool) -> jax.Array:
    """mergekit 0.1.5's ``linear`` arithmetic, for 16-bit leaves: a float32 total that each model
    adds to with a fused multiply-add (torch's ``addcmul_``), divided by the float32 sum of the
    weights, rounded once to the leaves' dtype. XLA has no fused multiply-add and turns a
    division by a scalar into a product with its reciprocal, so each step is computed in
    float64 (exact for the product of two float32 numbers) and rounded to float32: the same
    float32 result unless the float64 one lies on a float32 midpoint. Traced with x64 on."""
    wide, narrow = jnp.float64, jnp.float32
    weights = weights.astype(narrow)
    summed = jnp.zeros(leaves[0].shape, narrow)
    for leaf, weight in zip(leaves, weights):
        summed = (summed.astype(wide) + leaf.astype(wide) * weight.astype(wide)).astype(narrow)
    if normalize:
        summed = (summed.astype(wide) / total(list(weights), narrow).astype(wide)).astype(narrow)
    return summed.astype(leaves[0].dtype)


def _average_plan(spec: TreeSpec, hp: dict):
    w, normalize = hp["weights"], hp["normalize"]
    if normalize:
        _hyper.check_nonzero_sums(w, "weights", spec)

    def merge(i, _, leaves):
        if hp["exact"] and jnp.dtype(leaves[0].dtype).itemsize == 2:
            with jax.enable_x64(True):
                return _fused_average(leaves, w[i], normalize=normalize)
        return average_kernel(leaves, w[i], normalize=normalize)
    return merge


def _lerp_plan(spec: TreeSpec, hp: dict):
    w = [None if t is None else _hyper.vector([1 - t, t]) for t in hp["t"]]
    return lambda i, _, leaves: average_kernel(leaves, w[i], normalize=False)


@merge_method("linear", base="none", plan=_average_plan, references=("2203.05482",), params=(
    WEIGHTS, Param("normalize", "option", "divide by the sum of the weights", kind=bool)))
def average(models: Sequence[PyTree], weights=None, *, normalize: bool = True) -> PyTree:
    """Weighted average of models, leaf by leaf (mergekit's ``linear``).

    ``sum_i w_i theta_i / sum_i w_i``; with ``normalize=False`` the plain weighted sum.
    Float leaves accumulate in float32 (bf16/fp16 in, same dtype out); other leaves are
    taken from ``models[0]``. This is also the uniform model soup.

    Args:
      models: a list of pytrees of the same structure, shapes and dtype kinds.
      weights: one weight per model, each a per-leaf hyperparameter (scalar, pytree,
        ``fn(path, leaf)``, layer gradient list or filter list); ``None`` for equal weights.
      normalize: divide by the sum of the weights.

    Returns:
      A pytree shaped like ``models[0]``, with its dtypes.

    Raises:
      JaxmergeError: no models, a structure or shape mismatch, weights of the wrong
        length, a non-finite weight, or weights that sum to 0 with ``normalize``.
      TypeError: ``models`` is not a list, or a weight is not a real number.

    References:
      Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
      improves accuracy without increasing inference time", arXiv 2203.05482.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"w": jnp.asarray([0.0, 2.0])}, {"w": jnp.asarray([4.0, 6.0])}
      >>> jaxmerge.average([a, b])["w"].tolist()
      [2.0, 4.0]
      >>> jaxmerge.average([a, b], [3.0, 1.0])["w"].tolist()
      [1.0, 3.0]
    """


@merge_method("lerp", base="pair", plan=_lerp_plan, params=(
    Param("t", "leaf", "interpolation position: 0 gives the first model, 1 the second"),))
def lerp(a: PyTree, b: PyTree, t) -> PyTree:
    """Linear interpolation ``(1 - t) a + t b`` of two models, leaf by leaf.

    Args:
      a, b: pytrees of the same structure; the result has ``a``'s dtypes.
      t: a finite per-leaf hyperparameter; 0 gives ``a``, 1 gives ``b``, values outside
        [0, 1] extrapolate.

    Returns:
      A pytree shaped like ``a``.

    Raises:
      JaxmergeError: a structure or shape mismatch, or a non-finite ``t``.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"w": jnp.asarray([0.0, 2.0])}, {"w": jnp.asarray([4.0, 6.0])}
      >>> jaxmerge.lerp(a, b, 0.25)["w"].tolist()
      [1.0, 3.0]
    """
