"""Orbax checkpoints (``orbax.checkpoint.v1``), read one leaf at a time and written leaf by leaf.

Any pytree checkpoint that Orbax wrote can be read: the tree of shapes and dtypes comes from
its metadata without loading arrays, and each leaf is loaded alone by asking for it with
``ocp.PLACEHOLDER`` in every other position, optionally straight into a target
``jax.sharding`` (so each process reads only its shards). Leaves are named by their tree
path joined with ``/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from orbax.checkpoint import v1 as ocp

from jaxmerge._tree import key_name, path_str
from jaxmerge.errors import CheckpointError


def _name(path) -> str:
    return path_str(tuple(key_name(k) for k in path))


class OrbaxReader:
    """An Orbax pytree checkpoint, opened from its metadata."""

    format = "orbax"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()  # Orbax reads nothing from a relative path
        if not (self.path / "_CHECKPOINT_METADATA").exists():
            raise CheckpointError(f"{self.path}: not an Orbax checkpoint (no _CHECKPOINT_METADATA)")
        try:
            self.metadata = ocp.metadata(self.path).metadata
        except Exception as error:  # Orbax raises many types for unreadable metadata
            raise CheckpointError(f"{self.path}: unreadable Orbax metadata ({type(error).__name__}: {error})") from None
        if self.metadata is None:
            raise CheckpointError(f"{self.path}: Orbax found no pytree metadata in this checkpoint")
        with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(self.metadata)
        self.leaves = {_name(path): (i, leaf) for i, (path, leaf) in enumerate(with_paths)}
        for name, (_, leaf) in self.leaves.items():
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise CheckpointError(f"{self.path}: leaf {name!r} is not an array ({type(leaf).__name__})")

    @property
    def names(self) -> list[str]:
        return list(self.leaves)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        leaf = self.leaves[name][1]
        return tuple(leaf.shape), np.dtype(leaf.dtype)

    def read(self, name: str, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
        """One leaf, loaded alone (into ``sharding``, default: the first local device)."""
        index, _ = self.leaves[name]
        shape, dtype = self.shape_dtype(name)
        if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
            raise CheckpointError(f"{self.path}: leaf {name!r} is {dtype}, which JAX holds only with x64 enabled "
                                  "(JAX_ENABLE_X64=1)")
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        wanted = [ocp.PLACEHOLDER] * self.treedef.num_leaves
        wanted[index] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        loaded = ocp.load(self.path, jax.tree.unflatten(self.treedef, wanted))
        return self.treedef.flatten_up_to(loaded)[index]

    def extra_files(self) -> list[Path]:
        return []

    def tree_of(self, values: dict):
        """A pytree shaped like the checkpoint from ``{name: value}``."""
        return jax.tree.unflatten(self.treedef, [values[name] for name in self.leaves])


class OrbaxWriter:
    """Writes leaves into an Orbax checkpoint in batches of ``batch_bytes`` with
    ``ocp.partial.save``, and commits it with ``ocp.partial.finalize``."""

    def __init__(self, path: str | os.PathLike, treedef, names: list[str], batch_bytes: int = 256 * 2 ** 20):
        self.path, self.treedef, self.names = Path(path), treedef, names
        self.batch_bytes, self.pending, self.pending_bytes = batch_bytes, {}, 0

    def write(self, name: str, array) -> None:
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        if self.pending_bytes >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        leaves = [self.pending.get(name, _ABSENT) for name in self.names]
        tree = jax.tree.unflatten(self.treedef, leaves)
        ocp.partial.save(self.path, _prune(tree))
        self.pending, self.pending_bytes = {}, 0

    def abort(self) -> None:
        self.pending = {}

    def close(self) -> None:
        self._flush()
        ocp.partial.finalize(self.path)


class _Absent:
    """Marks a leaf not in this partial save."""


_ABSENT = _Absent()


def _prune(tree):
    """Drop absent leaves (and containers left empty) from nested dicts/lists."""
    if isinstance(tree, dict):
        kept = {k: _prune(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not _ABSENT and not (isinstance(v, dict) and not v)}
    if isinstance(tree, (list, tuple)):
        raise CheckpointError("Orbax outputs are written from nested dicts; lists and tuples are not supported")
    return tree
