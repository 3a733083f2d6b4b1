"""DAM, Differentiable Adaptive Merging ("Merging in a Bottle", Gauthier-Caron et al., arXiv
2410.08371): each model's tensors scaled per input feature by learned coefficients and summed,
the coefficients trained so that the merged model matches each expert's predictions on the
expert's own data.

For models ``theta_1..n`` and per-model coefficient vectors ``m_i`` (one entry per input
feature of each tensor: its ``feature_axis``; 1-d tensors, such as norms and biases, one per
entry), the merged tensor is ``sum_i f(m_i) * theta_i`` with ``f`` the non-linearity (``tanh``
by default, as in the authors' code). The loss, as in the authors' trainer, is

    sum_i T^2 KL(softmax(expert_i / T) || softmax(merged / T)) on batches of dataset i
    + similarity * mean over model pairs of cos(m_a, m_b)          (per tensor, summed)
    + overlap * mean over model pairs of sum(min(|m_a|, |m_b|))    (per tensor, summed)
    + l1 * sum_i |m_i|_1 + l2 * sum_i |m_i|_2                       (per tensor, summed)

with the KL averaged over the batch's examples (the authors average over tokens). Defaults are
the authors': ``T = 2``, ``similarity = 0.01``, ``overlap = 1e-5``, ``l1 = l2 = 1e-6``,
coefficients starting at ``1/n``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmerge._tree import PyTree, flatten_models, is_float
from jaxmerge.coefficients._optimize import minimise
from jaxmerge.errors import JaxmergeError

NON_LINEARITIES = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, None: lambda x: x}


class DamResult(NamedTuple):
    """What :func:`dam` learned.

    Attributes:
      coefficients: per model, a pytree of coefficient vectors (None for non-float leaves).
      params: the merged params.
      losses: the loss at each step, ``(steps,)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> DamResult([], {}, jnp.zeros(2)).losses.shape
      (2,)
    """

    coefficients: list
    params: PyTree
    losses: jax.Array


def _axis(leaf, feature_axis: int) -> int | None:
    """The axis a leaf's coefficients run along (None: not merged)."""
    if not is_float(jnp.result_type(leaf)) or jnp.ndim(leaf) == 0:
        return None
    return 0 if jnp.ndim(leaf) == 1 else feature_axis % jnp.ndim(leaf)


def dam_merge(models: Sequence[PyTree], coefficients: Sequence[PyTree], *, feature_axis: int = -2,
              non_linearity: str | None = "tanh") -> PyTree:
    """``sum_i f(m_i) * models[i]`` per leaf, ``m_i`` broadcast along each leaf's feature axis.

    Args:
      models: the models.
      coefficients: per model, a pytree like the models whose float leaves are vectors along
        the feature axis (:func:`dam_coefficients`).
      feature_axis: the input-feature axis of tensors of two or more dimensions: ``-2`` for
        Flax kernels ``(..., in, out)``, ``-1`` for PyTorch / Hugging Face ``(out, in)``.
      non_linearity: ``'tanh'``, ``'sigmoid'``, ``'relu'`` or None.

    Returns:
      The merged params (non-float leaves: the first model's).

    Examples:
      >>> import jax.numpy as jnp
      >>> models = [{"k": jnp.ones((2, 3))}, {"k": 2 * jnp.ones((2, 3))}]
      >>> mergers = [{"k": jnp.asarray([1.0, 0.0])}, {"k": jnp.asarray([0.0, 1.0])}]
      >>> dam_merge(models, mergers, non_linearity=None)["k"].tolist()  # row 0 from model 0, row 1 from model 1
      [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    """
    f = NON_LINEARITIES[non_linearity]

    def merged(*leaves_and_coefficients):
        leaves, mergers = leaves_and_coefficients[:len(models)], leaves_and_coefficients[len(models):]
        axis = _axis(leaves[0], feature_axis)
        if axis is None:
            return leaves[0]
        shape = [1] * leaves[0].ndim
        shape[axis] = leaves[0].shape[axis]
        total = sum(f(m).reshape(shape) * leaf.astype(jnp.float32) for m, leaf in zip(mergers, leaves))
        return total.astype(leaves[0].dtype)
    return jax.tree.map(merged, *models, *coefficients, is_leaf=lambda x: x is None)


def dam_coefficients(models: Sequence[PyTree], *, feature_axis: int = -2, init: Sequence[float] | None = None) -> list:
    """Starting coefficients: per model, a vector along each float leaf's feature axis.

    Args:
      models: the models (only the first's shapes are read).
      feature_axis: as in :func:`dam_merge`.
      init: each model's starting value (default ``1/n``, the authors').

    Returns:
      A list of pytrees, float32 vectors (None for non-float and scalar leaves).

    Examples:
      >>> import jax.numpy as jnp
      >>> dam_coefficients([{"k": jnp.ones((4, 3))}] * 2)[0]["k"].tolist()
      [0.5, 0.5, 0.5, 0.5]
    """
    init = [1 / len(models)] * len(models) if init is None else list(init)

    def vector(leaf, value):
        axis = _axis(leaf, feature_axis)
        return None if axis is None else jnp.full(leaf.shape[axis], value, jnp.float32)
    return [jax.tree.map(lambda leaf, v=v: vector(leaf, v), models[0]) for v in init]


def _pairs_mean(values: list) -> jax.Array:
    return jnp.mean(jnp.stack(values)) if values else jnp.float32(0)


