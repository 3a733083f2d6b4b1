"""The mixture-of-experts checkpoints mergekit-moe writes: Mixtral (Llama or Mistral experts),
Qwen2-MoE (one shared expert) and Qwen3-MoE, with transformers 5's tensor names and the
``config.json`` fields transformers writes for them.

Mixtral and Qwen3-MoE stack the experts: ``mlp.experts.gate_up_proj`` is ``(experts, 2 *
intermediate, hidden)`` (each expert's ``gate_proj`` rows, then its ``up_proj`` rows) and
``mlp.experts.down_proj`` is ``(experts, hidden, intermediate)``; Qwen2-MoE keeps one module
per expert (``mlp.experts.{e}.gate_proj.weight``) and adds ``mlp.shared_expert.*`` and
``mlp.shared_expert_gate.weight``. Every layout has a router ``mlp.gate.weight``, ``(experts,
hidden)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# transformers 5's defaults for keys a source config may lack (written out by save_pretrained)
_SOURCE_DEFAULTS = {
    "llama": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
              "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 2048, "mlp_bias": False,
              "pad_token_id": None, "pretraining_tp": 1, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "use_cache": True},
    "mistral": {"attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                "initializer_range": 0.02, "max_position_embeddings": 131072, "num_key_value_heads": 8,
                "pad_token_id": None, "rms_norm_eps": 1e-6, "sliding_window": 4096, "tie_word_embeddings": False,
                "use_cache": True},
    "qwen2": {"attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None, "hidden_act": "silu",
              "initializer_range": 0.02, "max_position_embeddings": 32768, "max_window_layers": 28,
              "num_key_value_heads": 32, "pad_token_id": None, "rms_norm_eps": 1e-6, "sliding_window": None,
              "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False},
    "qwen3": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None,
              "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768,
              "max_window_layers": 28, "num_key_value_heads": 32, "pad_token_id": None, "rms_norm_eps": 1e-6,
              "sliding_window": None, "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False},
}
_DROPPED = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "rope_theta", "rope_scaling",
            "architectures", "model_type")
_ROUTER_DEFAULTS = {"output_router_logits": False, "router_aux_loss_coef": 0.001}
_QWEN_MOE_DEFAULTS = {**_ROUTER_DEFAULTS, "decoder_sparse_step": 1, "max_window_layers": 28, "mlp_only_layers": [],
                      "norm_topk_prob": True, "sliding_window": None, "use_sliding_window": False}


@dataclasses.dataclass(frozen=True)
class Layout:
    """An output architecture.

    Attributes:
      name: mergekit-moe's name (``architecture`` matches its start, ignoring case).
      model_type: the written ``model_type``.
      sources: the input ``model_type`` values it takes.
      shared: the number of shared experts it takes (``None``: any is refused but zero).
      stacked: experts stacked into ``gate_up_proj`` / ``down_proj`` (else one module each).
      expert_count_key: the config key of the number of experts.

    Examples:
      >>> from jaxmerge.moe import LAYOUTS
      >>> [(layout.name, layout.model_type) for layout in LAYOUTS][0]
      ('Mixtral', 'mixtral')
    """

    name: str
    model_type: str
    sources: tuple[str, ...]
    shared: int
    stacked: bool
    expert_count_key: str

    def refusal(self, model_types: list[str], shared_experts: int, shared_prompts: bool,
                gate_mode: str) -> str | None:
        """Why this layout cannot hold these models, or None."""
        if shared_experts != self.shared:
            return f"{self.name} takes {self.shared} shared experts, the config has {shared_experts}"
        if self.shared and gate_mode != "random" and not shared_prompts:
            return f"{self.name} routes to its shared expert by prompts: give it positive_prompts"
        if len(set(model_types)) != 1:
            return f"{self.name} needs every model of one architecture, got {sorted(set(model_types))}"
        if model_types[0] not in self.sources:
            return f"{self.name} takes {' or '.join(self.sources)} models, got {model_types[0]!r}"
        return None

    def config(self, source: Mapping, experts: int, experts_per_token: int, dtype: str | None) -> dict:
        """The ``config.json`` of the mixture (keys sorted, as transformers writes them)."""
        kind = source.get("model_type", "llama")
        out = {**_SOURCE_DEFAULTS.get(kind, {}), **{k: v for k, v in source.items() if k not in _DROPPED}}
        heads = out["num_attention_heads"]
        if out.get("num_key_value_heads") is None:
            out["num_key_value_heads"] = heads
        if (kind in ("llama", "mistral") or self.model_type == "mixtral") and out.get("head_dim") is None:
            out["head_dim"] = out["hidden_size"] // heads  # also where the base's config holds null
        out["rope_parameters"] = _rope_parameters(source)
        if self.model_type == "mixtral":
            out.update(_ROUTER_DEFAULTS, router_jitter_noise=out.get("router_jitter_noise", 0.0), sliding_window=None)
        else:
            out = {**_QWEN_MOE_DEFAULTS, **out, "decoder_sparse_step": 1, "norm_topk_prob": True,
                   "moe_intermediate_size": out["intermediate_size"]}
            if self.model_type == "qwen2_moe":
                out.update(qkv_bias=out.get("qkv_bias", True), sliding_window=None, use_sliding_window=False,
                           shared_expert_intermediate_size=out["intermediate_size"])
            else:
                out.setdefault("attention_bias", False)
            out["layer_types"] = _layer_types(out)
        out.update({"architectures": [f"{_CLASS_NAMES[self.model_type]}ForCausalLM"], "model_type": self.model_type,
                    self.expert_count_key: experts, "num_experts_per_tok": experts_per_token})
        if dtype is not None:
            out["dtype"] = dtype
        return dict(sorted(out.items()))

    def dense_names(self, source_type: str, layers: int) -> list[tuple[str, bool]]:
        """The base's tensors the mixture copies (``(name, optional)``), in mergekit's order:
        everything but the MLPs (an attention bias may be missing: it is written as zeros)."""
        attention = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
        if self.model_type == "qwen2_moe":
            attention += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
        if source_type == "qwen3":
            attention += ["q_norm.weight", "k_norm.weight"]
        names = [("model.embed_tokens.weight", False)]
        for i in range(layers):
            names += [(f"model.layers.{i}.{n}", False) for n in ("input_layernorm.weight",
                                                                  "post_attention_layernorm.weight")]
            names += [(f"model.layers.{i}.self_attn.{n}", False) for n in attention]
        return names + [("model.norm.weight", False), ("lm_head.weight", True)]


_CLASS_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe"}

LAYOUTS = (Layout("Mixtral", "mixtral", ("llama", "mistral"), 0, True, "num_local_experts"),
           Layout("Qwen MoE", "qwen2_moe", ("llama", "mistral", "qwen2"), 1, False, "num_experts"),
           Layout("Qwen3 MoE", "qwen3_moe", ("qwen3",), 0, True, "num_local_experts"))


def _rope_parameters(source: Mapping) -> dict:
    """transformers 5's ``rope_parameters``: the old ``rope_scaling`` (``type`` also as
    ``rope_type``) with ``rope_theta``."""
    if source.get("rope_parameters") is not None:
        return dict(source["rope_parameters"])
    rope = dict(source.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope["rope_theta"] = float(source.get("rope_theta") or 10000.0)
    return dict(sorted(rope.items()))


def _layer_types(config: Mapping) -> list[str]:
    sliding = config.get("use_sliding_window") and config.get("sliding_window") is not None
    return ["sliding_attention" if sliding and i >= config["max_window_layers"] else "full_attention"
            for i in range(config["num_hidden_layers"])]


def _deepseek_takes(model_types: list[str], shared_experts: int, shared_prompts: bool) -> bool:
    """Whether mergekit-moe's DeepSeek MoE layout takes the models: Llama or Mistral models of
    one type, and at most one shared expert, without prompts (positive or negative)."""
    return (shared_experts <= 1 and not shared_prompts and len(set(model_types)) == 1
            and model_types[0] in ("llama", "mistral"))


def select_layout(architecture: str | None, model_types: list[str], shared_experts: int, shared_prompts: bool,
                  gate_mode: str, shared_negative_prompts: bool = False) -> Layout:
    """mergekit-moe's choice of output architecture: among the layouts whose name starts with
    ``architecture`` (any case), the first that takes the models, Mixtral first.

    Args:
      architecture: the config's ``architecture`` (None: any).
      model_types: the ``model_type`` of the base and of every expert.
      shared_experts: the number of shared experts.
      shared_prompts: whether the shared experts have positive prompts.
      gate_mode: the config's gate mode.
      shared_negative_prompts: whether the shared experts have negative prompts.

    Returns:
      The :class:`Layout`.

    Raises:
      ValueError: no layout takes the models, each layout's reason given.

    Examples:
      >>> select_layout(None, ["qwen3"] * 3, 0, False, "random").name
      'Qwen3 MoE'
    """
    candidates = [layout for layout in LAYOUTS
                  if architecture is None or layout.name.lower().startswith(architecture.lower())]
    if not candidates:
        raise ValueError(f"no output architecture is named {architecture!r}; known: {[la.name for la in LAYOUTS]}")
    reasons = []
    for layout in candidates:
        if layout.model_type == "qwen2_moe" and architecture is None and _deepseek_takes(
                model_types, shared_experts, shared_prompts or shared_negative_prompts):
            raise ValueError("mergekit-moe writes these models as DeepSeek MoE (the layout it tries before Qwen MoE), "
                             "which is not written here; set architecture: qwen to write Qwen MoE")
        reason = layout.refusal(model_types, shared_experts, shared_prompts, gate_mode)
        if reason is None:
            return layout
        reasons.append(reason)
    raise ValueError("no output architecture takes these models: " + "; ".join(reasons))
