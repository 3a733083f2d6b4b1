"""Diagonal Fisher information from per-example gradients (Matena & Raffel, arXiv 2111.09832).

``F_j = E_x E_y [(d/d theta_j log p(y | x; theta))^2]``, averaged over the examples ``x``
of the data. The label ``y`` is

- ``'empirical'``: the example's true label (the *empirical* Fisher);
- ``'exact'``: every class, weighted by the model's probability ``p(y | x)`` (the *model*
  Fisher, exactly; one backward pass per class, for single-label classification);
- ``'sampled'``: one label drawn from ``p(y | x)`` per example with an explicit ``key`` (an
  unbiased estimate of the model Fisher).

Per-example gradients come from ``jax.vmap`` of ``jax.grad`` inside ``jax.jit``, over
``microbatch`` examples at a time (which bounds memory at about ``microbatch`` copies of the
parameters; times the number of classes for ``'exact'``), and are squared and summed in
float32. Gradients of dense kernels, which are per-example outer products, are squared
and summed as one matrix product of squares instead of being materialised (see
:mod:`jaxmerge.statistics._per_example`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge._sharding import like
from jaxmerge._tree import PyTree
from jaxmerge.errors import JaxmergeError
from jaxmerge.statistics._data import labels_of, limited, model_function, sharded_like
from jaxmerge.statistics._per_example import weighted_squared_gradients

ESTIMATORS = ("empirical", "exact", "sampled")


def log_probabilities(logits: jax.Array) -> jax.Array:
    """Log-softmax over the last axis in float32; a single logit ``z`` means ``p(1) = sigmoid(z)``."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] == 1:
        logits = jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
    return jax.nn.log_softmax(logits, axis=-1)


