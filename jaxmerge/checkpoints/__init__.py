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
    """Load a whole checkpoint, Orbax or safetensors, into memory.

    The checkpoint is opened with :func:`open_checkpoint` and read one tensor at a time: an
    Orbax checkpoint comes back as the pytree it was saved as, a safetensors checkpoint
    (a file, or a directory of shards) as a flat ``{tensor name: array}`` dict in sorted
    name order. Each array is placed with ``sharding`` if given, and float arrays are cast
    to ``dtype`` if given.

    Args:
      path: an Orbax checkpoint directory, or a safetensors file or directory.
      sharding: where to place every array: a ``jax.sharding.Sharding``, or a rule
        ``rule(name, shape) -> Sharding`` such as :func:`largest_axes_sharding` (each
        process then reads only its shards of an Orbax checkpoint). Default: the first
        local device.
      dtype: cast the float arrays to this dtype (e.g. ``jnp.bfloat16``); other arrays
        keep theirs.

    Returns:
      The checkpoint's pytree (Orbax) or ``{tensor name: array}`` (safetensors), of
      ``jax.Array`` values; a 64-bit integer safetensors tensor stays a NumPy array unless JAX
      runs with x64.

    Raises:
      CheckpointError: ``path`` does not exist or is not a readable checkpoint (naming the
        file and what is wrong), or holds a 64-bit tensor that JAX cannot hold without x64
        (``JAX_ENABLE_X64=1``): any Orbax one, or a float safetensors one when no
        ``dtype`` is given.

    Examples:
      >>> import tempfile, pathlib, jax.numpy as jnp, jaxmerge
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> tree = {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.arange(2.0)}}
      >>> jaxmerge.checkpoints.load(jaxmerge.checkpoints.save(tmp / "orbax", tree))["layer"]["bias"].tolist()
      [0.0, 1.0]
      >>> flat = jaxmerge.checkpoints.load(jaxmerge.checkpoints.save(tmp / "st", tree, format="safetensors"),
      ...                                  dtype=jnp.bfloat16)
      >>> sorted(flat), str(flat["layer/bias"].dtype)
      (['layer/bias', 'layer/kernel'], 'bfloat16')
    """
    reader = open_checkpoint(path)
    values = {name: _load(reader, name, dtype, sharding) for name in reader.names}
    return reader.tree_of(values)


def save(path: str | os.PathLike, tree: PyTree, *, format: str = "orbax", max_shard_size: int | str = "5GB",
         force: bool = False) -> Path:
    """Save ``tree`` as an Orbax checkpoint or as (sharded) safetensors, atomically.

    The files are written into a temporary directory next to ``path`` and renamed into
    place only when complete, so a failure leaves no partial checkpoint; an existing
    non-empty ``path`` is replaced only with ``force``. Safetensors tensors are named by
    their tree path joined with ``/`` (a flat dict keeps its keys) and split into shards
    of at most ``max_shard_size`` bytes (see :class:`SafetensorsWriter`).

    Args:
      path: the checkpoint directory to create (missing parents are created too).
      tree: a pytree of arrays (for safetensors, of dtypes that safetensors holds).
      format: ``'orbax'`` or ``'safetensors'``.
      max_shard_size: for safetensors, the largest shard in bytes, an int or a string like
        ``'5GB'`` or ``'2GiB'`` (see :func:`parse_size`); ignored for Orbax.
      force: replace an existing non-empty ``path``.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      JaxmergeError: an unknown ``format``, or a bad ``max_shard_size`` (safetensors).
      CheckpointError: ``path`` exists and is not empty, without ``force``; or a leaf's
        dtype that safetensors cannot hold.

    Examples:
      >>> import os, tempfile, pathlib, jax.numpy as jnp, jaxmerge
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> tree = {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}  # 16 + 8 bytes
      >>> out = jaxmerge.checkpoints.save(tmp / "model", tree, format="safetensors", max_shard_size=16)
      >>> sorted(os.listdir(out))
      ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
      >>> jaxmerge.checkpoints.save(tmp / "model", tree, force=True) == out  # now replaced by Orbax
      True
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
