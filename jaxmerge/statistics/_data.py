"""What the statistics share: running a model given as ``apply_fn`` + params or as a Flax NNX
module, reading inputs and labels from a batch, and iterating over data up to a budget."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from jaxmerge.errors import JaxmergeError

Batch = Any


def inputs_of(batch: Batch):
    """The model inputs of a batch: ``batch[0]`` of a tuple, ``batch['inputs']`` of a dict."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict) and "inputs" in batch:
        return batch["inputs"]
    raise TypeError("a batch must be a tuple (inputs, labels) or a dict with 'inputs' and 'labels', "
                    f"got {type(batch).__name__}")


def labels_of(batch: Batch):
    """The labels of a batch: ``batch[1]`` of a tuple, ``batch['labels']`` of a dict."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict) and "labels" in batch:
        return batch["labels"]
    raise TypeError("a batch must be a tuple (inputs, labels) or a dict with 'inputs' and 'labels', "
                    f"got {type(batch).__name__}")


def is_nnx_module(model) -> bool:
    """Whether ``model`` is a Flax NNX module (Flax is not imported for the answer: when it is not
    loaded yet, nothing can be one)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def model_function(model, params) -> tuple[Callable, Any]:
    """``(apply_fn(params, batch) -> outputs, params)`` for an ``apply_fn`` or an NNX module.

    An NNX module is split into its ``nnx.Param`` state (the params) and everything else
    (held fixed); it is called on ``inputs_of(batch)``.
    """
    if is_nnx_module(model):
        from flax import nnx

        if params is not None:
            raise JaxmergeError("params must be None when model is an nnx.Module (its nnx.Param state is used)")
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        return (lambda p, batch: nnx.merge(graphdef, p, rest)(inputs_of(batch))), state
    if not callable(model):
        raise TypeError(f"model must be an apply_fn(params, batch) or an nnx.Module, got {type(model).__name__}")
    if params is None:
        raise JaxmergeError("params are required with an apply_fn")
    return model, params


def num_examples_in(batch: Batch) -> int:
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise JaxmergeError("every leaf of a batch needs the same leading (example) axis, "
                         f"got sizes {sorted(map(str, sizes))}")
    return sizes.pop()


def limited(data: Iterable[Batch], num_examples: int | None) -> Iterator[tuple[Batch, int]]:
    """``(batch, size)`` pairs, the last one cut so that at most ``num_examples`` are seen.

    Raises:
      ValueError: ``data`` yields no examples, or ``num_examples < 1``.
    """
    if num_examples is not None and num_examples < 1:
        raise JaxmergeError(f"num_examples must be >= 1, got {num_examples}")
    seen = 0
    for batch in data:
        size = num_examples_in(batch)
        if num_examples is not None and seen + size > num_examples:
            size = num_examples - seen
            batch = jax.tree.map(lambda x: x[:size], batch)
        if size:
            seen += size
            yield batch, size
        if num_examples is not None and seen >= num_examples:
            break
    if seen == 0:
        raise JaxmergeError("data yielded no examples")


def sharded_like(x: jax.Array, reference: jax.Array) -> jax.Array:
    """``x`` with its first axis sharded like ``reference``'s where that is an explicit mesh axis."""
    sharding = jax.typeof(reference).sharding
    if not sharding.spec or sharding.spec[0] is None:
        return x
    spec = jax.sharding.PartitionSpec(sharding.spec[0], *([None] * (x.ndim - 1)))
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, spec))


def replicated_like(x: jax.Array):
    """An out-sharding for a contraction over ``x``'s explicitly sharded batch axis, else None."""
    sharding = jax.typeof(x).sharding
    if not sharding.spec or sharding.spec[0] is None:
        return None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
