"""Arrays on the host: NumPy buffers that XLA's CPU client wraps without copying, and the
JAX arrays that NumPy reads without copying."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import jax
import numpy as np

ALIGNMENT = 64  # bytes: XLA's CPU client wraps host buffers aligned to this without copying them


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an ``ALIGNMENT`` boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def on_host(arrays: Sequence, *values) -> bool:
    """Whether a loop on the host may read ``arrays`` and run kernels on them: JAX computes on
    the CPU (the loop's kernels run on the default device), the arrays are NumPy arrays or
    concrete JAX arrays held whole by one CPU device (NumPy reads either without a copy), and
    no leaf of the pytrees ``values`` (a key, the parameters) is traced: inside ``jax.jit``,
    ``jax.vmap`` or ``jax.eval_shape``, where even concrete arrays may meet traced ones, the
    loop's kernels would return tracers."""
    def readable(a):
        return isinstance(a, np.ndarray) or (
            isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and len(a.sharding.device_set) == 1
            and next(iter(a.sharding.device_set)).platform == "cpu")
    return (jax.default_backend() == "cpu" and all(map(readable, arrays))
            and not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(values)))


def block_starts(length: int, block: int) -> list[int]:
    """The first index of each block of ``block`` entries covering ``length`` (``>= block``):
    the last one starts early enough to end with the array, as the jitted loops place it."""
    return [min(b * block, length - block) for b in range(-(-length // block))]


def assemble(length: int, blocks: Iterable[tuple[int, tuple]]) -> tuple[np.ndarray, ...]:
    """Arrays of ``length`` along axis 0 assembled from ``blocks``: ``(start, parts)``, each part
    the result of a kernel dispatched (not yet finished) for the rows from ``start`` on. A
    block is copied in once the next one is dispatched, so that the copy overlaps its work."""
    results: tuple[np.ndarray, ...] = ()
    pending = None
    for block in itertools.chain(blocks, [None]):  # a last round copies the last block in
        if pending is not None:
            start, parts = pending
            if not results:
                results = tuple(aligned_empty((length, *p.shape[1:]), p.dtype) for p in parts)
            for whole, part in zip(results, parts):
                whole[start:start + part.shape[0]] = part
        pending = block
    return results
