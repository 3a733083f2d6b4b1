"""Model Stock (Jang et al., arXiv 2403.19522): interpolate toward the average by the angle
between task vectors."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmerge._tree import PyTree, acc_dtype
from jaxmerge.merging.method import Param, merge_method


@functools.partial(jax.jit, static_argnames="filter_wise")
def model_stock_kernel(base: jax.Array, leaves: Sequence[jax.Array], *, filter_wise: bool) -> jax.Array:
    """``t * mean(leaves) + (1 - t) * base`` with ``t = N c / (1 + (N - 1) c)``.

    ``c`` is the mean cosine between the task vectors ``leaf_i - base`` over all pairs
    (norm products clamped below at 1e-6, cosines clipped to [-1, 1]); computed over the
    whole leaf, or per row along the last axis when ``filter_wise``. ``t`` is not
    clamped, as in mergekit; near its pole ``c = -1 / (N - 1)`` (``|1 + (N - 1) c| < 1e-6``,
    e.g. two opposite task vectors) it is 0 and the base is returned, as in mergekit.
    """
    dtype = acc_dtype(base.dtype)
    base32 = base.astype(dtype)
    rows = base32.reshape(1, -1) if base.ndim < 2 else base32
    axes = (rows.ndim - 1,) if filter_wise else tuple(range(rows.ndim))
    deltas = [leaf.astype(dtype).reshape(rows.shape) - rows for leaf in leaves]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            norms = jnp.sqrt(jnp.sum(jnp.square(deltas[i]), axis=axes, keepdims=True)
                             * jnp.sum(jnp.square(deltas[j]), axis=axes, keepdims=True))
            dot = jnp.sum(deltas[i] * deltas[j], axis=axes, keepdims=True)
            cosines.append(jnp.clip(dot / jnp.maximum(norms, 1e-6), -1, 1))
    cos = sum(cosines[1:], cosines[0]) / len(cosines)
    n = len(leaves)
    denominator = 1 + (n - 1) * cos
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0, n * cos / jnp.where(singular, 1, denominator))
    mean = sum(deltas[1:], deltas[0]) / n + rows
    return (t * mean + (1 - t) * rows).reshape(base.shape).astype(base.dtype)


@merge_method("model_stock", base="required", min_models=2, references=("2403.19522",),
              plan=lambda spec, hp: lambda i, base, leaves: model_stock_kernel(base, leaves,
                                                                               filter_wise=hp["filter_wise"]),
              params=(Param("filter_wise", "option", "one t per row along the last axis instead of per leaf",
                            kind=bool),))
def model_stock(base: PyTree, models: Sequence[PyTree], *, filter_wise: bool = False) -> PyTree:
    """Model Stock, mergekit's ``model_stock``: move from the base toward the average by the angle.

    Per leaf, moves from the base toward the average of the fine-tuned models by
    ``t = N cos(theta) / (1 + (N - 1) cos(theta))``, where ``theta`` is the angle between
    the task vectors (averaged over pairs when ``N > 2``).

    Args:
      base: the pre-trained model (anchor); the output has its structure and dtypes.
      models: at least two fine-tuned models.
      filter_wise: one ``t`` per row along the last axis (per output filter in PyTorch's
        ``(out, in)`` layout) instead of one per leaf.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base, fewer than two models, or a structure or shape mismatch.

    References:
      Jang et al., "Model Stock: all we need is just a few fine-tuned models",
      arXiv 2403.19522.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(2)}
      >>> tunes = [{"w": jnp.asarray([1.0, 0.0])}, {"w": jnp.asarray([0.0, 1.0])}]
      >>> jaxmerge.model_stock(base, tunes)["w"].tolist()  # orthogonal task vectors: t = 0
      [0.0, 0.0]
    """
