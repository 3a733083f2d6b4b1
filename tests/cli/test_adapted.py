"""Models named with a LoRA adapter in merge configs (``model+adapter``), applied first as
mergekit applies them."""

import binascii
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxmerge import checkpoints, lora
from jaxmerge.cli.main import main
from tests.checkpoints.hf import llama_tensors, write_model

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "torch_dtype": "bfloat16"}


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs name models by relative paths
    base = llama_tensors(0, dtype=jnp.bfloat16)
    write_model(tmp_path / "base", base, config=CONFIG)
    write_model(tmp_path / "tune", llama_tensors(1, dtype=jnp.bfloat16, scale=0.05, around=base), config=CONFIG)
    rng = np.random.default_rng(2)

    def factors(rows, cols):
        return lora.LoraLayer(jnp.asarray(rng.normal(size=(4, cols)), jnp.float32),
                              jnp.asarray(rng.normal(size=(rows, 4)), jnp.float32))
    layers = {"model.layers.0.self_attn.q_proj": factors(16, 16), "model.embed_tokens": factors(16, 40)}
    adapter = lora.Adapter(layers, lora.lora_config(4, 8, ["q_proj", "embed_tokens"]), frozenset({"model.embed_tokens"}))
    lora.save_adapter(tmp_path / "adapter", adapter)
    return tmp_path


def _merge(root, name: str, models: list, *options) -> int:
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "base", "models": models}))
    return main(["merge", str(config), str(root / name), "--no-progress", *map(str, options)])


def test_a_model_with_an_adapter_is_merged_as_that_model_with_the_adapter_applied(root):
    assert _merge(root, "out", [{"model": "tune+adapter", "parameters": {"weight": 0.5}},
                                {"model": {"model": "base", "lora": {"path": "adapter"}},
                                 "parameters": {"weight": 0.3}}]) == 0
    for model in ("tune", "base"):
        lora.apply_adapter(root / model, root / "adapter", root / f"{model}-applied",
                           options=checkpoints.StreamOptions(progress=False))
    assert _merge(root, "expected", [{"model": "tune-applied", "parameters": {"weight": 0.5}},
                                     {"model": "base-applied", "parameters": {"weight": 0.3}}]) == 0
    ours, expected = checkpoints.load(root / "out"), checkpoints.load(root / "expected")
    assert sorted(ours) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(value), err_msg=name)
    assert not any(".jaxmerge-tmp" in p.name for p in root.iterdir())  # the applied models are gone


def test_the_lora_merge_cache_is_named_as_mergekits_read_in_the_dtype_asked_for_and_reused(root, capsys):
    applied = f"tune_{binascii.crc32(b'tune')}_adapter_{binascii.crc32(b'adapter')}"
    models = [{"model": "tune+adapter", "parameters": {"weight": 0.5}}]
    assert _merge(root, "out", models, "--lora-merge-cache", root / "cache") == 0
    assert checkpoints.load(root / "cache" / applied)["model.norm.weight"].dtype == jnp.bfloat16
    assert _merge(root, "wide", models, "--lora-merge-cache", root / "cache32", "--lora-merge-dtype", "float32") == 0
    assert checkpoints.load(root / "cache32" / applied)["model.norm.weight"].dtype == jnp.float32
    assert json.loads((root / "cache32" / applied / "config.json").read_text()) == {**CONFIG, "torch_dtype": "float32"}
    stored = (root / "cache" / applied / "model.safetensors").stat().st_ino
    assert _merge(root, "again", models, "--lora-merge-cache", root / "cache") == 0
    assert (root / "cache" / applied / "model.safetensors").stat().st_ino == stored
    assert "--lora-merge" not in capsys.readouterr().err  # they act: not noted as changing nothing
    assert _merge(root, "asked", models, "--lora-merge-cache", root / "cache", "--lora-merge-dtype", "fp32") == 0
    assert "read in bfloat16, not float32: reused as it is" in capsys.readouterr().err
    assert "- `tune+adapter`" in (root / "again" / "README.md").read_text()  # the card names the reference


def test_nothing_is_applied_for_an_output_that_would_be_refused(root, capsys):
    models = [{"model": "tune+adapter", "parameters": {"weight": 0.5}}]
    (root / "out").mkdir()
    (root / "out" / "kept").write_text("")
    assert _merge(root, "out", models, "--lora-merge-cache", root / "cache") == 2
    assert "exists and is not empty" in capsys.readouterr().err and not (root / "cache").exists()
    assert _merge(root, "other", models, "--lora-merge-cache", root / "other" / "cache") == 2
    assert "would overlap" in capsys.readouterr().err and not (root / "other").exists()


@pytest.mark.parametrize("first, config, expected", [(jnp.float32, "bfloat16", jnp.float32),
                                                     (jnp.bfloat16, "float32", jnp.bfloat16)])
def test_a_model_is_read_in_its_first_float_tensors_dtype_whatever_its_config_says(root, first, config, expected):
    """As transformers loads a model for mergekit (``torch_dtype=None`` drops the config's
    dtype): the first float tensor's dtype, by name, for every tensor."""
    tensors = {k: v.astype(jnp.float32 if first == jnp.bfloat16 else jnp.bfloat16)
               for k, v in checkpoints.load(root / "tune").items()}
    tensors["lm_head.weight"] = tensors["lm_head.weight"].astype(first)  # the first by name
    write_model(root / "mixed", tensors, config={**CONFIG, "torch_dtype": config})
    assert _merge(root, "out", [{"model": "mixed+adapter", "parameters": {"weight": 1.0}}], "--lora-merge-cache",
                  root / "cache") == 0
    (applied,) = (root / "cache").iterdir()
    assert {v.dtype for v in checkpoints.load(applied).values()} == {jnp.dtype(expected)}


@pytest.mark.parametrize("model, message", [
    ("tune+adapter+base", r"neither a model nor model\+adapter"),
    ("tune+nowhere", r"models\[0\] \(its adapter\): path 'nowhere' does not exist"),
    ({"model": "tune", "adapter": "adapter"}, "takes model and lora, not 'adapter'")])
def test_bad_model_references_are_refused_by_name(root, capsys, model, message):
    assert _merge(root, "out", [{"model": model}]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_extract_lora_takes_models_named_with_an_adapter(root, capsys):
    """An adapter extracted from ``tune+adapter`` is the one extracted from the applied model."""
    lora.apply_adapter(root / "tune", root / "adapter", root / "applied", options=checkpoints.StreamOptions(progress=False))
    for model, out in (("tune+adapter", "from-reference"), ("applied", "from-applied")):
        assert main(["extract-lora", "--model", model, "--base-model", "base", "--out-path", out, "--max-rank", "4",
                     "--quiet"]) == 0
    assert "%" not in capsys.readouterr().err  # --quiet: no progress bar while the adapter is applied
    ours, expected = lora.load_adapter(root / "from-reference"), lora.load_adapter(root / "from-applied")
    assert sorted(ours.layers) == sorted(expected.layers)
    for module in expected.layers:
        np.testing.assert_array_equal(np.asarray(ours.delta(module)), np.asarray(expected.delta(module)), err_msg=module)
    assert not any(".jaxmerge-tmp" in p.name for p in root.iterdir())
    assert ours.config["base_model_name_or_path"] == "base"  # the model, as mergekit writes it
