"""Small Hugging Face-layout model directories with Llama tensor names, written with the
``safetensors`` library itself (an independent writer)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.flax import save_file


def llama_tensors(seed: int, *, dtype=jnp.float32, layers: int = 2, d: int = 16, ffn: int = 24, vocab: int = 40,
                  scale: float = 1.0, around: dict | None = None) -> dict:
    """Random Llama-named tensors; with ``around``, those tensors plus ``scale`` times noise."""
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        shapes.update({f"{prefix}.self_attn.{p}_proj.weight": (d, d) for p in "qkvo"})
        shapes.update({f"{prefix}.mlp.gate_proj.weight": (ffn, d), f"{prefix}.mlp.up_proj.weight": (ffn, d),
                       f"{prefix}.mlp.down_proj.weight": (d, ffn), f"{prefix}.input_layernorm.weight": (d,),
                       f"{prefix}.post_attention_layernorm.weight": (d,)})
    out = {}
    for name, shape in shapes.items():
        noise = scale * rng.standard_normal(shape)
        start = 0.0 if around is None else np.asarray(around[name], np.float64)
        out[name] = jnp.asarray(start + noise, dtype)
    return out


def write_model(path: Path, tensors: dict, *, shards: int = 1, config: dict | None = None) -> Path:
    """A model directory: safetensors (``shards`` files with an index if > 1), config.json,
    tokenizer.json and generation_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s, chunk in enumerate(np.array_split(np.asarray(names, dtype=object), shards)):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in chunk}, str(path / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in chunk})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"], "hidden_size": 16}))
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (path / "generation_config.json").write_text('{"do_sample": false}')
    return path
