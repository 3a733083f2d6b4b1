"""Orbax checkpoints (``orbax.checkpoint.v1``), read one leaf at a time and written leaf by leaf.

Any pytree checkpoint that Orbax wrote can be read: the tree of shapes and dtypes comes from
its metadata without loading arrays, and each leaf is loaded alone by asking for it with
``ocp.PLACEHOLDER`` in every other position, optionally straight into a target
``jax.sharding`` (so each process reads only its shards). Leaves are named by their tree
path joined with ``/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from jaxmerge._tree import key_name, path_str
from jaxmerge.errors import CheckpointError


def _ocp():
    """Orbax's v1 API, imported when a checkpoint is first read or written (it takes a while)."""
    import logging

    from orbax.checkpoint import v1 as ocp

    logging.getLogger("absl").setLevel(logging.CRITICAL)  # Orbax logs its failures, which become our errors
    return ocp


def _committed(path: Path) -> bool:
    """Whether Orbax finished saving ``path``: not one of its temporary directories, and with
    ``commit_success.txt`` or a commit time in ``_CHECKPOINT_METADATA``."""
    if ".orbax-checkpoint-tmp" in path.name or (path / "commit_success.txt").is_file():
        return ".orbax-checkpoint-tmp" not in path.name
    try:
        return "commit_timestamp_nsecs" in json.loads((path / "_CHECKPOINT_METADATA").read_text())
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def _name(path) -> str:
    return path_str(tuple(key_name(k) for k in path))


