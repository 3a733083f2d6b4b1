"""Merging LoRA adapters into one, with the combination types and numbers of PEFT's
``LoraModel.add_weighted_adapter``.

Three families, as in PEFT:

- ``cat``: the factors side by side, ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1, ...]`` (rank
  ``sum r_i``): exactly ``sum w_i s_i B_i A_i``.
- factor-level (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``):
  the ``A`` factors and the ``B`` factors are merged separately, ``A`` weighted by ``sign(w s)
  sqrt(|w s|)`` and ``B`` by ``sqrt(|w s|)``; every adapter must have the same rank. Only an
  approximation of the weighted sum of updates (cross terms appear).
- dense (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): each update ``s_i B_i A_i`` is formed, the updates are merged
  with weights ``w_i``, and the result is truncated to rank ``svd_rank`` by an SVD (``B = U
  S``, ``A = V^T``), optionally clamped to a quantile (``svd_clamp``).

The merged adapter has ``r = lora_alpha = new rank`` (scaling 1; with rsLoRA PEFT's config
gives ``sqrt(r)``, which is kept) and no rank or alpha patterns.

PEFT's pruning and consensus (its ``merge_utils``): ``magnitude`` keeps the
``int(density n)`` entries of largest magnitude; ``random`` (DARE) keeps each entry with
probability ``density`` and divides by ``density``; a density of 1 or more prunes nothing.
TIES elects, per entry, the sign of the sum of the pruned (unweighted) tensors (``total``) or
of their signs (``frequency``), a zero sum counting as positive, and averages the weighted
entries that agree with it over their count.

References:
  Yadav et al., "TIES-Merging", arXiv 2306.01708; Yu et al., "Language models are Super
  Mario" (DARE), arXiv 2311.03099.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.errors import JaxmergeError
from jaxmerge.lora.adapter import Adapter, LoraLayer, check_plain, delta_weight
from jaxmerge.merging.sparsify import random_mask, top_k_mask
from jaxmerge.merging.task_vectors import leaf_key

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_TYPES, *SVD_TYPES)
SCALING_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")  # what a module's scaling reads
_DENSE_KINDS = {"svd": "linear", **{t: t.removesuffix("_svd") for t in SVD_TYPES[1:]}}
_PRUNING = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random", "dare_ties": "random"}
_CONSENSUS = ("total", "frequency")


def _prune(x: jax.Array, density, method: str | None, key) -> jax.Array:
    """PEFT's ``prune``: the top ``int(density n)`` magnitudes, or DARE's drop and rescale."""
    if method is None or density >= 1:
        return x
    if method == "magnitude":
        return jnp.where(top_k_mask(x, int(density * x.size)), x, 0)
    return jnp.where(random_mask(key, x, density), x, 0) / jnp.asarray(density, x.dtype)


def combine_tensors(tensors: Sequence[jax.Array], weights: jax.Array, key: jax.Array | None = None, *, kind: str,
                    density: float | None = None, majority_sign_method: str = "total") -> jax.Array:
    """PEFT's merge of same-shaped tensors (factors or updates) with ``weights``, in float32.

    Runs op by op (not under one ``jax.jit``) so that every product and sum rounds as PEFT's
    do: a compiled fusion would contract ``x * w + y`` into fused multiply-adds on CPU.

    Args:
      tensors: the tensors.
      weights: one float32 weight per tensor.
      key: the random key of ``dare_*`` (one draw per tensor).
      kind: ``linear``, ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune``.
      density: the fraction kept by the pruning kinds.
      majority_sign_method: ``'total'`` or ``'frequency'``, for the TIES kinds.

    Returns:
      The merged tensor, float32.
    """
    method = _PRUNING.get(kind)
    keys = [None] * len(tensors) if key is None else list(jax.random.split(key, len(tensors)))
    pruned = [_prune(t.astype(jnp.float32), density, method, k) for t, k in zip(tensors, keys)]
    weighted = [p * w for p, w in zip(pruned, weights)]
    if kind not in ("ties", "dare_ties"):
        return _sequential_sum(weighted)
    signs = [jnp.sign(p) for p in pruned]
    elected = _sequential_sum(pruned if majority_sign_method == "total" else signs)
    majority = jnp.where(elected >= 0, 1.0, -1.0)
    agree = [s == majority for s in signs]
    mixed = _sequential_sum([jnp.where(a, x, 0) for a, x in zip(agree, weighted)])
    count = _sequential_sum([a.astype(jnp.float32) for a in agree])
    return mixed / jnp.maximum(count, 1.0)


def _sequential_sum(xs: Sequence[jax.Array]) -> jax.Array:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def signed_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The thin SVD ``u, s, vh`` of ``x`` (batched over leading axes), each singular pair
    signed so that the largest-magnitude entry of its left vector is positive."""
    u, s, vh = jnp.linalg.svd(x, full_matrices=False)
    flip = jnp.sign(jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=-2, keepdims=True), axis=-2))
    return u * flip, s, vh * jnp.swapaxes(flip, -1, -2)


