"""A small JAX forward pass of Hugging Face decoder checkpoints (Llama, Mistral, Qwen2, Qwen3,
and their mixtures of experts: Mixtral, Qwen2-MoE, Qwen3-MoE), over tensors by their Hugging
Face names, so that routers can be initialised from hidden states without PyTorch.

It follows transformers' modelling code: RMSNorm in float32, rotary embeddings (``default``,
``linear`` and ``llama3`` rope types) on halves of each head, grouped-query attention with a
causal mask and a key padding mask, SwiGLU MLPs. Positions are ``0 .. L-1`` whatever the
padding, as transformers numbers them when no position ids are given (mergekit-moe pads
prompts on the left). An attention row that sees no token (a padded position on the left)
outputs zeros, as PyTorch's ``scaled_dot_product_attention`` does since 2.5.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxmerge.errors import JaxmergeError

Params = Mapping[str, jax.Array]


def _setting(config: Mapping, key: str, default):
    value = config.get(key)
    return default if value is None else value


def rope_frequencies(config: Mapping, head_dim: int) -> jax.Array:
    """The rotary inverse frequencies of ``config`` (``rope_parameters``, or the older
    ``rope_theta`` and ``rope_scaling``)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", _setting(config, "rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rope["factor"]
    if kind == "llama3":
        factor, old = rope["factor"], rope["original_max_position_embeddings"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        wavelength = 2 * math.pi / inv
        scaled = jnp.where(wavelength > old / low, inv / factor, inv)
        smooth = (old / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= old / high) & (wavelength <= old / low)
        return jnp.where(medium, smoothed, scaled)
    raise JaxmergeError(f"rope_type {kind!r} is not supported by the forward pass (default, linear, llama3 are)")


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return _broadcast(weight, x) * normed.astype(x.dtype)


def _broadcast(vector: jax.Array, like: jax.Array) -> jax.Array:
    """A per-feature vector shaped to multiply or add to ``like`` along its last axis."""
    return vector.reshape((1,) * (like.ndim - 1) + vector.shape)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _linear(params: Params, name: str, x: jax.Array) -> jax.Array:
    out = x @ params[f"{name}.weight"].T
    bias = params.get(f"{name}.bias")
    return out if bias is None else out + _broadcast(bias, out)


def _attention(params: Params, config: Mapping, prefix: str, x: jax.Array, mask: jax.Array,
               cos: jax.Array, sin: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    heads = config["num_attention_heads"]
    kv_heads = _setting(config, "num_key_value_heads", heads)
    head_dim = _head_dim(config)
    eps = _setting(config, "rms_norm_eps", 1e-6)

    def project(name, count):
        out = _linear(params, f"{prefix}.{name}_proj", x).reshape(batch, length, count, head_dim)
        norm = params.get(f"{prefix}.{name}_norm.weight")  # Qwen3 normalises each head's queries and keys
        return out if norm is None else _rms_norm(out, norm, eps)

    q = _rotate(project("q", heads), cos, sin)
    k = jnp.repeat(_rotate(project("k", kv_heads), cos, sin), heads // kv_heads, axis=2)
    v = jnp.repeat(project("v", kv_heads), heads // kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    weights = jnp.where(mask[:, None].any(-1, keepdims=True), jax.nn.softmax(scores, axis=-1), 0).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, heads * head_dim)
    return _linear(params, f"{prefix}.o_proj", out)


def _head_dim(config: Mapping) -> int:
    return _setting(config, "head_dim", config["hidden_size"] // config["num_attention_heads"])


def _swiglu(gate: jax.Array, up: jax.Array, down: jax.Array, x: jax.Array) -> jax.Array:
    """``down(silu(gate x) * up x)`` with ``(out, in)`` matrices."""
    return (jax.nn.silu(x @ gate.T) * (x @ up.T)) @ down.T


def _routed(config: Mapping, logits: jax.Array, x: jax.Array, expert) -> jax.Array:
    """The top-k experts' outputs weighted by their renormalised softmax router probabilities."""
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, chosen = jax.lax.top_k(probabilities, config["num_experts_per_tok"])
    if _setting(config, "norm_topk_prob", True):
        top = top / top.sum(-1, keepdims=True)
    out = jnp.zeros_like(x)
    for e in range(logits.shape[-1]):
        weight = jnp.sum(jnp.where(chosen == e, top, 0.0), axis=-1, keepdims=True).astype(x.dtype)
        out = out + weight * expert(e, x)
    return out


def _mlp(params: Params, config: Mapping, prefix: str, x: jax.Array) -> jax.Array:
    if f"{prefix}.gate_proj.weight" in params:  # a dense MLP, with its biases where it has them (mlp_bias)
        hidden = jax.nn.silu(_linear(params, f"{prefix}.gate_proj", x)) * _linear(params, f"{prefix}.up_proj", x)
        return _linear(params, f"{prefix}.down_proj", hidden)
    logits = x @ params[f"{prefix}.gate.weight"].T
    if f"{prefix}.experts.gate_up_proj" in params:  # Mixtral and Qwen3-MoE: the experts stacked, gate and up fused
        gate_up, down = params[f"{prefix}.experts.gate_up_proj"], params[f"{prefix}.experts.down_proj"]
        size = gate_up.shape[1] // 2
        out = _routed(config, logits, x, lambda e, h: _swiglu(gate_up[e, :size], gate_up[e, size:], down[e], h))
    else:  # Qwen2-MoE: one module per expert
        out = _routed(config, logits, x, lambda e, h: _mlp(params, config, f"{prefix}.experts.{e}", h))
    if f"{prefix}.shared_expert_gate.weight" in params:
        shared = _mlp(params, config, f"{prefix}.shared_expert", x)
        out = out + jax.nn.sigmoid(x @ params[f"{prefix}.shared_expert_gate.weight"].T) * shared
    return out


def hidden_states(params: Params, config: Mapping, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Every decoder layer's input and the final normalised hidden states.

    Args:
      params: the model's tensors by Hugging Face name.
      config: its ``config.json`` as a dict.
      input_ids: ``(batch, length)`` token ids.
      attention_mask: ``(batch, length)``, 1 for tokens and 0 for padding (default: all 1).

    Returns:
      ``(inputs, final)``: ``(num_layers, batch, length, hidden)`` (the embeddings first, as
      transformers' ``hidden_states[:-1]``) and ``(batch, length, hidden)``.

    Raises:
      JaxmergeError: an activation other than SiLU, or an unsupported rope type.
    """
    if _setting(config, "hidden_act", "silu") != "silu":
        raise JaxmergeError(f"hidden_act {config['hidden_act']!r} is not supported by the forward pass (silu is)")
    rope_frequencies(config, _head_dim(config))  # refuses an unsupported rope type before tracing
    attention_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    return _forward(dict(params), json.dumps(dict(config), sort_keys=True), input_ids, attention_mask)


@functools.partial(jax.jit, static_argnums=1)
def _forward(params: dict, config_json: str, input_ids: jax.Array, attention_mask: jax.Array):
    """:func:`hidden_states`, compiled once per config (given as JSON, a hashable static argument)."""
    config = json.loads(config_json)
    length = input_ids.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None] & attention_mask[:, None, :]
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * rope_frequencies(config, _head_dim(config))[None]
    x = params["model.embed_tokens.weight"][input_ids]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[None, :, None].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[None, :, None].astype(x.dtype)
    eps = _setting(config, "rms_norm_eps", 1e-6)
    inputs = []
    for i in range(config["num_hidden_layers"]):
        inputs.append(x)
        prefix = f"model.layers.{i}"
        x = x + _attention(params, config, f"{prefix}.self_attn", _rms_norm(x, params[f"{prefix}.input_layernorm.weight"],
                                                                            eps), mask, cos, sin)
        x = x + _mlp(params, config, f"{prefix}.mlp", _rms_norm(x, params[f"{prefix}.post_attention_layernorm.weight"],
                                                                eps))
    return jnp.stack(inputs), _rms_norm(x, params["model.norm.weight"], eps)


def random_params(config: Mapping, key: jax.Array, *, scale: float = 0.2) -> dict[str, jax.Array]:
    """Random dense tensors of the shapes ``config`` describes (Llama, Mistral, Qwen2 with
    attention biases, Qwen3 with query and key norms; norms are ones), for examples and tests.

    Args:
      config: a ``config.json`` dict with ``hidden_size``, ``intermediate_size``,
        ``num_attention_heads``, ``num_hidden_layers`` and ``vocab_size``.
      key: the random key.
      scale: the standard deviation of the matrices.

    Returns:
      ``{Hugging Face name: float32 array}``.

    Examples:
      >>> import jax
      >>> config = {"hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
      ...           "vocab_size": 6}
      >>> random_params(config, jax.random.key(0))["model.layers.0.mlp.up_proj.weight"].shape
      (8, 4)
    """
    hidden, heads, kind = config["hidden_size"], config["num_attention_heads"], config.get("model_type", "llama")
    head_dim, kv = _head_dim(config), _setting(config, "num_key_value_heads", heads)
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "lm_head.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes.update({f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
                       f"{prefix}.self_attn.k_proj.weight": (kv * head_dim, hidden),
                       f"{prefix}.self_attn.v_proj.weight": (kv * head_dim, hidden),
                       f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
                       f"{prefix}.mlp.gate_proj.weight": (config["intermediate_size"], hidden),
                       f"{prefix}.mlp.up_proj.weight": (config["intermediate_size"], hidden),
                       f"{prefix}.mlp.down_proj.weight": (hidden, config["intermediate_size"])})
        if kind == "qwen2":
            shapes.update({f"{prefix}.self_attn.{p}_proj.bias": (n * head_dim,) for p, n in (("q", heads), ("k", kv),
                                                                                             ("v", kv))})
    params = {name: scale * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
              for i, (name, shape) in enumerate(sorted(shapes.items()))}
    norms = ["model.norm.weight"] + [f"model.layers.{i}.{n}_layernorm.weight" for i in range(config["num_hidden_layers"])
                                     for n in ("input", "post_attention")]
    params.update({name: jnp.ones(hidden, jnp.float32) for name in norms})
    if kind == "qwen3":
        params.update({f"model.layers.{i}.self_attn.{p}_norm.weight": jnp.ones(head_dim, jnp.float32)
                       for i in range(config["num_hidden_layers"]) for p in "qk"})
    return params


def logits(params: Params, config: Mapping, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """The next-token logits ``(batch, length, vocab)`` (``lm_head``, or the embeddings when tied).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> config = {"hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
      ...           "vocab_size": 6}
      >>> logits(random_params(config, jax.random.key(0)), config, jnp.asarray([[0, 1, 2]])).shape
      (1, 3, 6)
    """
    final = hidden_states(params, config, input_ids, attention_mask)[1]
    return final @ params.get("lm_head.weight", params["model.embed_tokens.weight"]).T
