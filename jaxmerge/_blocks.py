"""Loops over the entries of large arrays, a block of entries at a time.

A reduction on XLA's CPU backend reads its operand from memory: summing an elementwise
expression of large arrays (a product, a masked square, a direction ``x / |x|``) first
writes the whole expression out, a temporary as large as the arrays, and an expression that
a reduction and an elementwise result both read stays in memory between them. Folding over
blocks of the flattened arrays instead makes each block's values inside the loop, so that no
temporary is larger than a block, and leaves the elementwise results to fuse on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxmerge._sharding import explicit_sharding

BLOCK = 1 << 16  # entries read at a time


def fold(step: Callable, arrays: Sequence[jax.Array], init):
    """``carry = step(chunks, index, fresh, carry)`` over the entries of ``arrays`` (all of one
    shape, flattened), block by block.

    ``chunks`` are the arrays' entries of one block, ``index`` their flat indices (uint32) and
    ``fresh`` whether an earlier block has not already covered them: the last block starts
    early enough to end with the arrays, so the entries it shares with the one before come
    again, not fresh. Arrays of at most ``BLOCK`` entries are one block, with no loop (and
    ``fresh`` a scalar).

    Returns:
      The last carry (``init`` for empty arrays).
    """
    flat = [a.reshape(-1) for a in arrays]
    n = flat[0].size
    if n == 0:
        return init
    if n <= BLOCK:  # one block: no loop to compile
        return step(flat, lax.iota(jnp.uint32, n), jnp.ones((), jnp.bool_), init)
    size = BLOCK

    def body(b, carry):
        start = jnp.minimum(b * size, n - size)
        index = start.astype(jnp.uint32) + lax.iota(jnp.uint32, size)
        fresh = index >= (b * size).astype(jnp.uint32)
        return step([lax.dynamic_slice(f, (start,), (size,)) for f in flat], index, fresh, carry)
    return lax.fori_loop(0, -(-n // size), body, init)


def sums(values_of: Callable, arrays: Sequence[jax.Array], dtype) -> tuple[jax.Array, ...]:
    """The sums over all entries of the values ``values_of(chunks) -> tuple of arrays`` makes
    from blocks of ``arrays`` (see :func:`fold`), each value cast to ``dtype`` and summed in it.

    The block sums are added in order: the rounding is that of another order of summation
    than ``jnp.sum``'s. Explicitly sharded arrays are summed by ``jnp.sum`` (each device holds
    only its shards).
    """
    if explicit_sharding(arrays[0]) is not None:  # XLA's own sums, on each device's shards
        return tuple(jnp.sum(v.astype(dtype)) for v in values_of(list(arrays)))
    count = len(jax.eval_shape(values_of, [jax.ShapeDtypeStruct((1,), a.dtype) for a in arrays]))
    zero = jnp.zeros((), dtype)

    def step(chunks, index, fresh, totals):
        return tuple(t + jnp.sum(jnp.where(fresh, v.astype(dtype), zero)) for t, v in zip(totals, values_of(chunks)))
    return fold(step, arrays, (zero,) * count)
