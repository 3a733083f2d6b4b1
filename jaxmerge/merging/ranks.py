"""Ranks within rows, for DELLA's magnitude-ranked keep probabilities.

An entry's rank is the number of entries of its row with a smaller key. Each row's keys are
sorted and every entry is looked up in its sorted row (a binary search; whether a rank reaches
a given count needs a single look-up), a block of rows at a time so that the temporaries stay
in cache. XLA's CPU sort calls a comparison per pair; for
large arrays a block is instead sorted by a bitonic network (Batcher, "Sorting networks and
their applications", AFIPS 1968) laid out with the block's rows along the fast axis, so that
each of its ``log2(m) (log2(m) + 1) / 2`` compare-exchange steps (``m`` the row length rounded
up to a power of two) is a vectorised minimum and maximum over the block: 1.4-1.6x faster
than the sort for rows of 1024-2816 entries on CPU, at the price of a longer compilation,
which is why small arrays keep the sort.

On CPU, the blocks of a concrete two-dimensional array can instead be ranked by a loop on
the host (:func:`host_row_blocks`) that sorts them with NumPy: faster than the network, and
nothing as slow to compile as the network in the kernels that make and finish the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge._host import assemble, block_starts

NETWORK_MIN = 1 << 16  # arrays of at least this many entries, and NETWORK_ROWS rows, are sorted by the network
NETWORK_ROWS = 8
RANK_BLOCK = 1 << 18  # entries ranked at a time


def layout(rows: int, n: int) -> tuple[int, bool]:
    """``(rows per block, whether the network sorts them)`` for ranking ``rows`` rows of ``n``."""
    network = rows * n >= NETWORK_MIN and rows >= NETWORK_ROWS
    return max(1, min(rows, RANK_BLOCK // (_width(n) if network else n))), network


def _width(n: int) -> int:
    """The network's row length: ``n`` rounded up to a power of two."""
    return 1 << max(0, (n - 1).bit_length())


def sort_rows(chunk: jax.Array, network: bool) -> jax.Array:
    """The rows of a block of unsigned keys sorted ascending, by the network or by ``lax.sort``."""
    if not network:
        return lax.sort(chunk)
    n = chunk.shape[1]
    padding = jnp.asarray(np.iinfo(chunk.dtype).max, chunk.dtype)  # sorts last
    return _sort_columns(jnp.pad(chunk.T, ((0, _width(n) - n), (0, 0)), constant_values=padding))[:n].T


