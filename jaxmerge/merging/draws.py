"""Random keep masks for DARE and DELLA: one counter-based stream per leaf, drawn in blocks.

Entry ``i`` of a leaf (its row-major flat index) is kept with probability ``p_i`` when
``u_i < p_i``, with ``u_i = (w_i >> 8) / 2**24`` and ``w_i`` word ``i mod 2`` of the
Threefry-2x32 block (20 rounds, JAX's default generator) at counter ``(0, i // 2)`` under
the leaf's key. So the mask of a leaf depends on its key and its entries' positions only,
not on its sharding, and each block of the generator gives two entries (``jax.random.bernoulli``
spends one on each). An unsharded leaf is drawn a block of entries at a time, so that the
generator's temporaries stay in cache instead of being four arrays the size of the leaf, and
the generator's rounds are written out so that XLA fuses them: on CPU a mask of 16M entries
takes a tenth of ``jax.random.bernoulli``'s time (``benchmarks/merge_checkpoints.py`` measures
DARE and DELLA end to end). A large leaf held by the CPU outside ``jax.jit`` may
instead be drawn by a loop on the host over the same blocks (:func:`host_keep_mask`), with one
compiled kernel for leaves of every size. An explicitly sharded leaf draws each entry from its
own flat index, shard by shard, with the same result.

References:
  Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011 (Threefry).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge._host import assemble, block_starts
from jaxmerge._sharding import check_indexable, explicit_sharding, flat_index

DRAW_BLOCK = 1 << 19  # entries drawn at a time


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's, alternating every four rounds
_PARITY = 0x1BD11BDA  # the key schedule's third word is the key's words and this, exclusive-or'ed


def _words(keypair: jax.Array, counters: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both 32-bit words of the Threefry-2x32 block (20 rounds) at each counter ``(0, counter)``:
    the bits of ``jax.extend.random.threefry2x32_p``, written out round by round so that XLA
    fuses them into one loop. On CPU that primitive runs its rounds as a loop over whole arrays,
    and a mask drawn from it took 2.3 times as long."""
    schedule = (keypair[0], keypair[1], keypair[0] ^ keypair[1] ^ jnp.uint32(_PARITY))
    first, second = schedule[0] + jnp.zeros_like(counters), counters + schedule[1]
    for injection in range(1, 6):  # four rounds, then the schedule's next words and the count
        for r in _ROTATIONS[(injection - 1) % 2]:
            first = first + second
            second = ((second << r) | (second >> (32 - r))) ^ first
        first = first + schedule[injection % 3]
        second = second + schedule[(injection + 1) % 3] + jnp.uint32(injection)
    return first, second