@jax.jit(static_argnames=("rank", "clamp"))
def truncate(delta: jax.Array, *, rank: int, clamp: float | None = None) -> LoraLayer:
    """Rank-``rank`` factors of a matrix by SVD, PEFT's ``svd`` step: ``B = U_r S_r``, ``A =
    V_r^T``; with ``clamp``, both clipped to ``[-q, q]``, ``q`` the ``clamp`` quantile of their
    entries together. Zero columns pad ``B`` (and rows ``A``) where ``rank`` exceeds the
    matrix's smaller side. Batched over leading axes.

    Singular vectors are defined up to sign, which LAPACK builds choose differently: each
    pair is signed so that the largest-magnitude entry of its left vector is positive, the
    same on every backend (PEFT's factors may differ by these signs; ``B @ A`` does not)."""
    u, s, vh = signed_svd(delta)
    kept = min(rank, s.shape[-1])
    b = u[..., :, :kept] * s[..., None, :kept]
    a = vh[..., :kept, :]
    if clamp is not None:
        flat = jnp.concatenate([b.reshape(*b.shape[:-2], -1), a.reshape(*a.shape[:-2], -1)], axis=-1)
        high = jnp.quantile(flat, clamp, axis=-1)[..., None, None]
        b, a = jnp.clip(b, -high, high), jnp.clip(a, -high, high)
    pad = rank - kept
    return LoraLayer(jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, 0)]),
                     jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, 0), (0, pad)]))


def add_weighted_adapter(adapters: Sequence[Adapter], weights: Sequence[float], combination_type: str = "svd", *,
                         svd_rank: int | None = None, svd_clamp: float | None = None, density: float | None = None,
                         majority_sign_method: str = "total", key: jax.Array | None = None) -> Adapter:
    """Merge LoRA adapters into one, as PEFT's ``add_weighted_adapter`` does.

    Named and defaulted as PEFT's method. A module that only some adapters adapt is merged
    from those. One adapter is merged as ``linear``, as in PEFT.

    Args:
      adapters: the adapters (:func:`load_adapter`), for the same base model.
      weights: one weight per adapter; may be negative.
      combination_type: one of ``COMBINATION_TYPES`` (see the module docstring).
      svd_rank: the rank of the ``*svd`` results (default: the adapters' largest rank).
      svd_clamp: a quantile in [0, 1] to clamp the ``*svd`` factors to (default: none).
      density: the fraction kept by ``ties``, ``dare_*`` and ``magnitude_prune*``; 1 or more
        keeps everything.
      majority_sign_method: ``'total'`` or ``'frequency'``, for the TIES types.
      key: a ``jax.random`` key, required by the ``dare_*`` types. PEFT draws with torch's
        generator: the masks differ from PEFT's, their distribution does not.

    Returns:
      The merged :class:`Adapter`, its config the first adapter's with ``r`` and
      ``lora_alpha`` set to the new rank, the target modules united and no patterns.

    Raises:
      JaxmergeError: no adapters, a weight count that differs from theirs, an unknown
        ``combination_type``, a missing ``density`` or ``key``, DoRA or LoRA-bias adapters,
        ranks that differ for a factor-level type (naming the module), or a module saved
        in full (``modules_to_save``) by several adapters.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> def adapter(scale):
      ...     layer = lora.LoraLayer(a=scale * jnp.ones((1, 2)), b=jnp.ones((3, 1)))
      ...     return lora.Adapter({"model.q_proj": layer}, lora.lora_config(1, 1, ["q_proj"]))
      >>> merged = lora.add_weighted_adapter([adapter(1.0), adapter(3.0)], [0.5, 0.5], "cat")
      >>> merged.config["r"], merged.delta("model.q_proj").tolist()[0]
      (2, [2.0, 2.0])
    """
    _check(adapters, weights, combination_type, density, majority_sign_method, key, svd_clamp)
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = [_largest_rank(a) for a in adapters]
    if combination_type in FACTOR_TYPES and len(set(ranks)) > 1:
        raise JaxmergeError(f"{combination_type} needs adapters of one rank, got ranks {ranks}; use cat or an svd type")
    if combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in SVD_TYPES:
        new_rank = svd_rank or max(ranks)
    else:
        new_rank = ranks[0]
    modules = list(dict.fromkeys(m for a in adapters for m in a.layers))
    embeddings = frozenset(m for a in adapters for m in a.embeddings)
    layers = {}
    for module in modules:
        holding = [(a, float(w)) for a, w in zip(adapters, weights) if module in a.layers]
        module_key = None if key is None else leaf_key(key, module)
        if combination_type == "cat":
            layers[module] = _cat(module, holding, new_rank)
        elif combination_type in FACTOR_TYPES:
            layers[module] = _factor_level(module, holding, combination_type, density, majority_sign_method,
                                           module_key)
        else:
            layers[module] = _dense(module, holding, combination_type, density, majority_sign_method, module_key,
                                    new_rank, svd_clamp)
    return Adapter(layers, merged_config(adapters, layers, new_rank), embeddings, merged_extras(adapters))


