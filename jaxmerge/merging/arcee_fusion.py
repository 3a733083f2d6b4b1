"""Arcee Fusion: take the other model's changes only where they matter most."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge._tree import PyTree, acc_dtype, compute_dtype, exact_jit, scaled
from jaxmerge.merging.method import merge_method
from jaxmerge.merging.sparsify import kth_largest

_QUANTILES = (0.25, 0.5, 0.75)


def _quantiles(x: jax.Array, qs: tuple[float, ...]) -> jax.Array:
    """The entries at index ``floor(q (n - 1))`` of the sorted ``x`` (q in float32, as mergekit),
    selected together: each pass of the selection counts each entry once for all of them."""
    ks = [x.size - int(np.float32(q) * np.float32(x.size - 1)) for q in qs]
    return kth_largest(x, jnp.asarray(ks, jnp.int32))


@exact_jit()
def arcee_fusion_kernel(a: jax.Array, b: jax.Array, *, exact: bool = False) -> jax.Array:
    """``a + (b - a) mask``, the mask where the importance ``|b - a| KL(softmax(b) || softmax(a))``
    (softmax and KL along the last axis) is at least ``median + 1.5 (q3 - q1)`` of its entries;
    in float32 (``exact``: as mergekit computes it in ``a``'s dtype, softmax in float32)."""
    dtype = compute_dtype(a.dtype, exact)
    a_c, b_c = a.astype(dtype).reshape(a.shape or (1,)), b.astype(dtype).reshape(a.shape or (1,))

    def softmax(x):
        return jax.nn.softmax(x.astype(acc_dtype(dtype)), axis=-1).astype(dtype) + 1e-8

    p, q = softmax(b_c), softmax(a_c)
    kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True, dtype=acc_dtype(dtype)).astype(dtype)
    change = b_c - a_c
    importance = jnp.abs(change) * kl
    q1, median, q3 = _quantiles(importance, _QUANTILES)
    mask = importance >= median + scaled(q3 - q1, 1.5)
    fused = a_c.astype(acc_dtype(dtype)) + jnp.where(mask, change, 0).astype(acc_dtype(dtype))
    return fused.astype(a.dtype).reshape(a.shape)


@merge_method("arcee_fusion", base="pair", params=(),
              plan=lambda spec, hp: lambda i, _, leaves: arcee_fusion_kernel(*leaves, exact=hp["exact"]))
def arcee_fusion(a: PyTree, b: PyTree) -> PyTree:
    """Arcee Fusion, mergekit's ``arcee_fusion``: fuse in only ``b``'s most important changes.

    Per leaf, each entry's importance is its change ``|b - a|`` times the KL divergence
    between the softmax of ``b`` and of ``a`` along the last axis (its row); entries whose
    importance is at least ``median + 1.5 (q3 - q1)`` of the leaf's importances (an
    outlier threshold) take ``b``'s value, the others keep ``a``'s. The quantiles are the
    entries at ``floor(q (n - 1))`` of the sorted importances, computed exactly (mergekit
    samples a million entries of larger leaves). Computed in float32.

    Args:
      a: the base model (in a merge config, the ``base_model``); the output has its
        structure and dtypes.
      b: the model whose changes are fused in.

    Returns:
      A pytree shaped like ``a``.

    Raises:
      JaxmergeError: a structure or shape mismatch.

    References:
      mergekit's ``arcee_fusion`` method (arcee-ai/mergekit; Arcee AI).

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a = {"w": jnp.zeros((1, 8))}
      >>> b = {"w": jnp.asarray([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0]])}
      >>> jaxmerge.arcee_fusion(a, b)["w"].tolist()  # threshold 0.4 + 1.5 (0.6 - 0.2) = 1.0: one change
      [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]]
    """