def _uniform(words: jax.Array) -> jax.Array:
    """Uniforms on [0, 1) with 24 bits each: exact in float32."""
    return (words >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def check_size(size: int) -> None:
    """Refuse arrays whose flat indices do not fit the stream's 32-bit counters."""
    check_indexable(size, "random masks support")


def _keypair(key: jax.Array) -> jax.Array:
    """The two 32-bit words the stream's blocks are keyed by, drawn from ``key``."""
    return jax.random.bits(key, (2,), jnp.uint32)


def uniforms(key: jax.Array, index: jax.Array) -> jax.Array:
    """The uniforms ``u_i`` of the module docstring at the flat indices ``index`` (uint32, any
    shape and sharding), one generator block each: for entries drawn out of order, as DELLA
    draws them row block by row block of its ranking.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmerge.merging import draws
      >>> key, like = jax.random.key(0), jnp.zeros(6)
      >>> u = draws.uniforms(key, jnp.arange(6, dtype=jnp.uint32))
      >>> bool(((u < 0.5) == draws.keep_mask(key, 0.5, like)).all())
      True
    """
    return _uniforms_at(_keypair(key), index)


def run(key: jax.Array, start, count: int) -> jax.Array:
    """The uniforms ``u_i`` of the ``count`` entries from flat index ``start`` on (``start``
    may be traced): what :func:`uniforms` gives for ``start + arange(count)``, with the
    indices made inside the kernel.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmerge.merging import draws
      >>> key = jax.random.key(0)
      >>> bool((draws.run(key, 4, 6) == draws.uniforms(key, jnp.arange(4, 10, dtype=jnp.uint32))).all())
      True
    """
    return _run(_keypair(key), start, count)


def _run(keypair: jax.Array, start, count: int) -> jax.Array:
    return _uniforms_at(keypair, jnp.asarray(start).astype(jnp.uint32) + lax.iota(jnp.uint32, count))


def _uniforms_at(keypair: jax.Array, index: jax.Array) -> jax.Array:
    """:func:`uniforms` by a generator block per entry: on CPU quicker than interleaving the
    words of a block per pair of entries, which XLA does not fuse."""
    first, second = _words(keypair, index >> 1)
    return _uniform(jnp.where((index & 1) == 1, second, first))


@partial(jax.jit, keep_unused=True)  # ``like``'s devices place the mask even where only its shape is read
def keep_mask(key: jax.Array, probability, like: jax.Array) -> jax.Array:
    """Keep each entry of an array shaped like ``like`` with its own probability.

    Args:
      key: a ``jax.random`` key (any implementation; two 32-bit words are drawn from it).
      probability: a scalar, or an array shaped (and sharded) like ``like``.
      like: the array whose shape, and explicit sharding, the mask takes.

    Returns:
      A boolean array shaped like ``like``: entry ``i`` is ``u_i < probability_i`` for the
      uniforms ``u_i`` of the module docstring.

    Raises:
      JaxmergeError: ``like`` has ``2**32`` entries or more.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmerge.merging import draws
      >>> mask = draws.keep_mask(jax.random.key(0), 0.3, jnp.zeros((100, 100)))
      >>> 0.28 < float(mask.mean()) < 0.32
      True
    """
    check_size(like.size)
    probability = jnp.asarray(probability, jnp.float32)
    if explicit_sharding(like) is not None or like.size == 0:
        return uniforms(key, flat_index(like)) < probability
    return _blocked_mask(_keypair(key), probability, like.size).reshape(like.shape)


@partial(jax.jit, static_argnames="pairs")
def _mask_block(keypair: jax.Array, first_pair, probability, pairs: int) -> jax.Array:
    """The mask of the ``2 * pairs`` entries from pair ``first_pair`` on (see :func:`_blocked_mask`)."""
    return _run(keypair, 2 * first_pair, 2 * pairs) < probability


def host_keep_mask(key: jax.Array, probability, n: int) -> np.ndarray:
    """:func:`keep_mask` of a flat array of ``n >= DRAW_BLOCK`` entries with one ``probability``,
    drawn by a loop on the host, block by block as the jitted loop draws them, by one kernel
    compiled for arrays of every size.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmerge.merging import draws
      >>> key, like = jax.random.key(0), jnp.zeros(draws.DRAW_BLOCK + 3)
      >>> bool((draws.host_keep_mask(key, 0.3, like.size) == draws.keep_mask(key, 0.3, like)).all())
      True
    """
    check_size(n)
    keypair, probability = _keypair(key), jnp.asarray(probability, jnp.float32)
    pairs, size = -(-n // 2), DRAW_BLOCK // 2
    blocks = ((2 * s, (_mask_block(keypair, np.uint32(s), probability, size),)) for s in block_starts(pairs, size))
    return assemble(2 * pairs, blocks)[0][:n]


def _blocked_mask(keypair: jax.Array, probability: jax.Array, n: int) -> jax.Array:
    """The flat mask of ``n`` entries, drawn ``DRAW_BLOCK`` entries at a time; the last
    block starts early enough to end with the array (the entries it draws again come out the same)."""
    pairs = -(-n // 2)
    size = min(pairs, DRAW_BLOCK // 2)
    per_entry = probability.ndim > 0
    if per_entry:
        probability = probability.reshape(-1)
        if n % 2:
            probability = jnp.pad(probability, (0, 1))

    def block(b, mask):
        start = jnp.minimum(b * size, pairs - size)
        uniform = _run(keypair, 2 * start, 2 * size)
        p = lax.dynamic_slice(probability, (2 * start,), (2 * size,)) if per_entry else probability
        return lax.dynamic_update_slice(mask, uniform < p, (2 * start,))
    return lax.fori_loop(0, -(-pairs // size), block, jnp.zeros(2 * pairs, jnp.bool_))[:n]
