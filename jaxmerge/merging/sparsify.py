"""Sparsification of task vectors: exact magnitude top-k, random drop, breadcrumbs, DELLA.

These are array-level, jit-compatible building blocks; the task-vector merges (TIES, DARE,
breadcrumbs, DELLA, SCE) are made of them. Each sparsifier is a typed strategy
(:class:`Magnitude`, :class:`Breadcrumbs`, :class:`Random`, :class:`Ranked`) that resolves
its hyperparameters once per leaf and makes the mask inside the jitted kernel (or, for the
large leaves of an eager merge on the CPU, DARE's and DELLA's random masks by a loop on the
host over blocks of one shape, so that leaves of every shape share one compiled kernel); the
public ``*_mask`` functions run the same strategies on one array. :func:`rescale` then
zeroes the dropped entries and rescales the kept ones.

Exact top-k without sorting: ``jnp.sort`` and ``lax.top_k`` are 20-100x slower than a
selection on XLA's CPU backend. :func:`kth_largest_magnitude` instead runs a radix select
on the bit patterns of the magnitudes (for non-negative floats the unsigned bit pattern
orders like the value): two passes of 16-bit histograms for float32 (one for 16-bit floats),
each a loop of scatter-adds over blocks of the array, so that no temporary is as large as the
array; three passes of 11-bit digits took 19% longer on a float32 embedding and 35% on a
bfloat16 MLP matrix. :func:`top_k_mask` keeps exactly ``k`` entries; among entries whose
magnitude equals the threshold it keeps those with the lowest flat index (what a stable
descending sort does), so the result is deterministic on every backend.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from jaxmerge import _blocks
from jaxmerge._host import on_host
from jaxmerge._sharding import check_indexable, explicit_sharding, flat_index, like, local_then_sum, per_shard, reshard
from jaxmerge._tree import acc_dtype, exact_jit
from jaxmerge.errors import JaxmergeError
from jaxmerge.merging import draws, ranks

_DIGIT_BITS = 16  # two histogram passes for 32-bit keys, one for 16-bit ones
SORT_LIMIT = 4096  # top_k_mask and kth_largest sort arrays up to this size: compiling a sort is far quicker
_UNSIGNED = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


@functools.partial(jax.tree_util.register_dataclass, data_fields=("arrays",), meta_fields=("fn",))
@dataclasses.dataclass(frozen=True)
class Elementwise:
    """An elementwise function ``fn`` of arrays of one shape (a task vector, a variance across
    models) that the selections make where they read it: block by block inside their loops,
    elementwise elsewhere, so that it is never an array of its own. ``fn`` is static: a
    frozen dataclass compares by value. Explicitly sharded ones are made whole first."""

    arrays: tuple[jax.Array, ...]
    fn: Callable

    def whole(self) -> jax.Array:
        return self.fn(*self.arrays)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.arrays[0].shape

    @property
    def size(self) -> int:
        return self.arrays[0].size


@dataclasses.dataclass(frozen=True)
class _Difference:
    dtype: Any

    def __call__(self, model: jax.Array, base: jax.Array) -> jax.Array:
        return model.astype(self.dtype) - base.astype(self.dtype)


def difference(model: jax.Array, base: jax.Array, dtype) -> Elementwise:
    """The task vector ``model - base``, both cast to ``dtype``, made where it is read."""
    return Elementwise((model, base), _Difference(np.dtype(dtype)))


def _parts(x) -> tuple[list[jax.Array], Callable]:
    """The arrays that ``x`` (an array or an :class:`Elementwise`) is read from, and the
    function making a block of its values from their blocks."""
    if isinstance(x, Elementwise):
        return list(x.arrays), lambda chunks: x.fn(*chunks)
    return [x], lambda chunks: chunks[0]


def _array_or_whole_if_sharded(x):
    """``x``, made whole when it is an :class:`Elementwise` of explicitly sharded arrays (the
    sharded paths index and reshard plain arrays)."""
    return x.whole() if isinstance(x, Elementwise) and explicit_sharding(x.arrays[0]) is not None else x


def _unsigned_bits(magnitude: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(magnitude, _UNSIGNED[magnitude.dtype.itemsize])


def _magnitude_bits(x: jax.Array) -> jax.Array:
    """Unsigned keys that order like ``|x|``."""
    return _unsigned_bits(jnp.abs(x))


def _digit_shifts(width: int) -> list[tuple[int, int]]:
    """``(shift, bits)`` of each radix digit, most significant first."""
    shifts = []
    top = width
    while top > 0:
        bits = min(_DIGIT_BITS, top)
        shifts.append((top - bits, bits))
        top -= bits
    return shifts


def _blocked_histogram(digits_of: Callable, arrays: Sequence[jax.Array], bins: int) -> jax.Array:
    """A histogram over the entries of ``arrays`` (all of one shape), read block by block
    (:func:`jaxmerge._blocks.fold`) so that no temporary is larger than a block:
    ``digits_of(chunks, index) -> (bin of each entry, whether it counts)``, with ``index``
    each entry's flat index."""
    def step(chunks, index, fresh, hist):
        digit, counts = digits_of(chunks, index)
        return hist.at[digit].add((counts & fresh).astype(jnp.int32))
    return _blocks.fold(step, arrays, jnp.zeros(bins, jnp.int32))


