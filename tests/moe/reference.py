"""A NumPy forward pass of a dense Llama / Qwen2 / Qwen3 checkpoint, written from transformers'
modelling code (float64), as an independent reference for jaxmerge.moe.transformer."""

import numpy as np


def _norm(x, weight, eps):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rotary(x, positions, theta):
    half = x.shape[-1] // 2
    freqs = positions[:, None] * theta ** (-np.arange(half) * 2 / x.shape[-1])[None]
    cos, sin = np.cos(freqs), np.sin(freqs)  # (length, half)
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos[:, None] - second * sin[:, None], second * cos[:, None] + first * sin[:, None]], -1)


def layer_inputs(params, config, ids, mask):
    """(layers, batch, length, hidden): the embeddings, then each layer's output but the last."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    eps, theta = config.get("rms_norm_eps", 1e-6), config.get("rope_theta", 10000.0)
    x = p["model.embed_tokens.weight"][np.asarray(ids)]
    batch, length = x.shape[:2]
    allowed = np.tril(np.ones((length, length), bool))[None] & np.asarray(mask, bool)[:, None, :]
    inputs = []
    for i in range(config["num_hidden_layers"]):
        inputs.append(x)
        a = f"model.layers.{i}.self_attn."
        h = _norm(x, p[f"model.layers.{i}.input_layernorm.weight"], eps)

        def proj(name, count, h=h, a=a):
            out = h @ p[a + f"{name}_proj.weight"].T + p.get(a + f"{name}_proj.bias", 0.0)
            out = out.reshape(batch, length, count, head_dim)
            return _norm(out, p[a + f"{name}_norm.weight"], eps) if a + f"{name}_norm.weight" in p else out
        q = _rotary(proj("q", heads), np.arange(length, dtype=np.float64), theta)
        k = np.repeat(_rotary(proj("k", kv), np.arange(length, dtype=np.float64), theta), heads // kv, axis=2)
        v = np.repeat(proj("v", kv), heads // kv, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        scores = np.where(allowed[:, None], scores, -1e30)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        weights = np.where(allowed[:, None].any(-1, keepdims=True), weights, 0.0)  # sees no token: zeros, as torch's
        x = x + np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, -1) @ p[a + "o_proj.weight"].T
        m = f"model.layers.{i}.mlp."
        h = _norm(x, p[f"model.layers.{i}.post_attention_layernorm.weight"], eps)
        gate = h @ p[m + "gate_proj.weight"].T + p.get(m + "gate_proj.bias", 0.0)
        up = h @ p[m + "up_proj.weight"].T + p.get(m + "up_proj.bias", 0.0)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p[m + "down_proj.weight"].T + p.get(m + "down_proj.bias", 0.0)
    return np.stack(inputs), _norm(x, p["model.norm.weight"], eps)
