"""mergekit itself against ``jaxmerge merge``, when mergekit 0.1.5 is installed (it needs torch, so
it is not a test dependency): ``mergekit-yaml`` on the PATH, or its path in ``$MERGEKIT_YAML``.
Float32 outputs agree to 1e-5; 16-bit ones are compared in the arithmetic tests, and sorting-based
and random methods differ by design (README)."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from jaxmerge import checkpoints
from jaxmerge.cli.main import main
from tests.checkpoints.hf import llama_tensors, write_model
from tests.cli.test_tokenizer import _vocab, models  # noqa: F401 (a fixture)

MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MERGEKIT is None, reason="mergekit is not installed")]
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
         "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 40,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 64, "torch_dtype": "float32"}


def _configs(root):
    models = [{"model": str(root / f"m{i}"), "parameters": {"weight": w, "density": d}}
              for i, (w, d) in enumerate([(1.0, 0.5), ([0.2, 0.9], [0.3, 0.8]), (0.5, 0.7)])]
    base = str(root / "base")
    return {
        "ties": {"merge_method": "ties", "base_model": base, "models": models, "parameters": {"lambda": 0.9}},
        "breadcrumbs": {"merge_method": "breadcrumbs_ties", "base_model": base, "models": models},
        "model_stock": {"merge_method": "model_stock", "base_model": base,
                        "models": [{"model": m["model"]} for m in models]},
        "nuslerp": {"merge_method": "nuslerp", "models": [{"model": m["model"], "parameters": {"weight": w}}
                                                          for m, w in zip(models[:2], [1.0, 0.4])]},
        "karcher": {"merge_method": "karcher", "models": [{"model": m["model"]} for m in models],
                    "parameters": {"max_iter": 20, "tol": 1e-6}},
        "sce": {"merge_method": "sce", "base_model": base, "models": [{"model": m["model"]} for m in models],
                "parameters": {"select_topk": 0.6}},
        "frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": models[0]["model"], "layer_range": [0, 3]}]},
            {"sources": [{"model": models[1]["model"], "layer_range": [1, 4], "parameters": {"scale": 0.5}}]}]},
        "tied": {"merge_method": "task_arithmetic", "base_model": str(root / "tied"), "models": models[:2]},
        "sliced_filters": {"merge_method": "task_arithmetic", "base_model": base, "slices": [{"sources": [
            {"model": base, "layer_range": [2, 4]},
            {"model": models[0]["model"], "layer_range": [2, 4], "parameters": {"weight": [
                {"filter": "layers.2.", "value": 2.0}, {"filter": "layers.0.", "value": -1.0}, {"value": 0.5}]}},
            {"model": models[1]["model"], "layer_range": [2, 4], "parameters": {"weight": 0.3}}]}],
            "parameters": {"lambda": [{"filter": "layers.0.", "value": 0.5}, {"value": 1.0}]}},
        "gradient_slerp": {"merge_method": "slerp", "base_model": models[0]["model"], "slices": [
            {"sources": [{"model": models[0]["model"], "layer_range": [0, 4]},
                         {"model": models[1]["model"], "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]}},
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer")
    base = llama_tensors(0, layers=4)
    write_model(root / "base", base, config=LLAMA)
    for i in range(3):
        write_model(root / f"m{i}", llama_tensors(60 + i, layers=4, scale=0.05, around=base), config=LLAMA)
    tied = {k: v for k, v in llama_tensors(63, layers=4, scale=0.05, around=base).items() if k != "lm_head.weight"}
    write_model(root / "tied", tied, config={**LLAMA, "tie_word_embeddings": True})
    return root


def _both(config: dict, tmp_path) -> tuple[dict, dict]:
    """mergekit's and jaxmerge's outputs of ``config``: ``(theirs, ours)``."""
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([MERGEKIT, str(path), str(tmp_path / "mergekit")], check=False, capture_output=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))  # its model card step may fail offline
    assert (tmp_path / "mergekit" / "model.safetensors").exists(), "mergekit wrote no model"
    assert main(["merge", str(path), str(tmp_path / "jaxmerge"), "--no-progress"]) == 0
    return checkpoints.load(tmp_path / "mergekit"), checkpoints.load(tmp_path / "jaxmerge")


def _bits_apart(theirs: dict, ours: dict) -> np.ndarray:
    """How many units in the last place each 16-bit entry of ``ours`` is from ``theirs``'s."""
    assert sorted(theirs) == sorted(ours)
    return np.concatenate([np.abs(np.asarray(ours[t]).view(np.int16).astype(np.int32)
                                  - np.asarray(theirs[t]).view(np.int16)).ravel() for t in theirs])


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "model_stock", "nuslerp", "karcher", "sce", "frankenmerge",
                                  "gradient_slerp", "tied", "sliced_filters"])