def _radix_select(keys_of: Callable, arrays: Sequence[jax.Array], k: jax.Array, *args) -> tuple[jax.Array, ...]:
    """The k-th largest of the unsigned keys that ``keys_of(chunks, index, *args) -> (keys,
    valid)`` gives for blocks of ``arrays`` (counting only valid ones; ``args`` are scalars),
    for k >= 1; with it, the rank of the k-th among the keys equal to it (``k`` minus the
    count of larger keys) and the count of keys equal to it. ``k`` may be a vector of ranks
    (each result is then a vector), selected together in the same passes.

    One loop step per radix digit, most significant first: a histogram of that digit over
    the keys whose higher digits equal those chosen so far, then the digit whose bin holds
    the k-th largest. With several ranks, a key counts in the histogram of the first rank
    whose chosen digits its higher digits equal (ranks with the same digits so far share that
    histogram), so each pass adds each key once however many ranks it selects. The keys are
    made block by block, never for a whole array; explicitly sharded arrays are counted shard
    by shard and the histograms summed.
    """
    one = [jax.ShapeDtypeStruct((1,), a.dtype) for a in arrays]
    width = jax.eval_shape(lambda chunks: keys_of(chunks, jnp.zeros(1, jnp.uint32), *args)[0], one).dtype.itemsize * 8
    digits = _digit_shifts(width)
    key_type = _UNSIGNED[width // 8]
    table = {name: jnp.asarray(values, key_type) for name, values in (
        ("shift", [shift for shift, _ in digits]),
        ("mask", [(1 << bits) - 1 for _, bits in digits]),
        ("higher", [(1 << width) - (1 << (shift + bits)) for shift, bits in digits]))}  # bits above the digit
    bins = 1 << _DIGIT_BITS
    ranks = jnp.asarray(k, jnp.int32).reshape(-1)

    def step(j, carry):
        prefix, k, _ = carry
        shift, mask, higher = table["shift"][j], table["mask"][j], table["higher"][j]
        chosen = prefix & higher
        owner = jnp.argmax(chosen[:, None] == chosen[None, :], axis=1)  # the first rank with the same digits

        def histogram(*operands):
            local, (chosen, shift, mask, higher, *rest) = operands[:len(arrays)], operands[len(arrays):]

            def digits_of(chunks, index):
                keys, valid = keys_of(chunks, index, *rest)
                first = _first_match(keys & higher, chosen)
                digit = ((keys >> shift) & mask).astype(jnp.int32)
                return digit + first * bins, (first < chosen.size) & valid
            return _blocked_histogram(digits_of, local, chosen.size * bins)
        hist = local_then_sum(histogram, arrays, (chosen, shift, mask, higher, *args)).reshape(-1, bins)[owner]
        at_least = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # at_least[r, d] = count of digits >= d
        d = jnp.sum(at_least >= k[:, None], axis=1) - 1
        rows = jnp.arange(k.size)
        above = jnp.where(d + 1 < bins, at_least[rows, jnp.minimum(d + 1, bins - 1)], 0)
        return prefix | (d.astype(key_type) << shift), k - above, hist[rows, d]

    start = (jnp.zeros(ranks.shape, key_type), ranks, jnp.zeros(ranks.shape, jnp.int32))
    return tuple(r.reshape(jnp.shape(k)) for r in lax.fori_loop(0, len(digits), step, start))


def _first_match(prefixes: jax.Array, chosen: jax.Array) -> jax.Array:
    """Per key prefix, the index of the first of the (few) ``chosen`` prefixes it equals, or
    ``chosen.size``: a chain of selections, which XLA's CPU backend runs several times faster
    than an ``argmax`` over a trailing axis of matches (a reduction of pairs)."""
    first = jnp.full(prefixes.shape, chosen.size, jnp.int32)
    for r in reversed(range(chosen.size)):
        first = jnp.where(prefixes == chosen[r], r, first)
    return first


def _magnitude_keys(value: Callable) -> Callable:
    """``keys_of`` for :func:`_radix_select`: the magnitude keys of ``value(chunks)``."""
    return lambda chunks, index: (_magnitude_bits(value(chunks)), True)


def _signed_keys(chunks, index):
    return _ordered_keys(chunks[0]), True


def _ordered_keys(x: jax.Array) -> jax.Array:
    """Unsigned keys that order like the float values of ``x`` (negative ones bit-reversed)."""
    bits = _unsigned_bits(x)
    top = bits.dtype.type(1 << (bits.dtype.itemsize * 8 - 1))
    return jnp.where((bits & top) != 0, ~bits, bits | top)


def _float_of_key(key: jax.Array, dtype) -> jax.Array:
    top = key.dtype.type(1 << (key.dtype.itemsize * 8 - 1))
    return lax.bitcast_convert_type(jnp.where((key & top) != 0, key & ~top, ~key), dtype)


@jax.jit
def kth_largest(x: jax.Array, k) -> jax.Array:
    """The k-th largest value of ``x`` (signed), exactly, without a sort.

    A radix select on keys that order like the values: a few histogram passes over the
    array (two for float32), each one scatter-add. Arrays of at most ``SORT_LIMIT`` entries
    (not explicitly sharded) are sorted instead, which compiles far quicker.

    Args:
      x: a float array.
      k: the rank, 1-based; clipped to ``[1, x.size]``; may be traced. A vector of ranks is
        selected in the same passes.

    Returns:
      A scalar of ``x``'s dtype (a vector for a vector ``k``): the k-th largest entry (equal
      entries counted separately).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> float(sparsify.kth_largest(jnp.asarray([0.5, -4.0, 2.0, -1.0]), 3))
      -1.0
      >>> sparsify.kth_largest(jnp.asarray([0.5, -4.0, 2.0, -1.0]), jnp.asarray([1, 4])).tolist()
      [2.0, -4.0]
    """
    k = jnp.clip(k, 1, x.size)
    if x.size <= SORT_LIMIT and explicit_sharding(x) is None:
        return jnp.sort(x.reshape(-1))[x.size - k]
    key, _, _ = _radix_select(_signed_keys, [x], k)
    return _float_of_key(key, x.dtype)


@jax.jit
def kth_largest_magnitude(x: jax.Array, k) -> jax.Array:
    """The k-th largest magnitude of ``x``, exactly, without a sort (:func:`kth_largest` of ``|x|``).

    Args:
      x: a float array.
      k: the rank, 1-based; clipped to ``[1, x.size]``; may be traced.

    Returns:
      A scalar of ``x``'s dtype: the k-th largest ``|x|`` (equal magnitudes counted separately).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> float(sparsify.kth_largest_magnitude(jnp.asarray([0.5, -4.0, 2.0, -1.0]), 2))
      2.0
    """
    key, _, _ = _radix_select(_magnitude_keys(_parts(x)[1]), [x], jnp.clip(k, 1, x.size))  # made block by block
    return lax.bitcast_convert_type(key, x.dtype)


@jax.jit
def top_k_mask(x: jax.Array, k) -> jax.Array:
    """Mask of exactly ``clip(k, 0, x.size)`` entries of largest ``|x|``, ties to the lower index.

    Among entries whose magnitude equals the threshold, those with the lowest flat index are
    kept, as a stable descending sort would keep them. Costs a few histogram passes over
    ``x`` (:func:`kth_largest_magnitude`), plus a counting pass when some of the entries
    sharing the threshold magnitude are dropped (frequent in task vectors: a difference of
    two float32 values near 1 has few distinct values near 0.01); no sort. Arrays of at
    most ``SORT_LIMIT`` entries (not explicitly sharded) are ranked by a stable sort
    instead: the same mask, and on CPU a fraction of the selection's compile time, which
    dominates for small arrays.

    Args:
      x: a float array of fewer than ``2**32`` entries, or a :class:`Elementwise`.
      k: how many entries to keep; may be traced.

    Returns:
      A boolean array shaped like ``x``.

    Raises:
      JaxmergeError: ``x`` has ``2**32`` entries or more.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> sparsify.top_k_mask(jnp.asarray([1.0, -3.0, 3.0, 0.5]), 2).tolist()
      [False, True, True, False]
      >>> sparsify.top_k_mask(jnp.asarray([2.0, -2.0, 2.0]), 2).tolist()  # ties: the lower indices
      [True, True, False]
    """
    return _top_k_masks(x, jnp.asarray(k, jnp.int32)[None])[0]


def _top_k_masks(x, ks: jax.Array) -> tuple[jax.Array, ...]:
    """:func:`top_k_mask` for each count of the vector ``ks``, selected together (see
    :func:`_radix_select`)."""
    check_indexable(x.size, "top_k_mask supports")
    x = _array_or_whole_if_sharded(x)
    arrays, value = _parts(x)
    sharded = explicit_sharding(arrays[0]) is not None
    if x.size <= SORT_LIMIT and not sharded:
        order = jnp.argsort(-jnp.abs(value(arrays)).reshape(-1), stable=True)  # equal magnitudes: lower index first
        ranks = jnp.zeros(x.size, jnp.int32).at[order].set(jnp.arange(x.size, dtype=jnp.int32)).reshape(x.shape)
        return tuple(ranks < k for k in ks)

    magnitude_keys = _magnitude_keys(value)
    thresholds, needs, equals = _radix_select(magnitude_keys, arrays, jnp.clip(ks, 1, x.size))

    def last_kept_index(threshold, need):
        """Sharded: the flat index of the ``need``-th entry of magnitude ``threshold``, by a radix
        selection of the largest keys ``~index``, the flat index carried as an array of its own
        (a shard's blocks know theirs only within the shard)."""
        def keys(chunks, index, threshold):
            return ~chunks[-1], magnitude_keys(chunks[:-1], index)[0] == threshold
        return ~_radix_select(keys, arrays + [flat_index(x)], need, threshold)[0]

    def tied_at(chunks, index):
        block_keys = magnitude_keys(chunks, index)[0]
        return [block_keys == threshold for threshold in thresholds]

    every = jnp.full((), np.iinfo(np.uint32).max, jnp.uint32)  # keeps every equal entry
    tied = equals != needs  # ranks that keep only some of the entries equal to their threshold
    if sharded:
        lasts = [lax.cond(t, functools.partial(last_kept_index, threshold, need), lambda: every)
                 for t, threshold, need in zip(tied, thresholds, needs)]
    else:  # one counting pass for every rank (:func:`_nth_flagged`)
        found = lax.cond(jnp.any(tied), lambda: _nth_flagged(tied_at, arrays, needs),
                         lambda: jnp.zeros(needs.shape, jnp.uint32))
        lasts = list(jnp.where(tied, found, every))
    keys = magnitude_keys(arrays, None)[0]  # fused into the masks: never a whole array
    return tuple(((keys > threshold) | ((keys == threshold) & (flat_index(arrays[0]) <= last))) & (k > 0)
                 for k, threshold, last in zip(ks, thresholds, lasts))


def _nth_flagged(flags_of: Callable, arrays: Sequence[jax.Array], n: jax.Array) -> jax.Array:
    """For each entry of the vector ``n``, the flat index (uint32) of the ``n[r]``-th entry
    (1-based; ``1 <= n[r] <=`` their count) for which flag ``r`` of ``flags_of(chunks, index)``
    (a list of flag arrays) holds, over blocks of unsharded ``arrays``
    (:func:`jaxmerge._blocks.fold`): one pass counting each block's flags, and, in the block
    where a count reaches its ``n[r]``, a binary search (a radix selection of the index would
    take a histogram pass per 16 bits)."""
    def step(chunks, index, fresh, carry):
        seen, found = carry
        flags = [f & fresh for f in flags_of(chunks, index)]
        count = jnp.stack([jnp.sum(f, dtype=jnp.int32) for f in flags])
        crossing = (seen < n) & (seen + count >= n)
        found = jnp.stack([lax.cond(crossing[r], functools.partial(_nth_in_block, flags[r], index, n[r] - seen[r]),
                                    lambda r=r: found[r]) for r in range(n.size)])
        return seen + count, found
    return _blocks.fold(step, arrays, (jnp.zeros(n.shape, jnp.int32), jnp.zeros(n.shape, jnp.uint32)))[1]


def _nth_in_block(flags: jax.Array, index: jax.Array, n: jax.Array) -> jax.Array:
    """``index`` of the ``n``-th set entry of the flat ``flags`` (1-based, and there are that
    many): a binary search for the shortest prefix of ``flags`` holding ``n`` set entries."""
    position = lax.iota(jnp.int32, flags.size)

    def halve(_, bounds):
        short, long = bounds  # the prefix of length ``short`` holds fewer than n, that of ``long`` n
        middle = (short + long) // 2
        enough = jnp.sum(flags & (position < middle), dtype=jnp.int32) >= n
        return jnp.where(enough, short, middle), jnp.where(enough, middle, long)
    _, long = lax.fori_loop(0, flags.size.bit_length(), halve, (jnp.int32(0), jnp.int32(flags.size)))
    return index[long - 1]


def num_kept(density, size: int):
    """How many of ``size`` entries a density keeps: ``int(density * size)``, as mergekit counts.

    Concrete densities (Python or NumPy numbers and vectors) are multiplied in float64, as
    mergekit does; traced ones in float32 (rounding may then differ by one entry).

    Args:
      density: a fraction, or a vector of them.
      size: the number of entries.

    Returns:
      An int, an int32 NumPy vector, or a traced int32 array.

    Examples:
      >>> from jaxmerge import sparsify
      >>> sparsify.num_kept(0.7, 10), sparsify.num_kept(0.333, 10)
      (7, 3)
    """
    if isinstance(density, (int, float)):
        return int(density * size)
    if isinstance(density, np.ndarray):
        return np.asarray([int(float(d) * size) for d in density.reshape(-1)], np.int32).reshape(density.shape)
    return jnp.floor(jnp.asarray(density, jnp.float32) * size).astype(jnp.int32)


class MagnitudeParams(NamedTuple):
    density: Any  # fraction kept
    k: Any  # entries kept, int(density * size)


class BandParams(NamedTuple):
    density: Any
    k: Any
    top: Any  # outliers dropped, int(gamma * size)


class RandomParams(NamedTuple):
    density: Any  # keep probability


class RankedParams(NamedTuple):
    density: Any  # mean keep probability
    epsilon: Any  # its spread across magnitude ranks


def _concrete_pairs(a, b) -> list[tuple[float, float]]:
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return []
    return list(zip(np.reshape(a, -1).tolist(), np.reshape(b, -1).tolist()))


class Sparsifier:
    """How a task vector is sparsified: a typed strategy that resolves its hyperparameters once
    per leaf (:meth:`leaf_params`, a NamedTuple of arrays) and then makes the mask inside the
    jitted kernel (:meth:`mask`), or before it from the host (:meth:`host_mask`). Instances
    are hashable, so a kernel takes one as a static argument. The public ``*_mask``
    functions of this module call the same two methods.

    Attributes:
      hyperparameters: the per-model hyperparameters it reads, by name.
      random: whether :meth:`mask` draws from a random key.
    """

    hyperparameters: tuple[str, ...] = ("density",)
    random: bool = False

    def leaf_params(self, size: int, where: str = "", **values) -> NamedTuple:
        """The kernel's parameters for a leaf of ``size`` entries, from the hyperparameters'
        values (scalars or per-model vectors), after checking they fit together."""
        raise NotImplementedError

    def mask(self, x: jax.Array, params: NamedTuple, key: jax.Array | None) -> tuple[jax.Array, Any]:
        """``(mask of the kept entries, keep probability of each)`` of a task vector ``x`` (an
        array or a :class:`Elementwise`), for one model's params."""
        raise NotImplementedError

    def host_mask(self, x: Elementwise, params: NamedTuple, key: jax.Array | None, *, exact: bool,
                  with_keep: bool) -> tuple[np.ndarray, Any] | None:
        """:meth:`mask`'s pair for a task vector of arrays on the host (see
        :func:`~jaxmerge._host.on_host`), made by a loop on the host over blocks of one
        shape, by kernels compiled once for leaves of every shape; or ``None`` where the
        jitted kernel makes the mask (the default). The mask is the one :meth:`mask` makes;
        the keep probability is left out (``None``) unless ``with_keep``. ``exact`` is the
        kernel's (see :func:`~jaxmerge._tree.compute_dtype`)."""
        return None

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return type(self).__name__


class Magnitude(Sparsifier):
    """TIES trim (arXiv 2306.01708): keep the ``max(1, int(density * n))`` largest magnitudes
    (a positive density keeps at least one entry, as in mergekit)."""

    def leaf_params(self, size, where="", *, density):
        return MagnitudeParams(density, jnp.maximum(num_kept(density, size), 1))

    def mask(self, x, params, key):
        return top_k_mask(x, params.k), params.density


class Breadcrumbs(Sparsifier):
    """Model Breadcrumbs (arXiv 2312.06795): drop the ``gamma`` fraction of largest magnitudes
    as outliers, then the smallest, keeping the ``k = int(density * n)`` entries ranked
    ``[top, top + k)`` by descending magnitude, ``top = min(int(gamma n), n - k)``: where
    ``gamma + density > 1`` fewer outliers are dropped, as in mergekit."""

    hyperparameters = ("density", "gamma")

    def leaf_params(self, size, where="", *, density, gamma):
        k = num_kept(density, size)
        top = num_kept(gamma, size)
        return BandParams(density, k, jnp.minimum(top, size - k))

    def mask(self, x, params, key):
        return band_mask(x, params.top, params.k), params.density


class Random(Sparsifier):
    """DARE's drop (arXiv 2311.03099): keep each entry independently with probability ``density``."""

    random = True

    def leaf_params(self, size, where="", *, density):
        return RandomParams(density)

    def mask(self, x, params, key):
        return draws.keep_mask(key, params.density, _parts(x)[0][0]), params.density

    def host_mask(self, x, params, key, *, exact, with_keep):
        if x.size < draws.DRAW_BLOCK or not on_host(_parts(x)[0], key, params):
            return None
        return draws.host_keep_mask(key, params.density, x.size).reshape(x.shape), params.density


class Ranked(Sparsifier):
    """DELLA's MagPrune (arXiv 2406.11617): keep each entry with a probability that rises with
    its magnitude rank within its row, from ``density - epsilon`` to ``density + epsilon``."""

    hyperparameters = ("density", "epsilon")
    random = True

    def leaf_params(self, size, where="", *, density, epsilon):
        for e, d in _concrete_pairs(epsilon, density):
            if d < 1 and (d - e <= 0 or d + e >= 1):
                raise JaxmergeError("epsilon must keep density +/- epsilon inside (0, 1), got "
                                    f"epsilon={e:g} and density={d:g}{where}")
        return RankedParams(density, epsilon)

    def mask(self, x, params, key):
        return _ranked_draws(x, params.density, params.epsilon, key)

    def host_mask(self, x, params, key, *, exact, with_keep):
        if not (isinstance(x, Elementwise) and len(x.shape) == 2 and ranks.layout(*x.shape)[1]
                and on_host(x.arrays, key, params)):
            return None
        draws.check_size(x.size)
        drawn = ranks.host_row_blocks(functools.partial(_block_keys, fn=x.fn, exact=exact),
                                      functools.partial(_ranked_block, key=key, density=params.density,
                                                        epsilon=params.epsilon, probabilities=with_keep),
                                      [np.asarray(a) for a in x.arrays])
        return drawn if with_keep else (drawn[0], None)


MAGNITUDE, BREADCRUMBS, RANDOM, RANKED = Magnitude(), Breadcrumbs(), Random(), Ranked()


def magnitude_mask(x: jax.Array, density) -> jax.Array:
    """Mask of the ``max(1, int(density * x.size))`` entries of largest magnitude (TIES' trim).

    The same strategy (:class:`Magnitude`) as :func:`jaxmerge.ties` uses; ties in
    magnitude go to the lower index (:func:`top_k_mask`).

    Args:
      x: a float array (a task vector).
      density: the fraction to keep, in (0, 1].

    Returns:
      A boolean array shaped like ``x``.

    References:
      Yadav et al., "TIES-Merging", arXiv 2306.01708.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> sparsify.magnitude_mask(jnp.asarray([0.1, -3.0, 2.0, 0.5]), 0.5).tolist()
      [False, True, True, False]
    """
    return MAGNITUDE.mask(x, MAGNITUDE.leaf_params(x.size, density=density), None)[0]


def breadcrumbs_mask(x: jax.Array, density, gamma) -> jax.Array:
    """Model Breadcrumbs' mask: drop the largest magnitudes as outliers and the smallest.

    Keeps the entries ranked ``[int(gamma n), int(gamma n) + int(density n))`` by descending
    magnitude, the same strategy (:class:`Breadcrumbs`) as :func:`jaxmerge.breadcrumbs` uses.

    Args:
      x: a float array (a task vector).
      density: the fraction kept, in (0, 1].
      gamma: the fraction dropped from the top, in [0, 1); where ``gamma + density > 1``,
        fewer are dropped so that ``density`` of the entries remain.

    Returns:
      A boolean array shaped like ``x``.

    References:
      Davari & Belilovsky, "Model Breadcrumbs", arXiv 2312.06795.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> sparsify.breadcrumbs_mask(jnp.asarray([0.1, -3.0, 2.0, 0.5]), 0.5, 0.25).tolist()
      [False, False, True, True]
    """
    return BREADCRUMBS.mask(x, BREADCRUMBS.leaf_params(x.size, density=density, gamma=gamma), None)[0]


def band_mask(x: jax.Array, top, count) -> jax.Array:
    """Mask of the ``count`` entries ranked just below the ``top`` largest magnitudes.

    Args:
      x: a float array.
      top: how many of the largest magnitudes to skip; may be traced.
      count: how many entries to keep after them; may be traced.

    Returns:
      A boolean array shaped like ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> sparsify.band_mask(jnp.asarray([4.0, 3.0, 2.0, 1.0]), 1, 2).tolist()
      [False, True, True, False]
    """
    kept, outliers = _top_k_masks(x, jnp.stack([jnp.asarray(top + count, jnp.int32), jnp.asarray(top, jnp.int32)]))
    return kept & ~outliers


def random_mask(key: jax.Array, x: jax.Array, density) -> jax.Array:
    """DARE's drop: keep each entry independently with probability ``density``.

    The same strategy (:class:`Random`) as :func:`jaxmerge.dare_linear` uses.

    Args:
      key: a ``jax.random`` key.
      x: a float array (a task vector); only its shape is used.
      density: the keep probability, in (0, 1].

    Returns:
      A boolean array shaped like ``x``.

    References:
      Yu et al., "Language models are Super Mario", arXiv 2311.03099.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> mask = sparsify.random_mask(jax.random.key(0), jnp.ones(10_000), 0.3)
      >>> 0.28 < float(mask.mean()) < 0.32
      True
    """
    return RANDOM.mask(x, RANDOM.leaf_params(x.size, density=density), key)[0]


def della_probabilities(x: jax.Array, density, epsilon) -> jax.Array:
    """DELLA's MagPrune keep probabilities, with mergekit's ranks and scale.

    Within each row (axis 1; a 1-d array is one row) entries are ranked by magnitude, and
    the keep probability rises linearly with rank from ``density - epsilon`` (smallest)
    to ``density + epsilon`` (largest): ``density - epsilon + 2 epsilon rank / (n - 1)``.
    An entry's rank is the number of entries of its row of smaller magnitude, so equal
    magnitudes (frequent in 16-bit task vectors) share one probability; mergekit ranks them
    in its sort's unspecified order. The ranks are those of the magnitudes' bit patterns as
    unsigned integers (they order like the values), by :func:`jaxmerge.merging.ranks.row_ranks`.

    Args:
      x: a float array (a task vector).
      density: the mean keep probability.
      epsilon: the spread around it.

    Returns:
      A float32 array shaped like ``x``.

    References:
      Deep et al., "DELLA-Merging", arXiv 2406.11617.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> [round(p, 3) for p in sparsify.della_probabilities(jnp.asarray([0.1, -2.0, 1.0]), 0.5, 0.2).tolist()]
      [0.3, 0.7, 0.5]
      >>> [round(p, 3) for p in sparsify.della_probabilities(jnp.asarray([1.0, -1.0, 3.0]), 0.5, 0.2).tolist()]
      [0.3, 0.3, 0.7]
    """
    return _ranked_draws(x, density, epsilon, None)[1]


def _ranked_draws(x, density, epsilon, key: jax.Array | None) -> tuple[jax.Array | None, jax.Array]:
    """DELLA's ``(mask, probabilities)`` for an array or an :class:`Elementwise` ``x`` (no mask
    without a key). Unsharded, each block of rows is drawn as soon as it is sorted, and an
    entry's keep test looks its row up once (:func:`_ranked_keep`): when only the mask is
    used, neither the ranks nor the probabilities are searched for or kept."""
    x = _array_or_whole_if_sharded(x)
    arrays, value = _parts(x)
    shape = x.shape if len(x.shape) >= 2 else (1, x.size)
    n = shape[1]
    density, epsilon = jnp.asarray(density, jnp.float32), jnp.asarray(epsilon, jnp.float32)
    if key is not None and explicit_sharding(arrays[0]) is None:
        draws.check_size(x.size)

        def finish(ordered, keys, first_row):
            return _ranked_block_draws(ordered, keys, first_row, key, n, math.prod(shape[2:]), density, epsilon, True)
        rows = tuple(a.reshape(shape) for a in arrays)
        mask, probabilities = ranks.sorted_row_blocks(rows, finish, lambda *blocks: _magnitude_bits(value(blocks)))
        return mask.reshape(x.shape), probabilities.reshape(x.shape)
    x = value(arrays)  # a plain array from here on
    rows = x.reshape(shape)
    # sorting needs the ranked axis whole on each device: gather it (only it) if it is sharded
    sharding = explicit_sharding(rows)
    if sharding is not None and sharding.spec[1:2] != (None,) and len(sharding.spec) > 1:
        rows = reshard(rows, PartitionSpec(sharding.spec[0], None, *sharding.spec[2:]), rows)
    rank = like(per_shard(lambda r: ranks.row_ranks(r, _magnitude_bits), rows).reshape(x.shape), x)
    if key is None:
        return None, _probabilities(rank, n, density, epsilon)
    draws.check_size(x.size)
    mask = _ranked_keep(draws.uniforms(key, flat_index(x)), lambda count: rank >= count, n, density, epsilon)
    return mask, _probabilities(rank, n, density, epsilon)


def _probabilities(rank: jax.Array, n: int, density, epsilon) -> jax.Array:
    """DELLA's keep probabilities of entries of these ranks in rows of ``n``."""
    relative = rank.astype(jnp.float32) / (n - 1) if n > 1 else jnp.full(rank.shape, 0.5)
    return density - epsilon + relative * 2 * epsilon


def _ranked_block_draws(ordered, keys, first_row, key, n: int, inner: int, density, epsilon, probabilities: bool):
    """DELLA's keep mask (and, if ``probabilities``, the keep probabilities) of one block of
    rows (:func:`jaxmerge.merging.ranks.sorted_row_blocks`' layout: the ranked axis, of ``n``
    entries, moved last; ``inner`` the product of the axes after it), given its keys and
    their sorted rows."""
    if inner == 1:  # the block is a run of entries
        uniform = draws.run(key, first_row.astype(jnp.uint32) * n, keys.size).reshape(keys.shape)
    else:
        row = first_row.astype(jnp.uint32) + lax.broadcasted_iota(jnp.uint32, keys.shape, 0)  # moved rows
        index = (row // inner) * (n * inner) + lax.broadcasted_iota(jnp.uint32, keys.shape, 1) * inner
        uniform = draws.uniforms(key, index + row % inner)
    keep = _ranked_keep(uniform, lambda count: ranks.at_least(ordered, keys, count), n, density, epsilon)
    if not probabilities:
        return keep
    return keep, _probabilities(ranks.smaller(ordered, keys), n, density, epsilon)  # searched only if used


@exact_jit(("fn",))
def _block_keys(blocks, *, fn, exact=False):
    """The magnitude keys of a block of rows of a matrix whose task vector is ``fn(*blocks)``."""
    return _magnitude_bits(fn(*blocks))


@functools.partial(jax.jit, static_argnames="probabilities")
def _ranked_block(ordered, keys, first_row, key, density, epsilon, *, probabilities):
    """:func:`_ranked_block_draws` of a block of rows of a matrix, as a tuple: one kernel for
    every matrix with rows of the same length."""
    drawn = _ranked_block_draws(ordered, keys, first_row, key, keys.shape[1], 1, jnp.asarray(density, jnp.float32),
                                jnp.asarray(epsilon, jnp.float32), probabilities)
    return drawn if probabilities else (drawn,)


def _ranked_keep(uniform, at_least: Callable, n: int, density, epsilon) -> jax.Array:
    """DELLA's keep test, from each entry's uniform ``u`` (see :mod:`~jaxmerge.merging.draws`):
    its rank (``at_least(count)``: whether it reaches ``count``) reaches ``ceil((u - (density -
    epsilon)) (n - 1) / (2 epsilon))`` (float32), which holds with probability ``density -
    epsilon + 2 epsilon rank / (n - 1)``, the entry's keep probability; ``u < density`` where
    that probability is the same for every entry (rows of one entry, or ``epsilon`` 0)."""
    plain = uniform < density
    if n == 1:
        return plain
    scaled = (uniform - (density - epsilon)) * ((n - 1) / (2 * epsilon))
    count = jnp.ceil(jnp.clip(scaled, -1, n)).astype(jnp.int32)  # clipped: no overflow, an infinity when epsilon is 0
    return jnp.where(epsilon > 0, at_least(count), plain)


def della_mask(key: jax.Array, x: jax.Array, density, epsilon) -> tuple[jax.Array, jax.Array]:
    """DELLA's random drop, each entry kept with its magnitude-ranked probability.

    The same strategy (:class:`Ranked`) as :func:`jaxmerge.della` uses.

    Args:
      key: a ``jax.random`` key.
      x: a float array (a task vector).
      density: the mean keep probability.
      epsilon: the spread: ``density +/- epsilon`` must lie inside (0, 1) unless
        ``density == 1``.

    Returns:
      ``(mask, probabilities)``, both shaped like ``x`` (see :func:`della_probabilities`).

    Raises:
      JaxmergeError: ``density +/- epsilon`` outside (0, 1).

    References:
      Deep et al., "DELLA-Merging", arXiv 2406.11617.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> mask, probabilities = sparsify.della_mask(jax.random.key(0), jnp.ones((2, 3)), 0.5, 0.1)
      >>> mask.shape, mask.dtype.name
      ((2, 3), 'bool')
    """
    return RANKED.mask(x, RANKED.leaf_params(x.size, density=density, epsilon=epsilon), key)


RESCALE_NORMS = (None, "l1", "l2", "linf", "density")


def _norm(x: jax.Array, norm: str) -> jax.Array:
    """The norm of ``x``, accumulated in float32 (float64) and cast to its dtype (as torch's are)."""
    wide = x.astype(acc_dtype(x.dtype))
    if norm == "l1":
        value = jnp.sum(jnp.abs(wide))
    elif norm == "l2":
        value = jnp.sqrt(jnp.sum(jnp.square(wide)))
    else:
        value = jnp.max(jnp.abs(wide))
    return value.astype(x.dtype)


def rescale(x: jax.Array, mask: jax.Array, norm: str | None, keep_probability=None,
            epsilon: float = 1e-7) -> jax.Array:
    """Zero the dropped entries of ``x`` and rescale the kept ones.

    Args:
      x: the task vector (a float array).
      mask: which entries to keep.
      norm: ``None`` (no rescale); ``'l1'``, ``'l2'`` or ``'linf'`` (scale the kept entries
        so that this norm equals the original's, as mergekit does, unless either norm is
        below ``epsilon``); or ``'density'`` (divide by ``keep_probability``, as the DARE
        and DELLA papers do).
      keep_probability: the probability each entry was kept with (scalar or like ``x``).
      epsilon: norms below this are not rescaled.

    Returns:
      ``x`` with the dropped entries zeroed and the kept ones rescaled.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import sparsify
      >>> x, mask = jnp.asarray([1.0, -3.0, 2.0]), jnp.asarray([False, True, True])
      >>> [round(v, 4) for v in sparsify.rescale(x, mask, "l1").tolist()]  # L1 norm 6 restored from 5
      [0.0, -3.6, 2.4]
      >>> sparsify.rescale(x, mask, "density", 0.5).tolist()
      [0.0, -6.0, 4.0]
    """
    if norm in (None, "density"):
        kept = jnp.where(mask, x, jnp.zeros((), x.dtype))
        return kept if norm is None else kept / jnp.asarray(keep_probability, x.dtype)
    # the original's norm first, so that the kept entries can then overwrite ``x`` in place
    # (else XLA may keep both as arrays of their own: one more large temporary)
    x, before = lax.optimization_barrier((x, _norm(x, norm)))
    kept = jnp.where(mask, x, jnp.zeros((), x.dtype))
    after = _norm(kept, norm)
    small = (before < epsilon) | (after < epsilon)
    return kept * jnp.where(small, jnp.ones((), x.dtype), before / jnp.where(small, 1, after))
