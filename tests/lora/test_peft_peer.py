"""PEFT itself against jaxmerge.lora, when a Python with PEFT, transformers and torch is given in
``$PEFT_PYTHON`` (they are not test dependencies). Adapters made by PEFT on a small Llama are
merged by both: factor-level and ``cat`` types agree bit for bit, ``*svd`` types in ``B @ A``
(the singular vectors' signs are LAPACK's choice); DARE's draws differ by design."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from jaxmerge import lora

PEFT_PYTHON = os.environ.get("PEFT_PYTHON")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PEFT_PYTHON is None, reason="$PEFT_PYTHON is not set")]

SCRIPT = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

root, spec = sys.argv[1], json.loads(sys.argv[2])
config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1)
for i, adapter in enumerate(spec["adapters"]):
    torch.manual_seed(i)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(**adapter))
    for name, p in model.named_parameters():
        if "lora" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(f"{root}/a{i}")
model = PeftModel.from_pretrained(LlamaForCausalLM(config), f"{root}/a0", adapter_name="a0")
names = [f"a{i}" for i in range(len(spec["adapters"]))]
for name in names[1:]:
    model.load_adapter(f"{root}/{name}", adapter_name=name)
for j, merge in enumerate(spec["merges"]):
    model.add_weighted_adapter(names, merge.pop("weights"), f"m{j}", **merge)
    model.save_pretrained(f"{root}/out", selected_adapters=[f"m{j}"])
"""
ADAPTERS = [{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
            {"r": 4, "lora_alpha": 2, "target_modules": ["q_proj", "k_proj"]},
            {"r": 4, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "down_proj"]}]
WEIGHTS = [0.7, -0.4, 1.3]
MERGES = [{"combination_type": "linear"}, {"combination_type": "cat"},
          {"combination_type": "ties", "density": 0.5},
          {"combination_type": "ties", "density": 0.3, "majority_sign_method": "frequency"},
          {"combination_type": "magnitude_prune", "density": 0.6},
          {"combination_type": "svd"}, {"combination_type": "svd", "svd_rank": 6},
          {"combination_type": "ties_svd", "density": 0.5},
          {"combination_type": "magnitude_prune_svd", "density": 0.5, "svd_rank": 2},
          {"combination_type": "dare_linear", "density": 0.5}, {"combination_type": "dare_ties_svd", "density": 0.5}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    spec = {"adapters": ADAPTERS, "merges": [{"weights": WEIGHTS, **m} for m in MERGES]}
    subprocess.run([PEFT_PYTHON, "-c", SCRIPT, str(root), json.dumps(spec)], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return root


@pytest.mark.parametrize("j", range(len(MERGES)))
def test_add_weighted_adapter_matches_peft(root, j):
    merge = MERGES[j]
    adapters = [lora.load_adapter(root / f"a{i}") for i in range(len(ADAPTERS))]
    ours = lora.add_weighted_adapter(adapters, WEIGHTS, key=jax.random.key(0), **merge)
    peft = lora.load_adapter(root / "out" / f"m{j}")
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out"):
        assert ours.config[field] == peft.config[field], field
    assert sorted(ours.config["target_modules"]) == sorted(peft.config["target_modules"])
    assert sorted(ours.layers) == sorted(peft.layers) and sorted(ours.extras) == sorted(peft.extras)
    kind = merge["combination_type"]
    for module, theirs in peft.layers.items():
        mine = ours.layers[module]
        assert mine.a.shape == theirs.a.shape and mine.b.shape == theirs.b.shape
        if kind.startswith("dare"):
            continue
        if kind.endswith("svd"):
            expected = np.asarray(peft.delta(module))
            np.testing.assert_allclose(np.asarray(ours.delta(module)), expected, atol=1e-5 * np.abs(expected).max())
        else:
            np.testing.assert_array_equal(np.asarray(mine.a), np.asarray(theirs.a))
            np.testing.assert_array_equal(np.asarray(mine.b), np.asarray(theirs.b))


MERGE_SCRIPT = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

root, name = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if name == "gpt2":  # Conv1D layers (square and not) and a Linear head in one adapter
    model = GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=48, n_positions=32,
                                                     num_labels=3, pad_token_id=0))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "score"])
else:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True))
    config = (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all") if name == "bias"
              else LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    if name.startswith("tied"):  # a LoRA head shares the tied weight; a module trained in full unties them
        model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
        config = (LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"])
                  if name == "tied" else LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                    modules_to_save=["embed_tokens"], ensure_weight_tying=True)
                  if name == "tied_kept" else LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                                         modules_to_save=["embed_tokens"]))
    if name == "rank":  # torch sums more than 192 rank terms in blocks: two halves, then blocks of 192
        config = LoraConfig(r=385, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "down_proj"])
    if name == "bfloat16":  # PEFT upcasts the factors; it rounds an embedding's update to bfloat16 before adding it
        model = model.to(torch.bfloat16)
        config = LoraConfig(r=8, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "down_proj", "lm_head"])
def shared(state):  # a tied head, which save_pretrained leaves out
    return {k: v.clone().contiguous() for k, v in state.items()
            if not (k == "lm_head.weight" and v.data_ptr() == state["model.embed_tokens.weight"].data_ptr())}
save_file(shared(model.state_dict()), f"{root}/base.safetensors")
model = get_peft_model(model, config)
for key, p in model.named_parameters():
    if "lora" in key or (name == "bias" and key.endswith("bias")):
        torch.nn.init.normal_(p, std=0.5)
if name == "embedding":  # rows that differ from the base, as after resize_token_embeddings
    model.base_model.model.model.embed_tokens.base_layer.weight.data[40:] = 1.0
model.save_pretrained(f"{root}/adapter", save_embedding_layers=name == "embedding")
save_file(shared(model.merge_and_unload().state_dict()), f"{root}/merged.safetensors")
"""


@pytest.mark.parametrize("name", ["bias", "embedding", "gpt2", "bfloat16", "rank", "tied", "tied_trained",
                                  "tied_kept"])
def test_merge_adapter_is_merge_and_unload_bit_for_bit(tmp_path, name):
    """Trained biases (``bias="all"``, saved with the base layers' names), a saved embedding
    with rows of its own, GPT-2's ``Conv1D`` layers next to a ``Linear`` head, a bfloat16
    model with an adapted embedding and head, rank 385 (torch sums more than 192 rank terms
    in blocks, each block's sum added to the total), and tied embeddings: a LoRA head updates
    the shared weight, an embedding trained in full unties them (unless trained with
    ``ensure_weight_tying``). Bit for bit where torch sums ``B @ A`` over
    the rank by fused multiply-adds, as it does for these Llama layers; it sums GPT-2's
    three-row ``score`` update without them, which a last bit shows."""
    subprocess.run([PEFT_PYTHON, "-c", MERGE_SCRIPT, str(tmp_path), name], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    from safetensors.numpy import load_file

    base, expected = load_file(tmp_path / "base.safetensors"), load_file(tmp_path / "merged.safetensors")
    merged = lora.merge_adapter(base, lora.load_adapter(tmp_path / "adapter"), model_type="gpt2" if name == "gpt2" else None)
    assert sorted(merged) == sorted(expected)
    for key, value in expected.items():
        tolerance = 1e-6 if key == "score.weight" else 0
        np.testing.assert_allclose(np.asarray(merged[key]), value, rtol=tolerance, atol=tolerance, err_msg=key)
