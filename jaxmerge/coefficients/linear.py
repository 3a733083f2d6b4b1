"""Merges as differentiable functions of their coefficients: task vectors computed once (with
TIES's trim and sign election applied as fixed masks, if asked), then ``base + sum_i c_i d_i``
per leaf, with one coefficient per model, or per model and tensor (AdaMerging's layer-wise).

Everything is elementwise and jit-able: ``jax.grad`` of a loss of :func:`combine` with respect
to the coefficients costs one pass over the task vectors, and sharded task vectors keep their
sharding. The task vectors hold one float32 copy of each model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxmerge._tree import PyTree, flatten_models, is_float
from jaxmerge.errors import JaxmergeError
from jaxmerge.merging import sparsify

Granularity = Literal["model", "tensor"]


class TaskVectors(NamedTuple):
    """A base and the models' differences from it, in float32 (non-float leaves: the base's).

    Attributes:
      base: the base model.
      vectors: one pytree per model, ``model - base`` with any masks applied.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge.coefficients import task_vectors
      >>> task_vectors({"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}]).vectors[0]["w"].tolist()
      [1.0, 1.0]
    """

    base: PyTree
    vectors: tuple


def task_vectors(base: PyTree, models: Sequence[PyTree], *, density: float | None = None,
                 drop: Literal["magnitude", "random"] = "magnitude", key: jax.Array | None = None,
                 elect_sign: bool = False) -> TaskVectors:
    """The task vectors ``d_i = models[i] - base``, computed once for learning coefficients.

    Args:
      base: the base model.
      models: the fine-tuned models.
      density: keep this fraction of each leaf's entries; None keeps all.
      drop: ``'magnitude'`` keeps the largest magnitudes (TIES's trim); ``'random'`` keeps each
        entry with probability ``density`` and rescales the kept ones by ``1/density``
        (DARE), with masks drawn once from ``key`` (folded with the leaf's index).
      key: the random key of ``drop='random'``.
      elect_sign: zero the entries whose sign differs from that of ``sum_i d_i`` (TIES's sign
        election and disjoint merge, with the trimmed vectors). With ``density`` this gives
        AdaMerging++'s task vectors.

    Returns:
      A :class:`TaskVectors`.

    Raises:
      JaxmergeError: no models, trees that differ (naming the model and leaf), ``density``
        outside ``(0, 1]``, an unknown ``drop``, or ``drop='random'`` without a key.

    References:
      Yadav et al., "TIES-Merging", arXiv 2306.01708; Yu et al., "Language models are Super
      Mario" (DARE), arXiv 2311.03099; Yang et al., "AdaMerging", arXiv 2310.02575.

    Examples:
      >>> import jax.numpy as jnp
      >>> tv = task_vectors({"w": jnp.zeros(3)}, [{"w": jnp.asarray([1.0, -2.0, 0.5])},
      ...                                         {"w": jnp.asarray([1.0, 1.0, -0.5])}], density=0.7, elect_sign=True)
      >>> [v["w"].tolist() for v in tv.vectors]  # trimmed to 2 entries each, then the elected signs kept
      [[1.0, -2.0, 0.0], [1.0, 0.0, 0.0]]
    """
    if density is not None and not 0 < density <= 1:
        raise JaxmergeError(f"density must be in (0, 1], got {density!r}")
    if drop not in ("magnitude", "random") or (drop == "random" and density is not None and key is None):
        raise JaxmergeError(f"drop must be 'magnitude' or 'random' (with a key), got {drop!r}, key {key}")
    spec, base_leaves, model_leaves = flatten_models(list(models), base)
    keys = [None if drop == "magnitude" or density is None else jax.random.fold_in(key, j) for j in range(len(base_leaves))]
    per_leaf = [[b] * len(models) if not is_float(jnp.result_type(b)) else
                _leaf_vectors(b, [m[j] for m in model_leaves], keys[j], density=density, elect_sign=elect_sign)
                for j, b in enumerate(base_leaves)]
    return TaskVectors(base, tuple(jax.tree.unflatten(spec.treedef, [ds[i] for ds in per_leaf])
                                   for i in range(len(models))))


@functools.partial(jax.jit, static_argnames=("density", "elect_sign"))
def _leaf_vectors(base: jax.Array, leaves: list, key: jax.Array | None, *, density: float | None,
                  elect_sign: bool) -> list:
    """One leaf's task vectors, masked (one compiled kernel per shape and model count): by
    magnitude, or at random with ``key`` (DARE, kept entries rescaled)."""
    ds = [leaf.astype(jnp.float32) - base.astype(jnp.float32) for leaf in leaves]
    if density is not None and key is None:
        ds = [jnp.where(sparsify.magnitude_mask(d, density), d, 0.0) for d in ds]
    elif density is not None:
        ds = [jnp.where(sparsify.random_mask(jax.random.fold_in(key, i), d, density), d / density, 0.0)
              for i, d in enumerate(ds)]
    if elect_sign:
        sign = jnp.where(sum(ds) >= 0, 1.0, -1.0)
        ds = [jnp.where(jnp.sign(d) == sign, d, 0.0) for d in ds]
    return ds


def init_coefficients(vectors: TaskVectors, granularity: Granularity = "model", value: float = 0.3) -> PyTree:
    """Starting coefficients: one per model, or one per model and float tensor.

    Args:
      vectors: the task vectors.
      granularity: ``'model'`` (a ``(num_models,)`` array: AdaMerging's task-wise) or
        ``'tensor'`` (a pytree like the base, each float leaf a ``(num_models,)`` array:
        AdaMerging's layer-wise; non-float leaves None).
      value: the starting value of every coefficient (AdaMerging starts at 0.3).

    Returns:
      The coefficients, float32.

    Raises:
      JaxmergeError: an unknown granularity.

    Examples:
      >>> import jax.numpy as jnp
      >>> tv = task_vectors({"a": jnp.zeros(2), "b": jnp.zeros(1)}, [{"a": jnp.ones(2), "b": jnp.ones(1)}] * 2)
      >>> init_coefficients(tv, "tensor")["a"].tolist()
      [0.30000001192092896, 0.30000001192092896]
    """
    count = len(vectors.vectors)
    if granularity == "model":
        return jnp.full((count,), value, jnp.float32)
    if granularity == "tensor":
        return jax.tree.map(lambda b: jnp.full((count,), value, jnp.float32) if is_float(jnp.result_type(b)) else None,
                            vectors.base)
    raise JaxmergeError(f"granularity must be 'model' or 'tensor', got {granularity!r}")


def combine(vectors: TaskVectors, coefficients: PyTree) -> PyTree:
    """``base + sum_i c_i d_i`` per leaf, differentiable in the coefficients.

    Args:
      vectors: the task vectors (:func:`task_vectors`).
      coefficients: a ``(num_models,)`` array, or a pytree like the base of ``(num_models,)``
        arrays (:func:`init_coefficients`).

    Returns:
      The merged params, each leaf in the base's dtype (non-float leaves: the base's).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> tv = task_vectors({"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}, {"w": jnp.asarray([0.0, 2.0])}])
      >>> combine(tv, jnp.asarray([0.5, 0.25]))["w"].tolist()
      [0.5, 1.0]
      >>> jax.grad(lambda c: combine(tv, c)["w"].sum())(jnp.zeros(2)).tolist()  # d/dc_i = sum of d_i
      [2.0, 2.0]
    """
    per_leaf = coefficients if not isinstance(coefficients, jax.Array) or coefficients.ndim != 1 else None

    def merged(b, c, *ds):
        if not is_float(jnp.result_type(b)):
            return b
        total = b.astype(jnp.float32)
        for i, d in enumerate(ds):
            total = total + c[i] * d
        return total.astype(b.dtype)
    if per_leaf is None:
        return jax.tree.map(lambda b, *ds: merged(b, coefficients, *ds), vectors.base, *vectors.vectors)
    return jax.tree.map(merged, vectors.base, per_leaf, *vectors.vectors, is_leaf=lambda x: x is None)


def as_weights(coefficients: PyTree) -> list:
    """Learned coefficients as the per-model ``weights`` of :func:`jaxmerge.task_arithmetic`, so
    that the same merge can be applied to checkpoints on disk tensor by tensor (with
    :func:`jaxmerge.checkpoints.stream_merge`), without holding the models in memory.

    Args:
      coefficients: a ``(num_models,)`` array, or a pytree of ``(num_models,)`` arrays.

    Returns:
      Per model, a float or a pytree of floats matched to the model by path (non-float
      leaves left out).

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> c = {"a": jnp.asarray([0.5, 0.25]), "step": None}
      >>> weights = as_weights(c)
      >>> weights
      [{'a': 0.5, 'step': None}, {'a': 0.25, 'step': None}]
      >>> base, models = {"a": jnp.zeros(2)}, [{"a": jnp.ones(2)}, {"a": jnp.full(2, 2.0)}]
      >>> jaxmerge.task_arithmetic(base, models, weights)["a"].tolist()
      [1.0, 1.0]
    """
    if isinstance(coefficients, jax.Array) and coefficients.ndim == 1:
        return [float(c) for c in coefficients]
    count = len(jax.tree.leaves(coefficients)[0])
    return [jax.tree.map(lambda c, i=i: float(c[i]), coefficients) for i in range(count)]
