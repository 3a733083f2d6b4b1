"""Model Stock (Jang et al., arXiv 2403.19522): interpolate toward the average by the angle
between task vectors."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmerge import _blocks
from jaxmerge._tree import PyTree, acc_dtype, compute_dtype, exact_jit, scaled, total
from jaxmerge.merging.method import Param, merge_method


@exact_jit(("filter_wise",))
def model_stock_kernel(base: jax.Array, leaves: Sequence[jax.Array], *, filter_wise: bool,
                       exact: bool = False) -> jax.Array:
    """``t * mean(leaves) + (1 - t) * base`` with ``t = N c / (1 + (N - 1) c)``.

    ``c`` is the mean cosine between the task vectors ``leaf_i - base`` over all pairs
    (norm products clamped below at 1e-6, cosines clipped to [-1, 1]); computed over the
    whole leaf, or per row along the last axis when ``filter_wise``. ``t`` is not
    clamped, as in mergekit; near its pole ``c = -1 / (N - 1)`` (``|1 + (N - 1) c| < 1e-6``,
    e.g. two opposite task vectors) it is 0 and the base is returned, as in mergekit.
    Computed in float32, or ``exact``ly as mergekit does in the base's dtype.
    """
    dtype = compute_dtype(base.dtype, exact)
    acc = acc_dtype(dtype)
    rows = base.reshape(1, -1) if base.ndim < 2 else base
    models = [leaf.reshape(rows.shape) for leaf in leaves]
    n = len(leaves)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]

    def statistics(c):  # squares of the task vectors and their pairwise products, from the base and the models
        deltas = [m.astype(dtype) - c[0].astype(dtype) for m in c[1:]]
        return [jnp.square(d.astype(acc)) for d in deltas] + [(deltas[i] * deltas[j]).astype(acc) for i, j in pairs]
    if filter_wise:
        sums = [jnp.sum(v, axis=-1, keepdims=True) for v in statistics([rows, *models])]
    else:
        sums = _blocks.sums(statistics, [rows, *models], acc)
    norms = [jnp.sqrt(s).astype(dtype) for s in sums[:n]]
    cosines = [jnp.clip(dot.astype(dtype) / jnp.maximum(norms[i] * norms[j], 1e-6), -1, 1)
               for (i, j), dot in zip(pairs, sums[n:])]
    cos = (total(cosines, acc) / len(cosines)).astype(dtype)
    denominator = 1 + scaled(cos, n - 1)
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0, scaled(cos, n) / jnp.where(singular, 1, denominator))
    average = functools.reduce(lambda x, y: x + y, [m.astype(dtype) for m in models]) / n
    return (t * average + (1 - t) * rows.astype(dtype)).reshape(base.shape).astype(base.dtype)


@merge_method("model_stock", base="required", min_models=2, references=("2403.19522",),
              plan=lambda spec, hp: lambda i, base, leaves: model_stock_kernel(
                  base, leaves, filter_wise=hp["filter_wise"], exact=hp["exact"]),
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
