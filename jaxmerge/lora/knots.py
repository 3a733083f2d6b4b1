"""KnOTS: merging LoRA adapters in a shared basis (Stoica et al., arXiv 2410.19735).

Per module, the adapters' updates ``D_i = s_i B_i A_i`` (``(out, in)``) are put side by side,
``[D_1 | ... | D_n] = U S [V_1 | ... | V_n]^T`` (thin SVD, ``k = min(out, sum r_i)``
components, enough to hold every update exactly), so that ``D_i = U (S V_i^T)``: each
adapter becomes a ``(k, in)`` block ``S V_i^T`` in one basis ``U``. Those blocks are merged
with a task-vector method (TIES by default: top-``density`` magnitudes of each block, sign
elected by their sum, disjoint mean) and scaled by ``lambda_``; the merged update is ``U
merged``, returned as an adapter of rank ``k`` (``B = U``, ``A = merged``, scaling 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.errors import JaxmergeError
from jaxmerge.lora.adapter import Adapter, LoraLayer, delta_weight
from jaxmerge.lora.combine import (
    check_adapters,
    check_key,
    combine_tensors,
    merged_config,
    merged_extras,
    signed_svd,
)
from jaxmerge.merging.task_vectors import leaf_key

KNOTS_MERGES = ("ties", "linear", "dare_ties", "dare_linear")


@jax.jit(static_argnames=("rank",))
def _shared_basis(deltas: Sequence[jax.Array], *, rank: int) -> tuple[jax.Array, list[jax.Array]]:
    u, s, vh = signed_svd(jnp.concatenate(deltas, axis=1))
    blocks = jnp.split(s[:rank, None] * vh[:rank], len(deltas), axis=1)
    return u[:, :rank], blocks


def knots(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, *, merge: str = "ties",
          density: float = 1.0, lambda_: float = 1.0, key: jax.Array | None = None) -> Adapter:
    """Merge LoRA adapters with KnOTS: align them in a shared SVD basis, then merge there.

    Args:
      adapters: the adapters (:func:`~jaxmerge.lora.load_adapter`), for the same base.
      weights: one weight per adapter, applied to its block (default: 1 each).
      merge: ``'ties'`` (the paper's), ``'linear'`` (task arithmetic), ``'dare_ties'`` or
        ``'dare_linear'``, with PEFT's conventions (:func:`~jaxmerge.lora.add_weighted_adapter`).
      density: the fraction of each block kept (TIES' top-k, DARE's keep probability).
      lambda_: the scale of the merged update.
      key: a ``jax.random`` key, for the DARE merges.

    Returns:
      The merged :class:`~jaxmerge.lora.Adapter`, of rank ``min(out, sum r_i)`` per module.

    Raises:
      JaxmergeError: an unknown ``merge``, a missing ``key``, no adapters, DoRA adapters, or
        weights not one finite number per adapter.

    Notes:
      The reference code trims each adapter's blocks over the whole model at once; here each
      module's block is trimmed on its own, as every other merge in this library trims.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> def adapter(value):
      ...     layer = lora.LoraLayer(a=jnp.full((1, 2), value), b=jnp.ones((3, 1)))
      ...     return lora.Adapter({"q": layer}, lora.lora_config(1, 1, ["q"]))
      >>> merged = lora.knots([adapter(1.0), adapter(3.0)], merge="linear", lambda_=0.5)
      >>> [round(x, 4) for x in merged.delta("q").tolist()[0]]
      [2.0, 2.0]
    """
    if merge not in KNOTS_MERGES:
        raise JaxmergeError(f"merge must be one of {KNOTS_MERGES}, got {merge!r}")
    check_key(merge, key)
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    check_adapters(adapters, weights)
    layers = {}
    for module in dict.fromkeys(m for a in adapters for m in a.layers):
        holding = [(a, w) for a, w in zip(adapters, weights) if module in a.layers]
        deltas = [delta_weight(a.layers[module], a.scaling(module)) for a, _ in holding]
        deltas = [d.reshape(d.shape[0], -1) for d in deltas]
        rank = min(deltas[0].shape[0], sum(a.layers[module].a.shape[0] for a, _ in holding))
        basis, blocks = _shared_basis(deltas, rank=rank)
        merged = combine_tensors(blocks, np.asarray([w for _, w in holding], np.float32),
                                 None if key is None else leaf_key(key, module), kind=merge, density=density)
        reference = holding[0][0].layers[module]
        layers[module] = LoraLayer((lambda_ * merged).reshape(rank, *reference.a.shape[1:]).astype(reference.a.dtype),
                                   basis.reshape(reference.b.shape[0], rank, *reference.b.shape[2:])
                                   .astype(reference.b.dtype))
    new_rank = max(int(layer.a.shape[0]) for layer in layers.values())
    config = merged_config(adapters, layers, new_rank)
    return Adapter(layers, config, frozenset(m for a in adapters for m in a.embeddings), merged_extras(adapters))
