"""Weighted sums of squared per-example gradients, without materialising outer products.

``jax.vmap`` of ``jax.grad`` gives the gradient of a dense kernel for example ``b`` as the
outer product ``a_b d_b^T`` of the layer's input and output cotangent: a batched
``dot_general`` whose contracting dimensions have size 1. Squaring and summing those over
the batch costs a ``batch x in x out`` tensor (slow and memory-bound on CPU), yet
``sum_b w_b (a_b d_b^T)^2 = (w a^2)^T (d^2)`` is one small matrix product. This module
traces the vmapped gradient function to a jaxpr, evaluates it, and for every output made
that way (possibly transposed) computes the squared sum with the product of squares
instead; every other output is squared and summed as it is. The result is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxmerge.statistics._data import replicated_like
from jaxmerge.statistics._jaxpr import Env, bind


def _is_outer_product(eqn) -> bool:
    if eqn.primitive.name != "dot_general":
        return False
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars
    return (tuple(lhs_batch) == (0,) and tuple(rhs_batch) == (0,)
            and all(lhs.aval.shape[d] == 1 for d in lhs_contract)
            and all(rhs.aval.shape[d] == 1 for d in rhs_contract))


def _outer_product_sources(jaxpr) -> tuple[dict, set]:
    """Outputs fed only by a batched outer product (optionally transposed, batch axis kept
    first): ``{output index: (dot_general eqn, permutation of the free axes)}``, and the
    ids of the equations that then need not run."""
    producer = {id(v): eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    uses: dict[int, int] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            uses[id(v)] = uses.get(id(v), 0) + 1
    found, skipped = {}, set()
    for index, out in enumerate(jaxpr.outvars):
        eqn = producer.get(id(out))
        if eqn is None or uses.get(id(out), 0):
            continue
        chain, permutation = [eqn], None
        if eqn.primitive.name == "transpose" and eqn.params["permutation"][0] == 0:
            permutation = tuple(p - 1 for p in eqn.params["permutation"][1:])
            eqn = producer.get(id(eqn.invars[0]))
            if eqn is None or uses.get(id(eqn.outvars[0]), 0) != 1:
                continue
            chain.append(eqn)
        if _is_outer_product(eqn):
            found[index] = (eqn, permutation)
            skipped.update(id(e) for e in chain)
    return found, skipped


def _squared_outer_sum(eqn, lhs, rhs, weights, permutation):
    (lhs_contract, rhs_contract), _ = eqn.params["dimension_numbers"]
    lhs2 = jnp.square(lhs.astype(jnp.float32)) * weights.reshape((-1,) + (1,) * (lhs.ndim - 1))
    rhs2 = jnp.square(rhs.astype(jnp.float32))
    dims = (((0,) + tuple(lhs_contract), (0,) + tuple(rhs_contract)), ((), ()))
    out = lax.dot_general(lhs2, rhs2, dims, out_sharding=replicated_like(lhs))
    return out if permutation is None else jnp.transpose(out, permutation)


def _weighted_square_sum(x: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(weights.reshape((-1,) + (1,) * (x.ndim - 1)) * jnp.square(x.astype(jnp.float32)), axis=0)


def weighted_squared_gradients(grad_fn: Callable, params, batched_args: tuple, weights: jax.Array):
    """``sum_b weights[b] * grad_fn(params, *args_b) ** 2``, leaf by leaf, in float32.

    Args:
      grad_fn: per-example function returning a pytree (the example's gradient).
      params: passed unbatched to every call.
      batched_args: pytrees whose leaves have the batch on axis 0.
      weights: ``(batch,)`` float32 weights of the examples.
    """
    vmapped = jax.vmap(grad_fn, in_axes=(None,) + (0,) * len(batched_args))
    closed, out_shape = jax.make_jaxpr(vmapped, return_shape=True)(params, *batched_args)
    jaxpr = closed.jaxpr
    special, skipped = _outer_product_sources(jaxpr)
    env = Env()
    env.write(jaxpr.constvars, closed.consts)
    env.write(jaxpr.invars, jax.tree.leaves((params, *batched_args)))
    for eqn in jaxpr.eqns:
        if id(eqn) not in skipped:
            env.write(eqn.outvars, bind(eqn, [env.read(v) for v in eqn.invars]))
    leaves = []
    for index, out in enumerate(jaxpr.outvars):
        if index in special:
            eqn, permutation = special[index]
            leaves.append(_squared_outer_sum(eqn, *map(env.read, eqn.invars), weights, permutation))
        else:
            leaves.append(_weighted_square_sum(env.read(out), weights))
    return jax.tree.unflatten(jax.tree.structure(out_shape), leaves)