class OrbaxReader:
    """An Orbax pytree checkpoint, opened from its metadata and read one leaf at a time.

    Opening it reads only the checkpoint's metadata: the tree structure and each leaf's
    shape and dtype. :meth:`read` then loads one leaf alone (asking Orbax for it with
    ``ocp.PLACEHOLDER`` in every other position), optionally straight into a
    ``jax.sharding.Sharding`` so that each process reads only its shards. Leaves are named
    by their tree path joined with ``/``, e.g. ``'params/Dense_0/kernel'``.

    Args:
      path: an Orbax checkpoint directory (with ``_CHECKPOINT_METADATA``).

    Attributes:
      format: ``'orbax'``.
      path: the checkpoint's absolute path.
      metadata: the checkpoint's tree of leaf metadata (shapes and dtypes).
      treedef: the checkpoint's tree structure.
      leaves: ``{name: (leaf index, leaf metadata)}``, in the tree's leaf order.

    Raises:
      CheckpointError: ``path`` has no ``_CHECKPOINT_METADATA``, its metadata is unreadable
        or holds no pytree, or a leaf is not an array.

    Examples:
      >>> import tempfile, pathlib, jax.numpy as jnp, jaxmerge
      >>> from jaxmerge.checkpoints import OrbaxReader
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> tree = {"layer": {"kernel": jnp.ones((2, 3)), "bias": jnp.arange(3.0)}}
      >>> reader = OrbaxReader(jaxmerge.checkpoints.save(tmp / "model", tree))
      >>> reader.names, reader.shape_dtype("layer/kernel")
      (['layer/bias', 'layer/kernel'], ((2, 3), dtype('float32')))
      >>> reader.read("layer/bias").tolist()
      [0.0, 1.0, 2.0]
    """

    format = "orbax"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()  # Orbax reads nothing from a relative path
        if not (self.path / "_CHECKPOINT_METADATA").exists():
            raise CheckpointError(f"{self.path}: not an Orbax checkpoint (no _CHECKPOINT_METADATA)")
        if not _committed(self.path):
            raise CheckpointError(f"{self.path}: an Orbax checkpoint whose save did not finish (no commit marker)")
        try:
            self.metadata = _ocp().metadata(self.path).metadata
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
        """The leaves' names, in the tree's leaf order."""
        return list(self.leaves)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype of leaf ``name``, from the metadata (nothing loaded)."""
        leaf = self.leaves[name][1]
        return tuple(leaf.shape), np.dtype(leaf.dtype)

    def read(self, name: str, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
        """One leaf, loaded alone (into ``sharding``, default: the first local device).

        Raises:
          CheckpointError: the leaf is 64-bit and JAX runs without x64.
        """
        index, _ = self.leaves[name]
        shape, dtype = self.shape_dtype(name)
        if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
            raise CheckpointError(f"{self.path}: leaf {name!r} is {dtype}, which JAX holds only with x64 enabled "
                                  "(JAX_ENABLE_X64=1)")
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        wanted = [_ocp().PLACEHOLDER] * self.treedef.num_leaves
        wanted[index] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        try:
            loaded = _ocp().load(self.path, jax.tree.unflatten(self.treedef, wanted))
        except Exception as error:  # Orbax raises many types for unreadable data
            message = str(error).strip().splitlines()[-1:] or [""]
            raise CheckpointError(f"{self.path}: cannot read leaf {name!r} ({type(error).__name__}: "
                                  f"{message[0][:200]})") from None
        return self.treedef.flatten_up_to(loaded)[index]

    def extra_files(self) -> list[Path]:
        """Non-weight files to copy along with the weights: none for Orbax."""
        return []

    def files(self) -> list[Path]:
        """Every file this checkpoint reads, resolved (links followed)."""
        return sorted({f.resolve() for f in self.path.rglob("*") if f.is_file()})

    def tree_of(self, values: dict):
        """A pytree shaped like the checkpoint from ``{name: value}``."""
        return jax.tree.unflatten(self.treedef, [values[name] for name in self.leaves])


class OrbaxWriter:
    """Writes leaves into an Orbax checkpoint in batches, and commits it on :meth:`close`.

    Leaves are given one at a time, by name and in any order, and held until they add up to
    ``batch_bytes``; each batch is then written with ``ocp.partial.save`` as the part of the
    tree it fills, and :meth:`close` writes the last batch and commits the checkpoint with
    ``ocp.partial.finalize``. The output tree must be nested dicts.

    Args:
      path: the checkpoint directory to create.
      treedef: the structure of the output tree (nested dicts).
      names: every leaf's name (tree path joined with ``/``), in ``treedef``'s leaf order.
      batch_bytes: write the held leaves once they reach this many bytes.

    Attributes:
      path: the checkpoint directory.
      treedef: the output tree's structure.
      names: the leaves' names.
      batch_bytes: the batch size in bytes.

    Examples:
      >>> import tempfile, pathlib, jax, jax.numpy as jnp, jaxmerge
      >>> from jaxmerge.checkpoints import OrbaxWriter
      >>> path = pathlib.Path(tempfile.mkdtemp()) / "model"
      >>> treedef = jax.tree.structure({"layer": {"bias": 0, "kernel": 0}})
      >>> writer = OrbaxWriter(path, treedef, ["layer/bias", "layer/kernel"])
      >>> writer.write("layer/kernel", jnp.ones((2, 2)))
      >>> writer.write("layer/bias", jnp.arange(2.0))
      >>> writer.close()
      >>> jaxmerge.checkpoints.load(path)["layer"]["bias"].tolist()
      [0.0, 1.0]
    """

    def __init__(self, path: str | os.PathLike, treedef, names: list[str], batch_bytes: int = 256 * 2 ** 20):
        self.path, self.treedef, self.names = Path(path), treedef, names
        self.batch_bytes, self.pending, self.pending_bytes = batch_bytes, {}, 0

    def write(self, name: str, array) -> None:
        """Hold leaf ``name``, and write the held leaves once they reach ``batch_bytes``.

        Raises:
          CheckpointError: a batch is written and the output tree holds lists or tuples.
        """
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        if self.pending_bytes >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        leaves = [self.pending.get(name, _ABSENT) for name in self.names]
        tree = jax.tree.unflatten(self.treedef, leaves)
        _ocp().partial.save(self.path, _prune(tree))
        self.pending, self.pending_bytes = {}, 0

    def abort(self) -> None:
        """Drop the held leaves without writing them (the caller removes the directory)."""
        self.pending = {}

    def close(self) -> None:
        """Write the held leaves and finalise the checkpoint.

        Raises:
          CheckpointError: the output tree holds lists or tuples.
        """
        self._flush()
        _ocp().partial.finalize(self.path)


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
