"""The one leafwise driver: a leaf function run over a *source* of model leaves into a *sink*.

A source yields, leaf by leaf in the order of its :class:`~jaxmerge._tree.TreeSpec`, the
base's leaf (or ``None``) and the models' leaves: :class:`TreeSource` from pytrees in
memory, :class:`jaxmerge.checkpoints.stream.CheckpointSource` from checkpoints on disk.
A sink takes each merged leaf: :class:`TreeSink` builds a pytree, the checkpoint writers'
sink writes a file. :func:`run` is the only loop, so in memory and streamed merges treat
every leaf alike: float leaves are merged, every other leaf (step counters, RNG keys,
masks) is the reference's (the base if there is one, else the first model's).

Statistics that a method needs per model (Fisher information, Gram matrices) come as
:class:`Store` objects, read by name: :class:`TreeStore` over a pytree, or a checkpoint
reader.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from jaxmerge._tree import LeafFn, PyTree, TreeSpec, flatten_models, flatten_with_keys, keep_sharding, path_str


class Source(Protocol):
    spec: TreeSpec

    def leaves(self) -> Iterator[tuple[Any, list]]:
        """``(base leaf or None, model leaves)`` per leaf of ``spec``; for a non-float leaf
        only the reference's (the base's, else ``[first model's]``)."""


class Sink(Protocol):
    def write(self, i: int, leaf) -> None:
        """Take the merged leaf ``i``."""

    def close(self):
        """Finish; the merge's result."""


class Store(Protocol):
    """Named arrays read one at a time (a pytree's leaves by path, or a checkpoint's tensors)."""

    names: list[str]

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]: ...

    def read(self, name: str): ...


class TreeSource:
    """Models (and a base) in memory, checked for compatibility (see
    :func:`~jaxmerge._tree.flatten_models`) when made."""

    def __init__(self, models: Sequence[PyTree], base: PyTree | None = None, names: Sequence[str] | None = None):
        self.spec, self._base, self._models = flatten_models(models, base, names=names)

    def leaves(self) -> Iterator[tuple[Any, list]]:
        for i in range(len(self.spec.keys)):
            base = None if self._base is None else self._base[i]
            if not self.spec.is_float(i):
                yield base, ([] if base is not None else [self._models[0][i]])
            else:
                yield base, [leaves[i] for leaves in self._models]


class TreeSink:
    """Collects the merged leaves into a pytree with the spec's structure."""

    def __init__(self, spec: TreeSpec):
        self.spec, self.out = spec, [None] * len(spec.keys)

    def write(self, i: int, leaf) -> None:
        self.out[i] = leaf

    def close(self) -> PyTree:
        return jax.tree_util.tree_unflatten(self.spec.treedef, self.out)


class TreeStore:
    """A pytree's leaves by path (``'params/Dense_0/kernel'``), as a :class:`Store`."""

    def __init__(self, tree: PyTree):
        keys, leaves, _ = flatten_with_keys(tree)
        self.arrays = {path_str(k): leaf for k, leaf in zip(keys, leaves)}
        self.names = list(self.arrays)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        leaf = self.arrays[name]
        return tuple(np.shape(leaf)), np.dtype(leaf.dtype)

    def read(self, name: str):
        return self.arrays[name]


def run(spec: TreeSpec, leaf_fn: LeafFn, source: Source, sink: Sink):
    """Merge every float leaf with ``leaf_fn(i, base_leaf, model_leaves)`` and pass the others
    through from the reference; each result goes to ``sink``, placed like the reference leaf."""
    i = 0  # counted by hand: enumerate would hold each leaf's inputs until the next is read
    for base, leaves in source.leaves():
        reference = base if base is not None else leaves[0]
        if spec.is_float(i):
            sink.write(i, keep_sharding(leaf_fn(i, base, leaves), reference))
        else:
            sink.write(i, reference)
        del base, leaves, reference  # free this leaf's inputs before the next are read
        i += 1  # noqa: SIM113
    return sink.close()