def dam_regularizer(coefficients: Sequence[PyTree], *, similarity: float = 0.01, overlap: float = 1e-5,
                    l1: float = 1e-6, l2: float = 1e-6) -> jax.Array:
    """DAM's penalties on the coefficients, summed over tensors (see the module docstring).

    Args:
      coefficients: per model, its coefficient pytree.
      similarity: weight of the mean pairwise cosine similarity (pushes models apart).
      overlap: weight of the mean pairwise ``sum(min(|m_a|, |m_b|))``.
      l1: weight of each coefficient vector's L1 norm.
      l2: weight of each coefficient vector's L2 norm.

    Returns:
      A float32 scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> m = [{"k": jnp.asarray([1.0, 0.0])}, {"k": jnp.asarray([0.0, 1.0])}]
      >>> float(dam_regularizer(m, similarity=1.0, overlap=0.0, l1=0.0, l2=0.0))  # orthogonal: cosine 0
      0.0
    """
    total = jnp.float32(0)
    for vectors in zip(*(jax.tree.leaves(c) for c in coefficients)):
        pairs = list(itertools.combinations(vectors, 2))
        cosines = [jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-8) for a, b in pairs]
        overlaps = [jnp.sum(jnp.minimum(jnp.abs(a), jnp.abs(b))) for a, b in pairs]
        total = total + similarity * _pairs_mean(cosines) + overlap * _pairs_mean(overlaps)
        total = total + sum(l1 * jnp.sum(jnp.abs(v)) + l2 * jnp.linalg.norm(v) for v in vectors)
    return total


def distillation_kl(logits: jax.Array, teacher: jax.Array, temperature: float = 2.0) -> jax.Array:
    """``T^2`` times the mean over examples of ``KL(softmax(teacher/T) || softmax(logits/T))``.

    Args:
      logits: the student's ``(..., classes)`` logits.
      teacher: the teacher's, of the same shape.
      temperature: ``T``.

    Returns:
      A float32 scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(distillation_kl(jnp.ones((3, 4)), jnp.ones((3, 4))))
      0.0
    """
    target = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    predicted = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(target) * (target - predicted), axis=-1)
    return temperature ** 2 * jnp.mean(kl)


def dam(apply_fn: Callable[[PyTree, Any], jax.Array] | Sequence[Callable], models: Sequence[PyTree],
        datasets: Sequence[Iterable], *, optimizer: optax.GradientTransformation | None = None,
        feature_axis: int = -2, non_linearity: str | None = "tanh", init: Sequence[float] | None = None,
        temperature: float = 2.0, similarity: float = 0.01, overlap: float = 1e-5, l1: float = 1e-6,
        l2: float = 1e-6, progress: bool = False) -> DamResult:
    """Learn DAM's per-feature merge coefficients by distillation from each model on its data.

    Each step takes the next batch of every dataset; on batch ``i`` the merged model's logits
    are pulled towards model ``i``'s (computed on the fly), plus DAM's regularisers, and one
    ``optimizer`` step updates the coefficients. One compiled step.

    Args:
      apply_fn: ``apply_fn(params, batch) -> logits``, or one per model (e.g. each restricted
        to its task's classes).
      models: the expert models (same structure).
      datasets: per model, an iterable of its (unlabeled) batches; steps stop with the
        shortest.
      optimizer: the coefficients' optimizer (default ``optax.adam(1e-3)``).
      feature_axis: the input-feature axis of tensors of two or more dimensions (see
        :func:`dam_merge`).
      non_linearity: applied to the coefficients (``'tanh'``, the authors' default).
      init: each model's starting coefficient (default ``1/n``).
      temperature: the distillation temperature ``T``.
      similarity, overlap, l1, l2: the regulariser weights (:func:`dam_regularizer`).
      progress: show a progress bar.

    Returns:
      A :class:`DamResult`.

    Raises:
      JaxmergeError: fewer datasets or apply functions than models, models that differ, or
        no batch.

    References:
      Gauthier-Caron et al., "Merging in a Bottle: Differentiable Adaptive Merging (DAM) and
      the Path from Averaging to Automation", arXiv 2410.08371.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> models = [{"w": jnp.asarray([[2.0, 0.0], [0.0, 0.0]])}, {"w": jnp.asarray([[0.0, 0.0], [0.0, 2.0]])}]
      >>> data = [[jnp.asarray([[1.0, 0.0]])] * 60, [jnp.asarray([[0.0, 1.0]])] * 60]
      >>> result = dam(lambda p, x: x @ p["w"], models, data, optimizer=optax.sgd(0.5))
      >>> bool(result.losses[-1] < result.losses[0])
      True
    """
    flatten_models(list(models))
    apply_fns = list(apply_fn) if isinstance(apply_fn, (list, tuple)) else [apply_fn] * len(models)
    if len(apply_fns) != len(models) or len(datasets) != len(models):
        raise JaxmergeError(f"dam needs one dataset (and one apply_fn, if several) per model: {len(models)} models, "
                            f"{len(datasets)} datasets, {len(apply_fns)} apply functions")
    optimizer = optax.adam(1e-3) if optimizer is None else optimizer

    def loss(c, batches):
        merged = dam_merge(models, c, feature_axis=feature_axis, non_linearity=non_linearity)
        kl = sum(distillation_kl(f(merged, batch), jax.lax.stop_gradient(f(model, batch)), temperature)
                 for f, model, batch in zip(apply_fns, models, batches))
        return kl + dam_regularizer(c, similarity=similarity, overlap=overlap, l1=l1, l2=l2)
    coefficients, losses = minimise(loss, dam_coefficients(models, feature_axis=feature_axis, init=init),
                                    (list(batches) for batches in zip(*datasets)), optimizer, desc="dam",
                                    progress=progress, batch="batch of every dataset")
    params = dam_merge(models, coefficients, feature_axis=feature_axis, non_linearity=non_linearity)
    return DamResult(coefficients, params, losses)
