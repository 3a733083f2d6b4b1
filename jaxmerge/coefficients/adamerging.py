"""AdaMerging: merge coefficients learned without labels, by minimising the merged model's
prediction entropy on unlabeled test inputs (Yang et al., arXiv 2310.02575)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmerge._tree import PyTree
from jaxmerge.coefficients._optimize import minimise
from jaxmerge.coefficients.linear import Granularity, TaskVectors, combine, init_coefficients


def prediction_entropy(logits: jax.Array | tuple | list) -> jax.Array:
    """The mean Shannon entropy of ``softmax(logits)`` over all but the last axis, summed over a
    tuple or list of logits (one per task, as AdaMerging sums its tasks' entropies).

    Args:
      logits: ``(..., classes)`` logits, or a sequence of them.

    Returns:
      A float32 scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> round(float(prediction_entropy(jnp.zeros((4, 2)))), 4)  # uniform over 2 classes: log 2
      0.6931
    """
    if isinstance(logits, (tuple, list)):
        return sum(prediction_entropy(x) for x in logits)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


class AdaMergingResult(NamedTuple):
    """What :func:`adamerging` learned.

    Attributes:
      coefficients: the learned coefficients (the form :func:`init_coefficients` gives).
      params: the merged params with them.
      losses: the entropy at each step, ``(steps,)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> AdaMergingResult(jnp.ones(2), {}, jnp.zeros(3)).losses.shape
      (3,)
    """

    coefficients: PyTree
    params: PyTree
    losses: jax.Array


def adamerging(apply_fn: Callable[[PyTree, Any], Any], vectors: TaskVectors, batches: Iterable, *,
               granularity: Granularity = "tensor", optimizer: optax.GradientTransformation | None = None,
               init: float = 0.3, bounds: tuple[float, float] | None = (0.0, 1.0),
               progress: bool = False) -> AdaMergingResult:
    """Learn merge coefficients by entropy minimisation on unlabeled inputs.

    Each step merges ``base + sum_i c_i d_i`` (:func:`combine`), runs ``apply_fn`` on the next
    batch, and takes an ``optimizer`` step on the coefficients against the mean entropy of the
    predictions (:func:`prediction_entropy`), then clips them to ``bounds``. One compiled step;
    the task vectors are computed once (AdaMerging++: pass TIES-masked vectors from
    :func:`task_vectors` with ``density`` and ``elect_sign``).

    Args:
      apply_fn: ``apply_fn(params, batch) -> logits`` (or a tuple of logits, one per task,
        whose entropies are summed). With Flax NNX: ``lambda p, x: nnx.merge(graphdef, p)(x)``.
      vectors: the base and task vectors (:func:`task_vectors`).
      batches: unlabeled batches; one step per batch (repeat them for more steps).
      granularity: ``'tensor'`` (one coefficient per model and tensor: AdaMerging's
        layer-wise) or ``'model'`` (task-wise).
      optimizer: the optax optimizer of the coefficients (default ``optax.adam(1e-3)``, the
        paper's).
      init: the starting coefficients (the paper's 0.3).
      bounds: ``(low, high)`` the coefficients are clipped to after each step, or None.
      progress: show a progress bar.

    Returns:
      An :class:`AdaMergingResult`.

    Raises:
      JaxmergeError: no batches.

    References:
      Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", arXiv
      2310.02575.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmerge.coefficients import task_vectors
      >>> base = {"w": jnp.zeros((2, 2))}
      >>> experts = [{"w": jnp.asarray([[4.0, 0.0], [0.0, 0.0]])}, {"w": jnp.asarray([[0.0, 0.0], [0.0, 4.0]])}]
      >>> x = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
      >>> result = adamerging(lambda p, x: x @ p["w"], task_vectors(base, experts), [x] * 50, granularity="model",
      ...                     optimizer=optax.sgd(0.1))
      >>> bool(result.losses[-1] < result.losses[0]), result.coefficients.round(2).tolist()
      (True, [1.0, 1.0])
    """
    optimizer = optax.adam(1e-3) if optimizer is None else optimizer

    def loss(c, batch):
        return prediction_entropy(apply_fn(combine(vectors, c), batch))

    def project(c):
        return c if bounds is None else jax.tree.map(lambda x: jnp.clip(x, *bounds), c)
    coefficients, losses = minimise(loss, init_coefficients(vectors, granularity, init), batches, optimizer,
                                    project=project, desc="adamerging", progress=progress)
    return AdaMergingResult(coefficients, combine(vectors, coefficients), losses)