def check_adapters(adapters: Sequence[Adapter], weights: Sequence[float]) -> None:
    """Refuse no adapters, anything but plain LoRA adapters, and weights not one finite number each."""
    if not adapters:
        raise JaxmergeError("merging adapters needs at least one adapter")
    for i, adapter in enumerate(adapters):
        if not isinstance(adapter, Adapter):
            raise JaxmergeError(f"adapters[{i}] is a {type(adapter).__name__}, not a jaxmerge.lora.Adapter")
        check_plain(adapter, f"adapters[{i}]")
    if len(weights) != len(adapters):
        raise JaxmergeError(f"{len(weights)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(float(w)) for w in weights):
        raise JaxmergeError(f"weights must be finite, got {list(weights)}")


def check_key(kind: str, key) -> None:
    """Refuse a random (DARE) merge without its key."""
    if _PRUNING.get(kind.removesuffix("_svd")) == "random" and key is None:
        raise JaxmergeError(f"{kind} drops at random: pass key=jax.random.key(seed)")


def _check(adapters, weights, combination_type, density, majority_sign_method, key, svd_clamp) -> None:
    check_adapters(adapters, weights)
    if combination_type not in COMBINATION_TYPES:
        raise JaxmergeError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    base_type = combination_type.removesuffix("_svd")
    if base_type in _PRUNING and len(adapters) > 1:
        if density is None or not 0 <= density:
            raise JaxmergeError(f"{combination_type} needs a density >= 0 (a fraction to keep), got {density!r}")
        check_key(combination_type, key)
    if majority_sign_method not in _CONSENSUS:
        raise JaxmergeError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise JaxmergeError(f"svd_clamp must be a quantile in [0, 1], got {svd_clamp}")


def _largest_rank(adapter: Adapter) -> int:
    """PEFT's rank of an adapter for merging: ``r``, or the largest ``rank_pattern`` value."""
    return max([adapter.config["r"], *(adapter.config.get("rank_pattern") or {}).values()])


def _cat(module: str, holding, new_rank: int) -> LoraLayer:
    a = jnp.concatenate([(h.layers[module].a * np.float32(w)) * np.float32(h.scaling(module)) for h, w in holding])
    b = jnp.concatenate([h.layers[module].b for h, _ in holding], axis=1)
    pad = new_rank - a.shape[0]
    return LoraLayer(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)),
                     jnp.pad(b, [(0, 0), (0, pad)] + [(0, 0)] * (b.ndim - 2)))


