"""The permutation spec of a Hugging Face Llama-family checkpoint (Llama, Mistral, Qwen2, Qwen3),
by tensor name, in PyTorch's ``(out, in)`` layout.

Three kinds of permutation leave such a decoder's function unchanged:

- ``residual``: the model dimension, shared by every block. RMSNorm divides by the root mean
  square over that axis, which no permutation changes, and scales it elementwise, so the
  embeddings' columns, every norm, the input axis of the query, key, value, gate and up
  projections and the output axis of the attention output and down projections (and the
  ``lm_head`` columns) move together.
- ``layers.{i}.heads``: the key-value heads of block ``i``, each with its group of query heads
  (``num_attention_heads / num_key_value_heads`` of them, in order), moved as blocks of
  ``head_dim`` entries. Attention is a sum over heads; rotary embeddings act within a head, so
  whole heads can move.
- ``layers.{i}.mlp``: the MLP's hidden units (gate and up rows, down columns).
"""

from __future__ import annotations

from collections.abc import Mapping

from jaxmerge.alignment.spec import PermutationSpec
from jaxmerge.errors import JaxmergeError


def _setting(config: Mapping, key: str, default):
    value = config.get(key)
    return default if value is None else value


def llama_permutation_spec(names, config: Mapping, *, residual: bool = True, heads: bool = True,
                           mlp: bool = True) -> PermutationSpec:
    """The permutation spec of a Llama-family checkpoint's tensors (Hugging Face names).

    Args:
      names: the checkpoint's tensor names (or a ``{name: array}`` dict); tensors the spec
        would name but the checkpoint lacks (biases, ``lm_head`` when tied) are left out.
      config: its ``config.json`` (``num_hidden_layers``, ``num_attention_heads``,
        ``hidden_size``, and ``num_key_value_heads`` and ``head_dim`` where set).
      residual: name the model dimension, shared by all blocks, ``'residual'``.
      heads: name each block's heads ``'layers.{i}.heads'``.
      mlp: name each block's MLP hidden units ``'layers.{i}.mlp'``.

    Returns:
      A :class:`~jaxmerge.PermutationSpec` over the flat ``{name: array}`` dict of the
      checkpoint's tensors.

    Raises:
      JaxmergeError: a tensor of a block is missing (naming it), or heads that do not divide
        into key-value groups.

    Examples:
      >>> import jaxmerge
      >>> config = {"hidden_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1}
      >>> names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
      ...     f"model.layers.0.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm",
      ...     "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
      ...     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
      >>> spec = llama_permutation_spec(names, config)
      >>> spec.axes[("model.layers.0.self_attn.q_proj.weight",)]  # 2 query heads of 2 entries per key-value head
      (('layers.0.heads', 4), 'residual')
      >>> spec.axes[("model.layers.0.mlp.down_proj.weight",)]
      ('residual', 'layers.0.mlp')
    """
    names = set(names)
    n_heads = config["num_attention_heads"]
    kv_heads = _setting(config, "num_key_value_heads", n_heads)
    head_dim = _setting(config, "head_dim", config["hidden_size"] // n_heads)
    if n_heads % kv_heads:
        raise JaxmergeError(f"{n_heads} attention heads do not divide into {kv_heads} key-value heads")
    r = "residual" if residual else None
    axes: dict[str, tuple] = {"model.embed_tokens.weight": (None, r), "model.norm.weight": (r,),
                              "lm_head.weight": (None, r)}
    for i in range(config["num_hidden_layers"]):
        block = f"model.layers.{i}"
        group = (f"layers.{i}.heads", head_dim * n_heads // kv_heads) if heads else None
        kv = (f"layers.{i}.heads", head_dim) if heads else None
        hidden = f"layers.{i}.mlp" if mlp else None
        required = {f"{block}.input_layernorm.weight": (r,), f"{block}.post_attention_layernorm.weight": (r,),
                    f"{block}.self_attn.q_proj.weight": (group, r), f"{block}.self_attn.k_proj.weight": (kv, r),
                    f"{block}.self_attn.v_proj.weight": (kv, r), f"{block}.self_attn.o_proj.weight": (r, group),
                    f"{block}.mlp.gate_proj.weight": (hidden, r), f"{block}.mlp.up_proj.weight": (hidden, r),
                    f"{block}.mlp.down_proj.weight": (r, hidden)}
        missing = sorted(set(required) - names)
        if missing:
            raise JaxmergeError(f"the checkpoint has no tensor {missing[0]!r} of a Llama-family block")
        axes.update(required)
        axes.update({f"{block}.self_attn.q_proj.bias": (group,), f"{block}.self_attn.k_proj.bias": (kv,),
                     f"{block}.self_attn.v_proj.bias": (kv,), f"{block}.self_attn.o_proj.bias": (r,),
                     f"{block}.mlp.gate_proj.bias": (hidden,), f"{block}.mlp.up_proj.bias": (hidden,),
                     f"{block}.mlp.down_proj.bias": (r,)})
    return PermutationSpec({(name,): entries for name, entries in axes.items()
                            if name in names and any(e is not None for e in entries)})