def sorted_row_blocks(x, finish: Callable, keys_of: Callable | None = None):
    """Sort the rows of ``x`` (along axis 1) a block at a time and ``finish`` each block.

    Args:
      x: an array of at least two dimensions, ranked along axis 1: the unsigned integer keys,
        or what ``keys_of`` makes them of; or a tuple of arrays of one shape, of which
        ``keys_of`` makes the keys.
      finish: ``finish(ordered, keys, first_row)``, a function of a block's keys (``rows x
        n``: the ranked axis last, the others flattened into rows in order, the block's first
        row ``first_row``) and the same rows sorted ascending (``ordered``), returning a pytree
        of arrays shaped like ``keys`` (or ``None`` leaves). It runs inside the loop, so that
        only what it returns is as large as ``x`` (e.g. DELLA's keep mask, never its ranks).
      keys_of: an elementwise function making a block of ``x`` (a block of each array, as
        arguments) unsigned keys, applied inside the loop (so that the keys are never an
        array as large as ``x``); default: ``x`` holds the keys.

    Returns:
      ``finish``'s pytree for the whole array, each leaf shaped like ``x``.
    """
    arrays = x if isinstance(x, tuple) else (x,)
    keys_of = keys_of or (lambda block: block)
    key_type = jax.eval_shape(keys_of, *(jax.ShapeDtypeStruct((1,), a.dtype) for a in arrays)).dtype
    moved = [jnp.moveaxis(a, 1, -1) for a in arrays]
    flat = [m.reshape(-1, m.shape[-1]) for m in moved]
    rows, n = flat[0].shape
    block, network = layout(rows, n)

    def step(b, results):
        start = jnp.minimum(b * block, rows - block)  # the last block ends with the array
        chunk = keys_of(*(lax.dynamic_slice_in_dim(f, start, block) for f in flat))
        done = finish(sort_rows(chunk, network), chunk, start)
        return jax.tree.map(lambda whole, part: lax.dynamic_update_slice_in_dim(whole, part, start, 0), results, done)
    shapes = jax.eval_shape(finish, *[jax.ShapeDtypeStruct((rows, n), key_type)] * 2,
                            jax.ShapeDtypeStruct((), jnp.int32))
    results = lax.fori_loop(0, -(-rows // block), step, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    return jax.tree.map(lambda r: jnp.moveaxis(r.reshape(moved[0].shape), -1, 1), results)


def host_row_blocks(keys_of: Callable, finish: Callable, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """:func:`sorted_row_blocks`' loop, run on the host over two-dimensional NumPy arrays of
    one shape (views of arrays on the CPU) whose rows the network would sort (see :func:`layout`).

    Each block's keys are made by a kernel and sorted by NumPy (its vectorised sort took
    1.4-2.8x less time than the network for rows of 4096-1024 entries, and compiles nothing)
    while XLA finishes the previous block; every block has the same shape, so each kernel
    compiles once for all arrays whose rows have the same length.

    Args:
      keys_of: ``keys_of(blocks)``, a jitted function of a block of rows of each array
        returning their unsigned keys.
      finish: ``finish(ordered, keys, first_row)``, a jitted function of a block's keys, the
        same rows sorted ascending and the block's first row, returning a tuple of arrays
        shaped like the keys.
      arrays: the arrays, ``rows x n``.

    Returns:
      ``finish``'s results for the whole arrays, as NumPy arrays.
    """
    rows, n = arrays[0].shape
    block, _ = layout(rows, n)
    starts = block_starts(rows, block)

    def keys(start):
        return keys_of([a[start:start + block] for a in arrays])

    def finished():
        ahead = keys(starts[0])
        for i, start in enumerate(starts):
            current = ahead
            if i + 1 < len(starts):
                ahead = keys(starts[i + 1])  # dispatched first: XLA makes them while NumPy sorts these
            yield start, finish(np.sort(np.asarray(current), axis=-1), current, np.int32(start))
    return assemble(rows, finished())


def smaller(ordered: jax.Array, keys: jax.Array) -> jax.Array:
    """Per key, how many keys of its row are smaller (int32): a binary search of its sorted row."""
    return jax.vmap(lambda row, queries: jnp.searchsorted(row, queries, method="scan_unrolled"))(
        ordered, keys).astype(jnp.int32)


def at_least(ordered: jax.Array, keys: jax.Array, count: jax.Array) -> jax.Array:
    """Per key, whether at least ``count`` (int32, per key) keys of its row are smaller: one
    look-up in its sorted row (the ``count``-th smallest key is smaller than it), not a search."""
    n = ordered.shape[-1]
    # a look-up in the flattened rows: XLA's CPU gather along an axis of a 2-D array took about
    # 10 ns an entry, a flat one 1-2 ns
    index = jnp.clip(count - 1, 0, n - 1) + lax.broadcasted_iota(jnp.int32, ordered.shape, 0) * n
    below = jnp.take(ordered.reshape(-1), index, mode="clip") < keys
    return (count <= 0) | ((count <= n - 1) & below)


def row_ranks(x, keys_of: Callable | None = None) -> jax.Array:
    """Per entry, how many entries along axis 1 have a smaller key (equal keys share a rank).

    Args:
      x: as for :func:`sorted_row_blocks`.
      keys_of: as for :func:`sorted_row_blocks`.

    Returns:
      An int32 array shaped like ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge.merging import ranks
      >>> ranks.row_ranks(jnp.asarray([[5, 1, 5, 3]], jnp.uint32)).tolist()
      [[2, 0, 2, 1]]
    """
    return sorted_row_blocks(x, lambda ordered, keys, first_row: smaller(ordered, keys), keys_of)


def _sort_columns(block: jax.Array) -> jax.Array:
    """Each column of ``block`` (``m x r``, ``m`` a power of two) sorted ascending by a bitonic
    network in its all-ascending form: each merge first compares mirrored halves, then halves."""
    m, r = block.shape
    size = 2
    while size <= m:
        halves = block.reshape(m // size, 2, size // 2, r)
        low, high = halves[:, 0], halves[:, 1, ::-1]
        block = jnp.concatenate([jnp.minimum(low, high), jnp.maximum(low, high)[:, ::-1]], axis=1).reshape(m, r)
        half = size // 4
        while half >= 1:
            pairs = block.reshape(m // (2 * half), 2, half, r)
            low, high = pairs[:, 0], pairs[:, 1]
            block = jnp.stack([jnp.minimum(low, high), jnp.maximum(low, high)], axis=1).reshape(m, r)
            half //= 2
        size *= 2
    return block
