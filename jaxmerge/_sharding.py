"""Helpers for arrays whose type carries an explicit sharding (``jax.make_mesh``'s default
``AxisType.Explicit`` in jax 0.10): a few operations need to be told how to shard.

Under ``AxisType.Auto`` meshes (and for unsharded arrays) the type carries no sharding and
every helper here is the plain operation: XLA's partitioner decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxmerge.errors import JaxmergeError


def explicit_sharding(x) -> NamedSharding | None:
    """``x``'s sharding if its type carries an explicit, non-trivial one, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or all(s is None for s in spec):
        return None
    return sharding


def mesh_axes(spec: PartitionSpec) -> tuple[str, ...]:
    """Every mesh axis a spec shards over."""
    return tuple(a for s in spec if s is not None for a in (s if isinstance(s, tuple) else (s,)))


def reshard(x, spec: PartitionSpec, like) -> jax.Array:
    """``x`` resharded to ``spec`` on ``like``'s mesh, when ``like`` is explicitly sharded."""
    sharding = explicit_sharding(like)
    if sharding is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, spec))


def like(x, reference) -> jax.Array:
    """``x`` resharded like ``reference`` when that is explicitly sharded."""
    sharding = explicit_sharding(reference)
    return x if sharding is None else jax.sharding.reshard(x, sharding)


def local_then_sum(fn: Callable, arrays: Sequence, scalars: Sequence = ()) -> jax.Array:
    """``fn(*arrays, *scalars)`` for a function whose result is a sum over the arrays' elements
    (e.g. a histogram), computed per shard and summed across devices when the arrays are
    explicitly sharded (all alike; ``scalars`` replicated); a replicated result."""
    sharding = explicit_sharding(arrays[0])
    if sharding is None:
        return fn(*arrays, *scalars)
    spec, axes = sharding.spec, mesh_axes(sharding.spec)
    # unchecked: ``fn`` may loop with a carry that starts replicated and takes per-shard values
    return jax.shard_map(lambda *local: jax.lax.psum(fn(*local), axes), mesh=sharding.mesh,
                         in_specs=(spec,) * len(arrays) + (PartitionSpec(),) * len(scalars),
                         out_specs=PartitionSpec(), check_vma=False)(*arrays, *scalars)


def per_shard(fn: Callable, x) -> jax.Array:
    """``fn(x)`` for a function that acts on each shard of ``x`` alone (result shaped and
    sharded like ``x``), run shard by shard when ``x`` is explicitly sharded."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return fn(x)
    # unchecked: ``fn`` may loop with a carry that starts replicated and takes per-shard values
    return jax.shard_map(fn, mesh=sharding.mesh, in_specs=(sharding.spec,), out_specs=sharding.spec,
                         check_vma=False)(x)


def check_indexable(size: int, what: str) -> None:
    """Refuse ``size`` entries where :func:`flat_index`'s 32-bit indices cannot number them;
    ``what`` begins the message (e.g. ``'top_k_mask supports'``)."""
    if size >= 2 ** 32:
        raise JaxmergeError(f"{what} fewer than 2**32 entries, got {size}")


def flat_index(x: jax.Array) -> jax.Array:
    """Row-major flat index of every entry of ``x``, built without reshaping and sharded
    like ``x`` (so that it combines with ``x`` elementwise on any mesh)."""
    sharding = explicit_sharding(x)
    index = jnp.zeros(x.shape, jnp.uint32, out_sharding=sharding)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis, out_sharding=sharding) * jnp.uint32(stride)
        stride *= x.shape[axis]
    return index
