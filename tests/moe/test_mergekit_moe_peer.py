"""mergekit-moe itself against ``jaxmerge moe``, when mergekit 0.1.5 is installed (it needs torch,
so it is not a test dependency): ``mergekit-moe`` on the PATH, or its path in ``$MERGEKIT_MOE``.
Tensor names, shapes, dtypes and config.json (but ``transformers_version``) must be equal; every
tensor too, except random routers (torch's generator), float32 prompt routers (within an ulp:
torch rounds norms differently) and ``hidden`` routers, which mergekit computes in bfloat16
(within 2e-2)."""

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
import yaml

from jaxmerge import checkpoints
from jaxmerge.cli.main import main
from jaxmerge.moe.transformer import random_params
from tests.moe.test_moe import PROMPTS, models  # noqa: F401 (a fixture)

MERGEKIT_MOE = os.environ.get("MERGEKIT_MOE") or shutil.which("mergekit-moe")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MERGEKIT_MOE is None, reason="mergekit is not installed")]


def _qwen(root, kind):
    """A Qwen2 or Qwen3 base and three experts near it, with the Llama models' tokenizer."""
    config = {"architectures": [f"{kind.capitalize()}ForCausalLM"], "model_type": kind, "hidden_size": 16,
              "intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
              "num_hidden_layers": 2, "vocab_size": 19, "max_window_layers": 2, "tie_word_embeddings": kind == "qwen3"}
    base = random_params(config, jax.random.key(0))
    if kind == "qwen3":
        del base["lm_head.weight"]
    for i, name in enumerate(["base", "e0", "e1", "e2"]):
        tensors = {n: v + (0.05 * i) * jax.random.normal(jax.random.fold_in(jax.random.key(i), j), v.shape)
                   for j, (n, v) in enumerate(sorted(base.items()))}
        path = checkpoints.save(root / f"{kind}_{name}", tensors, format="safetensors")
        (path / "config.json").write_text(json.dumps(config))
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(root / "base" / file, path / file)


def _experts(prefix, **extra):
    return [{"source_model": f"{prefix}e{i}", "positive_prompts": p, "negative_prompts": n, **extra}
            for i, (p, n) in enumerate(PROMPTS)]


CONFIGS = {
    "mixtral_random": {"base_model": "base", "gate_mode": "random", "dtype": "float32", "experts": _experts("")},
    "mixtral_cheap_embed": {"base_model": "base", "gate_mode": "cheap_embed", "dtype": "bfloat16",
                            "experts_per_token": 1, "experts": _experts("", residual_scale=0.5)},
    "mixtral_hidden": {"base_model": "base", "gate_mode": "hidden", "experts": _experts("")},
    "qwen_moe_from_llama": {"base_model": "base", "architecture": "qwen", "gate_mode": "random",
                            "experts": _experts("")[:2], "shared_experts": [{"source_model": "base"}]},
    "qwen2_moe_hidden": {"base_model": "qwen2_base", "gate_mode": "hidden", "experts": _experts("qwen2_")[:2],
                         "shared_experts": [{"source_model": "qwen2_base", "positive_prompts": ["fed"]}]},
    "qwen3_moe_cheap_embed": {"base_model": "qwen3_base", "gate_mode": "cheap_embed",
                              "experts": _experts("qwen3_", residual_scale=2.0)},
}  # a shared expert is the base: mergekit-moe opens no loader for another model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_same_mixture_as_mergekit_moe(models, tmp_path, name):  # noqa: F811
    root = models[0]
    if not (root / "qwen3_base").exists():
        _qwen(root, "qwen2")
        _qwen(root, "qwen3")
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(CONFIGS[name]))
    done = subprocess.run([MERGEKIT_MOE, str(config), str(tmp_path / "mergekit")], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=root, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(["moe", str(config), str(tmp_path / "jaxmerge"), "--no-progress"]) == 0  # paths relative to config
    theirs, ours = checkpoints.load(tmp_path / "mergekit"), checkpoints.load(tmp_path / "jaxmerge")
    assert sorted(theirs) == sorted(ours)
    for tensor, value in theirs.items():
        assert (ours[tensor].shape, ours[tensor].dtype) == (value.shape, value.dtype), tensor
        mode, router = CONFIGS[name]["gate_mode"], tensor.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
        if router and mode == "random":
            continue
        if router and mode == "hidden":  # mergekit-moe runs the model in bfloat16
            np.testing.assert_allclose(np.asarray(ours[tensor], np.float32), np.asarray(value, np.float32), atol=2e-2,
                                       err_msg=tensor)
        elif router and value.dtype == np.float32:  # torch rounds float32 norms differently: an ulp
            np.testing.assert_allclose(np.asarray(ours[tensor]), np.asarray(value), rtol=2e-6, err_msg=tensor)
        else:
            np.testing.assert_array_equal(np.asarray(ours[tensor]), np.asarray(value), err_msg=tensor)
    theirs_config, ours_config = (json.loads((tmp_path / tool / "config.json").read_text())
                                  for tool in ("mergekit", "jaxmerge"))
    theirs_config.pop("transformers_version")
    assert ours_config == theirs_config
