"""Checkpoints in and out: Orbax and Hugging Face safetensors, and the streaming merge driver."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jaxmerge._tree import PyTree, flatten_with_keys, leaf_spec, path_str
from jaxmerge.checkpoints.orbax import OrbaxReader, OrbaxWriter
from jaxmerge.checkpoints.safetensors import (
    SafetensorsReader,
    SafetensorsWriter,
    parse_size,
)
from jaxmerge.checkpoints.stream import (
    FORMATS,
    StreamOptions,
    _check_destination,
    _load,
    largest_axes_sharding,
    open_checkpoint,
    staged,
    stream_merge,
)
from jaxmerge.errors import CheckpointError, JaxmergeError


def load(path: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None, dtype=None) -> PyTree:
    """Load a whole checkpoint: an Orbax checkpoint as its pytree, a safetensors checkpoint
    as ``{tensor name: array}``; every array placed with ``sharding`` if given, a Sharding
    or a rule ``rule(name, shape) -> Sharding`` such as :func:`largest_axes_sharding` (each
    process then reads only its shards of an Orbax checkpoint); float arrays cast to
    ``dtype`` if given."""
    reader = open_checkpoint(path)
    values = {name: _load(reader, name, dtype, sharding) for name in reader.names}
    return reader.tree_of(values)


def save(path: str | os.PathLike, tree: PyTree, *, format: str = "orbax", max_shard_size: int | str = "5GB",
         force: bool = False) -> Path:
    """Save ``tree`` as an Orbax checkpoint or as (sharded) safetensors, atomically.

    Safetensors tensors are named by their tree path joined with ``/`` (a flat dict keeps
    its keys). An existing non-empty ``path`` is replaced only with ``force``; the files
    are written under a temporary name and renamed into place when complete.
    """
    if format not in FORMATS:
        raise JaxmergeError(f"format must be one of {FORMATS}, got {format!r}")
    output = Path(path).absolute()
    _check_destination(output, [], force)
    with staged(output) as staging:
        if format == "orbax":
            from orbax.checkpoint import v1 as ocp

            ocp.save(staging.path, tree)
        else:
            keys, leaves, _ = flatten_with_keys(tree)
            staging.path.mkdir(parents=True)
            staging.writer = SafetensorsWriter(staging.path, [(path_str(k), leaf_spec(x).shape, leaf_spec(x).dtype)
                                                              for k, x in zip(keys, leaves)], max_shard_size)
            for k, x in zip(keys, leaves):
                staging.writer.write(path_str(k), x)
            staging.writer.close()
    return output


__all__ = ["CheckpointError", "OrbaxReader", "OrbaxWriter", "SafetensorsReader", "SafetensorsWriter",
           "largest_axes_sharding", "load", "open_checkpoint", "parse_size", "save", "stream_merge",
           "StreamOptions"]
