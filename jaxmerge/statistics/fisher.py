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
parameters), and are squared and summed in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge._tree import PyTree
from jaxmerge.statistics._data import labels_of, limited, model_function

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


def _squared(tree: PyTree, scale) -> PyTree:
    return jax.tree.map(lambda g: scale * jnp.square(g.astype(jnp.float32)), tree)


def _example_fisher(apply_fn: Callable, estimator: str, params: PyTree, example, key) -> PyTree:
    """Squared gradients of one example (given with a batch axis of 1)."""
    def log_probs(p):
        return log_probabilities(apply_fn(p, example))

    if estimator == "exact":
        values, pullback = jax.vjp(log_probs, params)
        if values.shape[:-1] != (1,):
            raise ValueError("estimator='exact' needs one label per example (logits of shape (batch, classes)), "
                             f"got logits of shape {values.shape}")
        probs = jnp.exp(values[0])

        def add_class(total, c):
            (grad,) = pullback(jax.nn.one_hot(c, values.shape[-1], dtype=values.dtype)[None])
            return jax.tree.map(jnp.add, total, _squared(grad, probs[c])), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return lax.scan(add_class, zeros, jnp.arange(values.shape[-1]))[0]
    if estimator == "sampled":
        logits = lax.stop_gradient(log_probs(params))
        labels = jax.random.categorical(key, logits)
    else:
        labels = labels_of(example)
    grad = jax.grad(lambda p: _label_log_likelihood(log_probs(p), labels))(params)
    return _squared(grad, 1.0)


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
    grid = (grid[0],) + tuple(_sharded_like(x, jax.tree.leaves(grid[0])[0]) for x in grid[1:])
    per_example = jax.vmap(lambda ex, k: _example_fisher(apply_fn, estimator, params, ex, k))

    def step(j, total):
        examples, mask, index = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, j, 1, keepdims=False), grid)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        squared = per_example(jax.tree.map(lambda x: x[:, None], examples), keys)
        weight = mask.astype(jnp.float32)
        return jax.tree.map(lambda t, s: t + jnp.sum(weight.reshape((-1,) + (1,) * (s.ndim - 1)) * s, axis=0),
                            total, squared)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return lax.fori_loop(0, steps, step, zeros)


def _sharded_like(x: jax.Array, reference: jax.Array) -> jax.Array:
    """``x`` with its first axis sharded like ``reference``'s where that is an explicit mesh axis."""
    sharding = jax.typeof(reference).sharding
    if not sharding.spec or sharding.spec[0] is None:
        return x
    spec = jax.sharding.PartitionSpec(sharding.spec[0], *([None] * (x.ndim - 1)))
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, spec))


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

    Args:
      model: ``apply_fn(params, batch) -> logits`` (with ``params``), or a Flax NNX module
        (its ``nnx.Param`` state is differentiated, everything else held fixed; it is called
        on the batch's inputs, so put it in evaluation mode first). Logits have shape
        ``(batch, classes)``, ``(batch, positions, classes)`` for per-token labels, or
        ``(batch, 1)`` for a binary classifier.
      data: an iterable of batches, each a tuple ``(inputs, labels)`` or a dict with
        ``'inputs'`` and ``'labels'``; every leaf has the examples on axis 0. Batches may be
        ``jax.Array``s sharded over a mesh along that axis (data parallelism).
      params: the parameters, with an ``apply_fn``.
      estimator: ``'empirical'``, ``'exact'`` or ``'sampled'`` (see the module docstring).
      key: a ``jax.random`` key, required by ``'sampled'``; batch ``b`` and example ``i``
        of it draw from ``fold_in(fold_in(key, b), i)``.
      num_examples: stop after this many examples.
      microbatch: examples whose gradients are held at once.

    Returns:
      A float32 pytree shaped like the params (an ``nnx.State`` for a module); save it with
      Orbax like any params.

    Raises:
      ValueError: unknown estimator, missing key or params, ``microbatch < 1``, or data
        that yields no examples.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "sampled" and key is None:
        raise ValueError("estimator='sampled' draws labels: pass key=jax.random.key(seed)")
    if not isinstance(microbatch, int) or microbatch < 1:
        raise ValueError(f"microbatch must be a positive int, got {microbatch!r}")
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