def _factor_level(module: str, holding, kind: str, density, majority, key) -> LoraLayer:
    shapes = {(tuple(h.layers[module].a.shape), tuple(h.layers[module].b.shape)) for h, _ in holding}
    if len(shapes) > 1:
        raise JaxmergeError(f"module {module!r}: the adapters' factors differ in shape {sorted(shapes)}; {kind} "
                            "merges factors of one rank (use cat or an svd type)")
    scaled = [w * h.scaling(module) for h, w in holding]
    weights_a = np.asarray([math.copysign(math.sqrt(abs(x)), 1 if x >= 0 else -1) for x in scaled], np.float32)
    weights_b = np.asarray([math.sqrt(abs(x)) for x in scaled], np.float32)
    keys = [None, None] if key is None else list(jax.random.split(key))
    dtype = holding[0][0].layers[module].a.dtype
    merged = [combine_tensors([getattr(h.layers[module], side) for h, _ in holding], w, k, kind=kind,
                              density=density, majority_sign_method=majority).astype(dtype)
              for side, w, k in zip(("a", "b"), (weights_a, weights_b), keys)]
    return LoraLayer(*merged)


def _dense(module: str, holding, kind: str, density, majority, key, rank: int, clamp) -> LoraLayer:
    deltas = [delta_weight(h.layers[module], h.scaling(module)) for h, _ in holding]  # B @ A orientation
    weights = np.asarray([w for _, w in holding], np.float32)
    merged = combine_tensors(deltas, weights, key, kind=_DENSE_KINDS[kind],
                             density=density, majority_sign_method=majority)
    reference = holding[0][0].layers[module]
    factors = truncate(merged.reshape(merged.shape[0], -1), rank=rank, clamp=clamp)
    a_shape = (rank, *reference.a.shape[1:])
    b_shape = (reference.b.shape[0], rank, *reference.b.shape[2:])
    return LoraLayer(factors.a.reshape(a_shape).astype(reference.a.dtype),
                     factors.b.reshape(b_shape).astype(reference.b.dtype))


_LAYER_LIMITS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def merged_config(adapters: Sequence[Adapter], layers: dict, new_rank: int, *, use_rslora: bool | None = None) -> dict:
    """The first adapter's config with PEFT's changes: ``r = lora_alpha = new_rank``, the
    target modules united, no patterns (but for modules of another rank, kept loadable);
    ``use_rslora`` replaces the first adapter's. Where an adapter limits its layers
    (``layers_to_transform``, ``layers_pattern``, ``exclude_modules``; PEFT refuses to merge
    such adapters), the targets are the merged modules by their full names and the limits are
    dropped, so that PEFT loads every merged module."""
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, str) for t in targets):
        target_modules = "|".join(f"({t})" for t in targets) if len(targets) > 1 else targets[0]
    elif all(isinstance(t, list) for t in targets):
        target_modules = sorted(set().union(*targets))
    else:
        raise JaxmergeError(f"the adapters' target_modules mix regular expressions and lists: {targets}")
    config = {**adapters[0].config, "r": new_rank, "lora_alpha": new_rank, "target_modules": target_modules,
              "rank_pattern": {}, "alpha_pattern": {}}
    if any(a.config.get(limit) for a in adapters for limit in _LAYER_LIMITS):
        config.update({"target_modules": sorted(layers), **dict.fromkeys(_LAYER_LIMITS)})
    if use_rslora is not None:
        config["use_rslora"] = use_rslora
    rslora = bool(config.get("use_rslora"))
    scaling = math.sqrt(new_rank) if rslora else 1.0
    for module, layer in layers.items():
        rank = int(layer.a.shape[0])
        if rank != new_rank:  # same scaling as the other modules
            config["rank_pattern"][_anchored(module)] = rank
            config["alpha_pattern"][_anchored(module)] = scaling * (math.sqrt(rank) if rslora else rank)
    return config


def _anchored(module: str) -> str:
    """A pattern matching exactly ``module`` under PEFT's ``(.*\\.)?(pattern)$`` rule."""
    return "^" + module.replace(".", r"\.")


def merged_extras(adapters: Sequence[Adapter]) -> dict:
    """Copies of base layers from the first adapter holding them; a module saved in full
    (``modules_to_save``) from the one adapter holding it."""
    extras: dict = {}
    for i, adapter in enumerate(adapters):
        for name, value in adapter.extras.items():
            if name in extras and ".base_layer." not in name:
                raise JaxmergeError(f"adapters[{i}] and an earlier adapter both save {name!r} in full "
                                    "(modules_to_save): such modules cannot be merged")
            extras.setdefault(name, value)
    return extras
