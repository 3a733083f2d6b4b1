"""Extracting a LoRA adapter from a fine-tuned model and its base, as ``mergekit-extract-lora``.

Every 2-d weight (a linear layer's ``(out, in)``) gives the factors of the truncated SVD of
its update ``d = W_ft - W_base`` (taken in the stored dtype, decomposed in float32): with ``d
= U S V^T``, rank ``r = min(max_rank, #{s > sv_epsilon})`` (``sv_epsilon`` 0: no threshold),
``A = sqrt(S_r) V_r^T`` and ``B = U_r sqrt(S_r)`` (``distribute_scale=False``: ``A = S_r
V_r^T``, ``B = U_r``), cast back to the stored dtype. By Eckart-Young ``B A`` is the best
rank-``r`` approximation of ``d`` (arXiv 2106.09685 for LoRA). The input embedding and the
output head are saved in full (``modules_to_save``) unless ``embed_lora``; other tensors
(norms) are saved in full too, biases left out.

The adapter's ``r`` and ``lora_alpha`` are the largest rank kept (scaling 1), with
``rank_pattern`` and ``alpha_pattern`` for the modules of other ranks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge._tree import exact_jit
from jaxmerge.errors import JaxmergeError
from jaxmerge.lora.adapter import PREFIX, Adapter, LoraLayer, lora_config
from jaxmerge.lora.combine import signed_svd

INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in")
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")


class Extraction(NamedTuple):
    """An extracted adapter, with each module's retained energy ``sum(s_r^2) / sum(s^2)``
    (the relative squared Frobenius error of ``B A`` is ``1 - energy``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> adapter, energy = lora.extract_lora({"q.weight": jnp.zeros((2, 2))}, {"q.weight": jnp.eye(2)}, max_rank=1)
      >>> energy
      {'q': 0.5}
    """

    adapter: Adapter
    energy: dict[str, float]


@exact_jit(("transpose",))
def _spectrum(base: jax.Array, finetuned: jax.Array, *, transpose: bool, exact: bool):  # exact: see exact_jit
    delta = (finetuned - base).astype(jnp.float32)  # rounded to the stored dtype first, as mergekit's
    return signed_svd(delta.T if transpose else delta)


def extract_layer(base: jax.Array, finetuned: jax.Array, *, max_rank: int, sv_epsilon: float = 0.0,
                  distribute_scale: bool = True, transpose: bool = False) -> tuple[LoraLayer | None, float]:
    """The LoRA factors of one weight's update and their retained energy.

    Args:
      base: the base weight, 2-d.
      finetuned: the fine-tuned weight, of the same shape and dtype.
      max_rank: the largest rank kept.
      sv_epsilon: keep only singular values above this (0: no threshold).
      distribute_scale: ``sqrt(S)`` into both factors (else ``S`` into ``A``).
      transpose: for an embedding (``(num_embeddings, dim)``), whose factors are PEFT's
        ``lora_embedding_A`` ``(r, num_embeddings)`` and ``lora_embedding_B`` ``(dim, r)``.

    Returns:
      ``(LoraLayer or None at rank 0, sum(s_r^2) / sum(s^2))``, the factors in ``finetuned``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> layer, energy = lora.extract_layer(jnp.zeros((3, 2)), jnp.ones((3, 2)), max_rank=4, sv_epsilon=1e-6)
      >>> layer.a.shape, layer.b.shape, round(energy, 6)
      ((1, 2), (3, 1), 1.0)
    """
    u, s, vh = _spectrum(base, finetuned, transpose=transpose, exact=True)
    s_host = np.asarray(s)
    rank = min(max_rank, s_host.size)
    if sv_epsilon > 0:
        rank = min(rank, int((s_host > sv_epsilon).sum()))
    squares = float((s_host.astype(np.float64) ** 2).sum())
    energy = float((s_host[:rank].astype(np.float64) ** 2).sum()) / squares if squares > 0 else 1.0
    if rank == 0:
        return None, energy
    scale_a = jnp.sqrt(s[:rank]) if distribute_scale else s[:rank]
    scale_b = jnp.sqrt(s[:rank]) if distribute_scale else jnp.ones_like(s[:rank])
    dtype = finetuned.dtype
    return LoraLayer((scale_a[:, None] * vh[:rank]).astype(dtype), (u[:, :rank] * scale_b[None, :]).astype(dtype)), energy


def _last(name: str, parts: Sequence[str]) -> bool:
    return name.removesuffix(".weight").rsplit(".", 1)[-1] in parts


def extract_lora(base: Mapping[str, jax.Array] | Callable[[str], jax.Array],
                 finetuned: Mapping[str, jax.Array] | Callable[[str], jax.Array], *,
                 names: Iterable[str] | None = None, shapes: Mapping[str, tuple] | None = None, max_rank: int = 128,
                 sv_epsilon: float = 0.0, distribute_scale: bool = True, embed_lora: bool = False,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), base_model_name_or_path: str | None = None,
                 log: Callable[[str], None] | None = None) -> Extraction:
    """Extract a LoRA adapter from ``finetuned`` against ``base``, one tensor at a time.

    Args:
      base: the base model's tensors by Hugging Face name, or a function reading one by name.
      finetuned: the fine-tuned model's, the same way.
      names: the tensors to consider (default: the keys of ``finetuned``, a mapping).
      shapes: ``{name: shape}`` of ``base``, to check vocabularies without reading (default:
        the arrays' shapes, when ``base`` is a mapping).
      max_rank: the largest rank of a module.
      sv_epsilon: keep only singular values above this (0: all, up to ``max_rank``).
      distribute_scale: split ``S`` as ``sqrt(S)`` into both factors (else all into ``A``).
      embed_lora: extract the embeddings as LoRA too (else they are saved in full); off
        when the vocabulary sizes differ.
      include: regular expressions (``re.search``) a module's name must match, if any given.
      exclude: regular expressions a module's name must not match.
      base_model_name_or_path: written into the config.
      log: called with a line per module.

    Returns:
      An :class:`Extraction`: the adapter and each module's retained energy.

    Raises:
      JaxmergeError: a tensor that differs in shape between the models (naming it), or
        nothing to extract.

    Examples:
      >>> import numpy as np, jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> rng = np.random.default_rng(0)
      >>> base = {"model.q_proj.weight": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
      >>> update = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 5))  # rank 2
      >>> tuned = {"model.q_proj.weight": base["model.q_proj.weight"] + jnp.asarray(update, jnp.float32)}
      >>> adapter, energy = lora.extract_lora(base, tuned, max_rank=4, sv_epsilon=1e-4)
      >>> adapter.rank("model.q_proj"), round(energy["model.q_proj"], 6)
      (2, 1.0)
    """
    read_base = base.__getitem__ if isinstance(base, Mapping) else base
    read_tuned = finetuned.__getitem__ if isinstance(finetuned, Mapping) else finetuned
    names = list(finetuned if names is None else names)
    if shapes is None and isinstance(base, Mapping):
        shapes = {n: tuple(x.shape) for n, x in base.items()}
    if embed_lora and shapes is not None and _vocabularies_differ(names, shapes, read_tuned):
        if log is not None:
            log("the vocabularies differ: embeddings are saved in full (embed_lora off)")
        embed_lora = False
    layers, embeddings, extras, energy = {}, set(), {}, {}
    for name in names:
        module = name.removesuffix(".weight")
        tuned = read_tuned(name)
        embedding = _last(name, INPUT_EMBEDDINGS)
        if tuned.ndim == 1 or not name.endswith(".weight") or \
                ((embedding or _last(name, OUTPUT_EMBEDDINGS)) and not embed_lora):
            if tuned.ndim == 1 and name.endswith(".bias"):
                continue
            if _selected(module, (), exclude):
                extras[PREFIX + name] = tuned
            continue
        if not _selected(module, include, exclude):
            continue
        weight = read_base(name)
        if weight.shape != tuned.shape:
            raise JaxmergeError(f"tensor {name!r} is {tuple(tuned.shape)} in the fine-tuned model and "
                                f"{tuple(weight.shape)} in the base")
        layer, energy[module] = extract_layer(weight.reshape(weight.shape[0], -1), tuned.reshape(tuned.shape[0], -1),
                                              max_rank=max_rank, sv_epsilon=sv_epsilon,
                                              distribute_scale=distribute_scale, transpose=embedding)
        if layer is not None:
            layers[module] = layer if tuned.ndim == 2 else _conv(layer, tuned.shape)
            embeddings.update([module] if embedding else [])
        if log is not None:
            log(f"{module}: rank {0 if layer is None else layer.a.shape[0]}, energy {energy[module]:.6f}")
    if not layers:
        raise JaxmergeError("nothing to extract: no 2-d weight was selected")
    return Extraction(Adapter(layers, _config(layers, extras, base_model_name_or_path), frozenset(embeddings), extras),
                      energy)


def _vocabularies_differ(names, shapes, read_tuned) -> bool:
    for name in names:
        if _last(name, INPUT_EMBEDDINGS) and name in shapes:
            return tuple(read_tuned(name).shape) != tuple(shapes[name])
    return False


def _conv(layer: LoraLayer, shape: tuple) -> LoraLayer:
    """PEFT's convolution factors: ``A`` ``(r, in, kh, kw)``, ``B`` ``(out, r, 1, 1)``."""
    rank = layer.a.shape[0]
    return LoraLayer(layer.a.reshape(rank, *shape[1:]), layer.b.reshape(shape[0], rank, *[1] * (len(shape) - 2)))


def _selected(module: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if any(re.search(pattern, module) for pattern in exclude):
        return False
    return not include or any(re.search(pattern, module) for pattern in include)


def _config(layers: dict, extras: dict, base_model_name_or_path) -> dict:
    ranks = {module: int(layer.a.shape[0]) for module, layer in layers.items()}
    r = max(ranks.values())
    patterns = {module: rank for module, rank in ranks.items() if rank != r}
    saved = sorted({name.removeprefix(PREFIX).removesuffix(".weight").rsplit(".", 1)[-1] for name in extras})
    return lora_config(r, r, sorted({m.rsplit(".", 1)[-1] for m in layers}), rank_pattern=patterns,
                       alpha_pattern=dict(patterns), modules_to_save=saved or None, task_type="CAUSAL_LM",
                       base_model_name_or_path=base_model_name_or_path)