def _label_log_likelihood(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Sum of ``log p(label)`` over every labelled position (one, or a token per position)."""
    picked = jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[..., None], axis=-1)
    return jnp.sum(picked)


def _label_gradient(apply_fn: Callable, params: PyTree, example, labels) -> PyTree:
    """Gradient of ``log p(labels | example)`` for one example (given with a batch axis of 1)."""
    return jax.grad(lambda p: _label_log_likelihood(log_probabilities(apply_fn(p, example)), labels))(params)


def _labelled_pairs(apply_fn: Callable, estimator: str, params: PyTree, examples, mask, keys):
    """The ``(examples, labels, weights)`` whose weighted squared gradients sum to the Fisher.

    ``examples`` carry a batch axis of 1 per example. The exact estimator pairs every
    example with every class, weighted by the class probability.
    """
    if estimator == "empirical":
        return examples, labels_of(examples), mask
    log_probs = jax.vmap(lambda e: log_probabilities(apply_fn(params, e)))(examples)
    if estimator == "sampled":
        return examples, jax.vmap(jax.random.categorical)(keys, lax.stop_gradient(log_probs)), mask
    if log_probs.shape[1:-1] != (1,):
        raise JaxmergeError("estimator='exact' needs one label per example (logits of shape (batch, classes)), "
                         f"got logits of shape {log_probs.shape[1:]} per example")
    size, classes = log_probs.shape[0], log_probs.shape[-1]
    repeated = jax.tree.map(lambda x: jnp.repeat(x, classes, axis=0), examples)
    labels = jnp.tile(jnp.arange(classes), size).reshape(size * classes, 1)
    weights = (mask[:, None] * jnp.exp(lax.stop_gradient(log_probs[:, 0, :]))).reshape(-1)
    return repeated, labels, weights


@functools.partial(jax.jit, static_argnames=("apply_fn", "estimator", "microbatch"))
def fisher_sum(params: PyTree, batch, valid: jax.Array, key: jax.Array, *, apply_fn: Callable,
               estimator: str, microbatch: int) -> PyTree:
    """Sum over the valid examples of a batch of the per-example squared gradients (float32).

    The batch (size a multiple of ``microbatch``) is viewed as ``(microbatch, steps)`` and
    a loop runs over the steps, each step taking one example from every row: when the
    batch axis is sharded over devices, every step is split across them and the sum over
    examples becomes a cross-device reduction inside this function.
    """
    size = valid.shape[0]
    steps = size // microbatch
    grid = jax.tree.map(lambda x: x.reshape((microbatch, steps) + x.shape[1:]), (batch, valid, jnp.arange(size)))
    grid = (grid[0],) + tuple(sharded_like(x, jax.tree.leaves(grid[0])[0]) for x in grid[1:])

    def step(j, total):
        examples, mask, index = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, j, 1, keepdims=False), grid)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        examples = jax.tree.map(lambda x: x[:, None], examples)
        pairs, labels, weights = _labelled_pairs(apply_fn, estimator, params, examples, mask.astype(jnp.float32),
                                                 keys)
        squared = weighted_squared_gradients(functools.partial(_label_gradient, apply_fn), params,
                                             (pairs, labels), weights)
        return jax.tree.map(lambda t, s: t + like(s, t), total, squared)

    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)  # sharded like the params
    return lax.fori_loop(0, steps, step, zeros)


def _padded(batch, size: int, microbatch: int):
    padded_size = -(-size // microbatch) * microbatch
    valid = np.arange(padded_size) < size
    if padded_size == size:
        return batch, valid
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.zeros((padded_size - size,) + x.shape[1:], x.dtype)]),
                        batch), valid


def diagonal_fisher(model, data: Iterable, *, params: PyTree | None = None, estimator: str = "empirical",
                    key: jax.Array | None = None, num_examples: int | None = None,
                    microbatch: int = 32) -> PyTree:
    """Diagonal Fisher information of a classifier, averaged over the examples of ``data``.

    Computes ``F_j = mean_x E_y[(d/d theta_j log p(y | x; theta))^2]`` for every parameter
    ``theta_j``, the per-parameter importance weights of Fisher-weighted averaging
    (:func:`jaxmerge.fisher_merge`). Per-example gradients are taken with ``jax.vmap`` of
    ``jax.grad`` under ``jax.jit``, ``microbatch`` examples at a time, then squared and
    summed in float32; the label ``y`` is the true label (``'empirical'``), every class
    weighted by its model probability (``'exact'``), or one label drawn from the model
    (``'sampled'``).

    Args:
      model: ``apply_fn(params, batch) -> logits`` (with ``params``), called on one example
        at a time (the batch with its example axis of size 1), or a Flax NNX module (its
        ``nnx.Param`` state is differentiated, everything else held fixed; it is called on
        the batch's inputs, so put it in evaluation mode first). Logits have shape
        ``(batch, classes)``, ``(batch, positions, classes)`` for per-token labels, or
        ``(batch, 1)`` for a binary classifier (``p(1) = sigmoid(logit)``).
      data: an iterable of batches, each a tuple ``(inputs, labels)`` or a dict with
        ``'inputs'`` and ``'labels'``; every leaf has the examples on axis 0. Batches may be
        ``jax.Array`` values sharded over a mesh along that axis (data parallelism).
      params: the parameters, required with an ``apply_fn`` and ``None`` with a module.
      estimator: ``'empirical'`` (the true labels), ``'exact'`` (every class, weighted by
        ``p(y | x)``; one label per example only) or ``'sampled'`` (one label drawn from
        ``p(y | x)`` per example); see the module docstring.
      key: a ``jax.random`` key, required by ``'sampled'``; batch ``b`` and example ``i``
        of it draw from ``fold_in(fold_in(key, b), i)``.
      num_examples: stop after this many examples (``None``: all of ``data``).
      microbatch: how many examples' gradients are held at once (bounds memory).

    Returns:
      A float32 pytree shaped like the params (an ``nnx.State`` for a module), the mean over
      the examples of the squared gradients; save it with :func:`jaxmerge.checkpoints.save`
      like any params.

    Raises:
      JaxmergeError: an unknown ``estimator``; ``'sampled'`` without ``key``; ``microbatch``
        not a positive int; ``params`` missing with an ``apply_fn`` or given with a module;
        ``num_examples < 1``; batch leaves of different leading sizes; data that yields no
        examples; or ``'exact'`` with logits other than one row of classes per example.
      TypeError: ``model`` is neither callable nor an NNX module, or a batch is neither a
        tuple ``(inputs, labels)`` nor a dict with ``'inputs'`` and ``'labels'``.

    References:
      Matena & Raffel, "Merging models with Fisher-weighted averaging", arXiv 2111.09832.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> apply_fn = lambda params, batch: batch[0] @ params["w"]  # a linear classifier
      >>> x, y = jnp.asarray([[1.0, 0.0], [0.0, 2.0]]), jnp.asarray([0, 1])
      >>> # zero weights give p = (1/2, 1/2), so each gradient entry is x_i * (+-1/2)
      >>> fisher = jaxmerge.diagonal_fisher(apply_fn, [(x, y)], params={"w": jnp.zeros((2, 2))})
      >>> fisher["w"].tolist()  # the mean of x_i ** 2 / 4 over the two examples
      [[0.125, 0.125], [0.5, 0.5]]
    """
    if estimator not in ESTIMATORS:
        raise JaxmergeError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "sampled" and key is None:
        raise JaxmergeError("estimator='sampled' draws labels: pass key=jax.random.key(seed)")
    if not isinstance(microbatch, int) or microbatch < 1:
        raise JaxmergeError(f"microbatch must be a positive int, got {microbatch!r}")
    apply_fn, params = model_function(model, params)
    key = jax.random.key(0) if key is None else key
    total, count = None, 0
    for index, (batch, size) in enumerate(limited(data, num_examples)):
        m = min(microbatch, size)
        padded, valid = _padded(batch, size, m)
        batch_sum = fisher_sum(params, padded, valid, jax.random.fold_in(key, index), apply_fn=apply_fn,
                               estimator=estimator, microbatch=m)
        total = batch_sum if total is None else jax.tree.map(jnp.add, total, batch_sum)
        count += size
    return jax.tree.map(lambda t: t / count, total)