def test_the_same_numbers_as_mergekit(root, tmp_path, name):
    theirs, ours = _both(_configs(root)[name], tmp_path)
    assert sorted(theirs) == sorted(ours)
    for tensor in theirs:
        np.testing.assert_allclose(np.asarray(ours[tensor]), np.asarray(theirs[tensor]), rtol=1e-5, atol=1e-5,
                                   err_msg=tensor)
    layers = json.loads((tmp_path / "mergekit" / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((tmp_path / "jaxmerge" / "config.json").read_text())["num_hidden_layers"] == layers


def _tokenizer_configs(root):
    models = [{"model": str(root / m), "parameters": {"weight": w}} for m, w in [("m0", 1.0), ("m1", 0.5)]]
    return {
        "union": {"merge_method": "ties", "base_model": str(root / "base"), "tokenizer_source": "union",
                  "models": [{**m, "parameters": {**m["parameters"], "density": 0.9}} for m in models],
                  "chat_template": "chatml"},
        "base": {"merge_method": "task_arithmetic", "base_model": str(root / "base"), "tokenizer_source": "base",
                 "models": models},
        "tokens": {"merge_method": "linear", "base_model": str(root / "base"),
                   "models": [{"model": str(root / "base"), "parameters": {"weight": 0.2}}, *models],
                   "tokenizer": {"source": str(root / "m1"), "pad_to_multiple_of": 8, "tokens": {
                       "<|im|>": {"source": str(root / "m0")}, "zz": {"source": {"kind": "zero"}},
                       "a": {"source": {"kind": "model_token", "model": str(root / "m1"), "token": "b"},
                             "force": True}}}},
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_karcher_in_16_bits_is_mergekits_to_a_last_bit(root, tmp_path, dtype):
    """Both compute each step in the models' dtype; the sums' order differs, so a last bit may
    (README): never more than one in float16, in a few bfloat16 entries."""
    apart = _bits_apart(*_both({"merge_method": "karcher", "dtype": dtype,
                                "models": [{"model": str(root / f"m{i}")} for i in range(3)]}, tmp_path))
    assert np.mean(apart > 1) <= (0.005 if dtype == "bfloat16" else 0), np.mean(apart > 1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_in_16_bits_is_mergekits_bit_for_bit(root, tmp_path, dtype, normalize):
    """Weights whose products with the entries are inexact in float32, so that each fused
    multiply-add and the division round as torch's do."""
    sources = [{"model": str(root / f"m{i}"), "parameters": {"weight": w}} for i, w in enumerate([0.7, 0.4, 0.1])]
    apart = _bits_apart(*_both({"merge_method": "linear", "dtype": dtype, "models": sources,
                                "parameters": {"normalize": normalize}}, tmp_path))
    assert apart.max() == 0, np.mean(apart > 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_models_with_adapters_as_mergekit_applies_them(root, tmp_path, dtype):
    """``model+adapter`` and ``{model, lora}`` references: mergekit applies the adapter with PEFT
    in the model's dtype (its config's) into ``--lora-merge-cache``: the applied models are the
    same bit for bit (PEFT rounds an embedding's update before adding it, a linear layer's not),
    and so is the bfloat16 merge."""
    import jax.numpy as jnp

    from jaxmerge import lora

    paths = {}
    for name in ("base", "m0", "m1"):
        tensors = {k: jnp.asarray(v, dtype) for k, v in checkpoints.load(root / name).items()}
        paths[name] = str(write_model(tmp_path / name, tensors, config={**LLAMA, "torch_dtype": dtype}))
    rng = np.random.default_rng(5)
    layers = {m: lora.LoraLayer(jnp.asarray(rng.normal(size=(4, i)), jnp.float32),
                                jnp.asarray(rng.normal(size=(o, 4)) * 0.1, jnp.float32))
              for m, (o, i) in {"model.layers.1.self_attn.q_proj": (16, 16), "model.layers.2.mlp.down_proj": (16, 24),
                                "model.embed_tokens": (16, 40)}.items()}
    adapter = lora.save_adapter(tmp_path / "adapter", lora.Adapter(
        layers, lora.lora_config(4, 8, ["q_proj", "down_proj", "embed_tokens"]), frozenset({"model.embed_tokens"})))
    config = {"merge_method": "task_arithmetic", "base_model": f"{paths['base']}+{adapter}", "models": [
        {"model": f"{paths['m0']}+{adapter}", "parameters": {"weight": 0.6}},
        {"model": {"model": {"path": paths["m1"]}, "lora": {"path": str(adapter)}}, "parameters": {"weight": 0.3}}]}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run([MERGEKIT, str(path), str(tmp_path / "mergekit"), "--lora-merge-cache", str(tmp_path / "cache")],
                         check=False, capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert (tmp_path / "mergekit" / "model.safetensors").exists(), run.stderr.decode(errors="replace")[-2000:]
    assert main(["merge", str(path), str(tmp_path / "jaxmerge"), "--no-progress", "--lora-merge-cache",
                 str(tmp_path / "applied")]) == 0
    applied = sorted(p.name for p in (tmp_path / "applied").iterdir())
    assert applied == sorted(p.name for p in (tmp_path / "cache").iterdir()) and len(applied) == 3
    for name in applied:  # the models with their adapters applied: bit for bit
        theirs, ours = checkpoints.load(tmp_path / "cache" / name), checkpoints.load(tmp_path / "applied" / name)
        assert sorted(theirs) == sorted(ours)
        for tensor in theirs:
            np.testing.assert_array_equal(np.asarray(ours[tensor]), np.asarray(theirs[tensor]), err_msg=tensor)
    theirs, ours = checkpoints.load(tmp_path / "mergekit"), checkpoints.load(tmp_path / "jaxmerge")
    if dtype == "bfloat16":
        assert _bits_apart(theirs, ours).max() == 0
    for tensor in theirs:
        np.testing.assert_allclose(np.asarray(ours[tensor], np.float32), np.asarray(theirs[tensor], np.float32),
                                   rtol=1e-5, atol=1e-5, err_msg=tensor)


@pytest.mark.parametrize("name", ["union", "base", "tokens"])
def test_the_same_vocabulary_and_rows_as_mergekit(models, tmp_path, name):
    """Token by token: mergekit numbers new tokens in its hash order, so ids may differ."""
    root = models[0]
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_tokenizer_configs(root)[name], sort_keys=False))
    subprocess.run([MERGEKIT, str(config), str(tmp_path / "mergekit")], check=False, capture_output=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert (tmp_path / "mergekit" / "model.safetensors").exists(), "mergekit wrote no model"
    assert main(["merge", str(config), str(tmp_path / "jaxmerge"), "--no-progress"]) == 0
    vocabs = [_vocab(json.loads((tmp_path / tool / "tokenizer.json").read_text())) for tool in ("mergekit", "jaxmerge")]
    assert set(vocabs[0]) == set(vocabs[1])
    theirs, ours = checkpoints.load(tmp_path / "mergekit"), checkpoints.load(tmp_path / "jaxmerge")
    for tensor in theirs:
        a, b = np.asarray(theirs[tensor]), np.asarray(ours[tensor])
        if tensor in ("model.embed_tokens.weight", "lm_head.weight"):
            order = list(vocabs[0])
            padding = list(range(len(order), a.shape[0]))
            a = np.concatenate([a[[vocabs[0][t] for t in order]], a[padding]])
            b = np.concatenate([b[[vocabs[1][t] for t in order]], b[padding]])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=tensor)
    sizes = [json.loads((tmp_path / tool / "config.json").read_text())["vocab_size"] for tool in ("mergekit", "jaxmerge")]
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("options", [["--max-rank", "4"], ["--max-rank", "16", "--sv-epsilon", "0.05", "--embed-lora"]])
def test_the_same_adapter_as_mergekit_extract_lora(root, tmp_path, options):
    """Factors agree up to the signs of singular pairs (LAPACK's choice): compared as ``B @ A``."""
    from jaxmerge import lora

    extract = os.path.join(os.path.dirname(MERGEKIT), "mergekit-extract-lora")
    inputs = ["--model", str(root / "m0"), "--base-model", str(root / "base")]
    subprocess.run([extract, *inputs, "--out-path", str(tmp_path / "mergekit"), *options], check=False,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert main(["extract-lora", *inputs, "--out-path", str(tmp_path / "jaxmerge"), *options]) == 0
    theirs, ours = lora.load_adapter(tmp_path / "mergekit"), lora.load_adapter(tmp_path / "jaxmerge")
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert ours.config[field] == theirs.config[field], field
    assert sorted(ours.config["modules_to_save"] or []) == sorted(theirs.config["modules_to_save"] or [])
    assert sorted(ours.layers) == sorted(theirs.layers) and sorted(ours.extras) == sorted(theirs.extras)
    for module in theirs.layers:
        expected = np.asarray(theirs.delta(module))
        np.testing.assert_allclose(np.asarray(ours.delta(module)), expected, atol=1e-5 * np.abs(expected).max())
