"""Random LoRA adapters for the tests."""

import jax.numpy as jnp
import numpy as np

from jaxmerge import lora

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (6, 10),
          "model.layers.1.self_attn.q_proj": (12, 10)}


def random_adapter(seed: int, r: int = 4, alpha: float = 8, modules=SHAPES, dtype=jnp.float32, **config):
    rng = np.random.default_rng(seed)
    layers = {m: lora.LoraLayer(jnp.asarray(rng.normal(size=(r, i)), dtype), jnp.asarray(rng.normal(size=(o, r)), dtype))
              for m, (o, i) in modules.items()}
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return lora.Adapter(layers, lora.lora_config(r, alpha, targets, **config))
