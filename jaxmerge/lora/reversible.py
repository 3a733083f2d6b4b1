"""Reversible merging of LoRA adapters: one merged adapter, plus a small per-position basis
from which every original adapter is recovered (after Alipour & Mohammadi Amiri, "Towards
Reversible Model Merging for Low-rank Weights", arXiv 2510.14163).

The ``n`` adapters of a module have factors of one rank ``r``, the scaling folded in
(``sqrt(s_i)`` into each factor). Every column of ``A`` and every row of ``B`` is, across
the adapters, an ``(r, n)`` matrix ``X`` of ``n`` vectors. Stored per position: their mean
``mu`` (the merged adapter's factor), and the best rank-``p`` fit of the rest, ``X - mu 1^T
~ P C`` (``P``: ``(r, p)`` orthonormal, ``C``: ``(p, n)``; Eckart-Young, by a batched SVD).
Adapter ``i`` comes back as ``mu + P c_i``: exactly when ``p >= n - 1``. Storage relative to
the ``n`` adapters: ``(p (r + n) + r) / (r n)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmerge.errors import JaxmergeError
from jaxmerge.lora.adapter import Adapter, LoraLayer, check_plain
from jaxmerge.lora.combine import SCALING_FIELDS, merged_config


class Residual(NamedTuple):
    """One factor's positions: ``basis`` ``(positions, r, p)`` and ``coefficients``
    ``(positions, p, n)``; adapter ``i``'s factor is the mean plus ``basis @ coefficients[..., i]``.

    Examples: see :func:`reversible_merge`.
    """

    basis: jax.Array
    coefficients: jax.Array


class ReversibleMerge(NamedTuple):
    """The merged adapter (the mean of the scaled factors, scaling 1), per module the
    residuals of ``A`` (positions: its columns) and ``B`` (its rows), and the adapters' configs.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> one = lora.Adapter({"q": lora.LoraLayer(jnp.ones((1, 2)), jnp.ones((3, 1)))}, lora.lora_config(1, 1, "q"))
      >>> kept = lora.reversible_merge([one, one])
      >>> kept.residuals["q"][0].basis.shape  # A's 2 columns, rank 1, basis 1
      (2, 1, 1)
    """

    merged: Adapter
    residuals: dict[str, tuple[Residual, Residual]]
    configs: tuple[dict, ...]


@jax.jit(static_argnames=("basis_size",))
def _fit(stacked: jax.Array, *, basis_size: int) -> tuple[jax.Array, Residual]:
    """``stacked``: ``(positions, r, n)`` -> the means ``(positions, r)`` and the rank-p fit."""
    mean = stacked.mean(axis=-1)
    u, s, vh = jnp.linalg.svd(stacked - mean[..., None], full_matrices=False)
    p = min(basis_size, s.shape[-1])
    return mean, Residual(u[..., :p], s[..., :p, None] * vh[..., :p, :])


def _scaled(adapter: Adapter, module: str) -> LoraLayer:
    """``module``'s factors in float32, each times ``sqrt(scaling)``."""
    root = jnp.sqrt(jnp.float32(adapter.scaling(module)))
    return LoraLayer(*(x.astype(jnp.float32) * root for x in adapter.layers[module]))


def reversible_merge(adapters: Sequence[Adapter], *, basis_size: int = 1) -> ReversibleMerge:
    """Merge LoRA adapters into their factor mean, keeping what recovers each of them.

    Args:
      adapters: the adapters, each module of one rank across those that adapt it.
      basis_size: ``p``, the basis vectors kept per position; ``n - 1`` recovers exactly.

    Returns:
      A :class:`ReversibleMerge`; :func:`recover` gives the adapters back.

    Raises:
      JaxmergeError: a module adapted by only some adapters, or with factors of other ranks.

    Examples:
      >>> import numpy as np, jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> rng = np.random.default_rng(0)
      >>> adapters = [lora.Adapter({"q": lora.LoraLayer(jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
      ...                                                jnp.asarray(rng.normal(size=(4, 2)), jnp.float32))},
      ...                          lora.lora_config(2, 2, ["q"])) for _ in range(3)]
      >>> kept = lora.reversible_merge(adapters, basis_size=2)
      >>> bool(np.allclose(lora.recover(kept, 1).delta("q"), adapters[1].delta("q"), atol=1e-5))
      True
    """
    if basis_size < 1:
        raise JaxmergeError(f"basis_size must be at least 1, got {basis_size}")
    for i, adapter in enumerate(adapters):
        check_plain(adapter, f"adapters[{i}]")
    modules = list(adapters[0].layers)
    layers, residuals = {}, {}
    for i, adapter in enumerate(adapters):
        if set(adapter.layers) != set(modules):
            odd = min(set(adapter.layers) ^ set(modules))
            raise JaxmergeError(f"adapters[{i}] and adapters[0] differ in module {odd!r}: a reversible merge keeps "
                                "modules every adapter has")
    for module in modules:
        shapes = {tuple(a.layers[module].a.shape) + tuple(a.layers[module].b.shape) for a in adapters}
        if len(shapes) > 1:
            raise JaxmergeError(f"module {module!r}: the adapters' factors differ in shape; one rank is needed")
        scaled = [_scaled(a, module) for a in adapters]
        a_mean, a_rest = _fit(jnp.stack([s.a.reshape(s.a.shape[0], -1).T for s in scaled], -1), basis_size=basis_size)
        b_mean, b_rest = _fit(jnp.stack([s.b.reshape(s.b.shape[:2]) for s in scaled], -1), basis_size=basis_size)
        reference = adapters[0].layers[module]
        layers[module] = LoraLayer(a_mean.T.reshape(reference.a.shape), b_mean.reshape(reference.b.shape))
        residuals[module] = (a_rest, b_rest)
    config = merged_config(adapters, layers, max(int(layer.a.shape[0]) for layer in layers.values()),
                           use_rslora=False)
    merged = Adapter(layers, config, adapters[0].embeddings)
    return ReversibleMerge(merged, residuals, tuple(dict(a.config) for a in adapters))


def recover(kept: ReversibleMerge, index: int) -> Adapter:
    """Adapter ``index`` back from a :func:`reversible_merge`.

    Args:
      kept: the reversible merge.
      index: which adapter, as ordered when merged.

    Returns:
      The adapter, its scaling folded into its factors (its config's scaling is 1): the same
      update, exactly when the basis held ``n - 1`` vectors.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> def adapter(value):
      ...     return lora.Adapter({"q": lora.LoraLayer(jnp.full((1, 2), value), jnp.ones((2, 1)))},
      ...                         lora.lora_config(1, 1, "q"))
      >>> kept = lora.reversible_merge([adapter(1.0), adapter(3.0)])
      >>> kept.merged.delta("q").tolist()[0], lora.recover(kept, 1).delta("q").tolist()[0]
      ([2.0, 2.0], [3.0, 3.0])
    """
    layers = {}
    for module, layer in kept.merged.layers.items():
        a_rest, b_rest = kept.residuals[module]
        a = layer.a.reshape(layer.a.shape[0], -1).T + jnp.einsum("xrp,xp->xr", a_rest.basis,
                                                                  a_rest.coefficients[..., index])
        b = layer.b.reshape(layer.b.shape[:2]) + jnp.einsum("xrp,xp->xr", b_rest.basis, b_rest.coefficients[..., index])
        layers[module] = LoraLayer(a.T.reshape(layer.a.shape), b.reshape(layer.b.shape))
    merged = kept.merged.config
    config = {**kept.configs[index], **{field: merged[field] for field in SCALING_FIELDS}}
    return Adapter(layers, config, kept.merged.embeddings)
