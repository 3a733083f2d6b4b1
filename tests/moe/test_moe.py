"""jaxmerge moe: the written mixture against its sources, routers against NumPy references
written from mergekit-moe's rules, the forward pass against a NumPy one, and the refusals."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer

import jaxmerge
from jaxmerge import checkpoints
from jaxmerge.cli.main import main
from jaxmerge.errors import JaxmergeError
from jaxmerge.moe import ExpertScaling, merge_experts, moe_from_dense
from jaxmerge.moe.transformer import hidden_states, logits, random_params
from tests.cli.test_tokenizer import CHARS, WORDS, _model, _tokenizer
from tests.moe.reference import layer_inputs

LAYERS, HIDDEN = 2, 16
PROMPTS = [(["ab cd", "ef"], ["gh"]), (["bead face"], ["cab"]), (["fed", "dab"], [])]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A Llama base and three experts fine-tuned from it, with a BPE tokenizer over a-h."""
    root = tmp_path_factory.mktemp("moe")
    base = _model(root / "base", 0, _tokenizer(CHARS, WORDS), 19)
    experts = [_model(root / f"e{i}", i + 1, _tokenizer(CHARS, WORDS), 19, base_tensors=base) for i in range(3)]
    return root, base, experts


def _build(root, tmp_path, seed=0, name="out", **config):
    entries = [{"source_model": str(root / f"e{i}"), "positive_prompts": p, "negative_prompts": n}
               for i, (p, n) in enumerate(PROMPTS)]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(root / "base"), "experts": entries, **config}))
    assert main(["moe", str(path), str(tmp_path / name), "--quiet", "--random-seed", str(seed), "--lazy-unpickle"]) == 0
    return checkpoints.load(tmp_path / name), json.loads((tmp_path / name / "config.json").read_text())


def test_mixtral_holds_every_expert_and_the_base_and_reproducible_random_routers(models, tmp_path):
    root, base, experts = models
    moe, config = _build(root, tmp_path, seed=3, gate_mode="random")
    for i in range(LAYERS):
        mlp = f"model.layers.{i}.mlp."
        for e, expert in enumerate(experts):
            np.testing.assert_array_equal(moe[mlp + "experts.gate_up_proj"][e], np.concatenate(
                [expert[mlp + "gate_proj.weight"], expert[mlp + "up_proj.weight"]]))
            np.testing.assert_array_equal(moe[mlp + "experts.down_proj"][e], expert[mlp + "down_proj.weight"])
        assert moe[mlp + "gate.weight"].shape == (3, HIDDEN)
    dense = {name for name in base if ".mlp." not in name}
    assert set(moe) == dense | {f"model.layers.{i}.mlp.{n}" for i in range(LAYERS)
                                for n in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")}
    for name in dense:
        np.testing.assert_array_equal(moe[name], base[name])
    assert (config["model_type"], config["architectures"], config["num_local_experts"], config["num_experts_per_tok"],
            config["sliding_window"], config["head_dim"]) == ("mixtral", ["MixtralForCausalLM"], 3, 2, None, 8)
    again, _ = _build(root, tmp_path, seed=3, name="again", gate_mode="random")
    other, _ = _build(root, tmp_path, seed=4, name="other", gate_mode="random")
    router = "model.layers.1.mlp.gate.weight"
    np.testing.assert_array_equal(again[router], moe[router])
    assert not np.allclose(other[router], moe[router])
    assert (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "mergekit_moe_config.yml").exists()


def _token_ids(root, prompts):
    tokenizer = Tokenizer.from_file(str(root / "base" / "tokenizer.json"))
    return [tokenizer.encode("<s>" + p, add_special_tokens=False).ids for p in prompts]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_cheap_embed_routers_are_normalised_prompt_embeddings(models, tmp_path):
    root, base, _ = models
    moe, config = _build(root, tmp_path, gate_mode="cheap_embed", dtype="float32")
    table = np.asarray(base["model.embed_tokens.weight"], np.float64)

    def embed(prompts):
        return _unit(sum(table[ids].sum(0) for ids in _token_ids(root, prompts)))
    expected = np.stack([_unit(embed(p) - (embed(n) if n else 0)) for p, n in PROMPTS])
    for i in range(LAYERS):
        np.testing.assert_allclose(moe[f"model.layers.{i}.mlp.gate.weight"], expected, rtol=1e-5, atol=1e-6)
    assert config["dtype"] == "float32"


def test_hidden_routers_are_each_layers_input_at_the_last_token_of_a_numpy_forward_pass(models, tmp_path):
    root, base, _ = models
    moe, _ = _build(root, tmp_path, gate_mode="hidden", dtype="float32")
    config = json.loads((root / "base" / "config.json").read_text())

    def represent(prompts):  # each prompt alone: left padding must not change its last token's states
        return np.mean([layer_inputs(base, config, np.asarray([ids]), np.ones((1, len(ids))))[0][:, 0, -1]
                        for ids in _token_ids(root, prompts)], axis=0)
    expected = np.stack([_unit(represent(p) - (represent(n) if n else 0)) for p, n in PROMPTS], axis=1)
    for i in range(LAYERS):
        np.testing.assert_allclose(moe[f"model.layers.{i}.mlp.gate.weight"], expected[i], rtol=1e-4, atol=1e-5)


def test_perplexity_routers_are_the_hidden_rows_of_the_texts_each_expert_models_best(models, tmp_path):
    root, base, experts = models
    texts = ["ab", "fed cab", "hg", "dead beef", "cafe"]
    moe, _ = _build(root, tmp_path, gate_mode="perplexity", dtype="float32", routing_texts=texts)
    config = json.loads((root / "base" / "config.json").read_text())
    texts = list(dict.fromkeys(texts + [t for positive, _ in PROMPTS for t in positive]))

    def loss(params, ids):  # mean negative log-likelihood of the tokens after the first (NumPy, float64)
        final = layer_inputs(params, config, np.asarray([ids]), np.ones((1, len(ids))))[1][0]
        logit = final @ np.asarray(params["lm_head.weight"], np.float64).T
        logit = logit - logit.max(-1, keepdims=True)
        log_p = logit - np.log(np.exp(logit).sum(-1, keepdims=True))
        return -np.mean(log_p[np.arange(len(ids) - 1), ids[1:]])

    ids = _token_ids(root, texts)
    best = np.argmin([[loss(e, i) for i in ids] for e in experts], axis=0)
    assert len(set(best.tolist())) > 1  # the texts are split between experts

    def represent(prompts):
        return np.mean([layer_inputs(base, config, np.asarray([i]), np.ones((1, len(i))))[0][:, 0, -1]
                        for i in _token_ids(root, prompts)], axis=0)
    won = [[t for t, b in zip(texts, best) if b == e] or PROMPTS[e][0] for e in range(len(experts))]
    expected = np.stack([_unit(represent(w)) for w in won], axis=1)
    for i in range(LAYERS):
        np.testing.assert_allclose(moe[f"model.layers.{i}.mlp.gate.weight"], expected[i], rtol=1e-4, atol=1e-5)


def test_a_null_head_dim_is_written_as_transformers_fills_it():
    from jaxmerge.moe.layouts import LAYOUTS

    source = {"model_type": "mistral", "hidden_size": 16, "num_attention_heads": 2, "head_dim": None,
              "intermediate_size": 24, "num_hidden_layers": 2, "vocab_size": 40}
    assert LAYOUTS[0].config(source, 3, 2, None)["head_dim"] == 8


@pytest.mark.parametrize("files,bos", [
    ({"tokenizer_config.json": {"bos_token": "<s>"}}, "<s>"),
    ({"tokenizer_config.json": {}, "special_tokens_map.json": {"bos_token": {"content": "<s>"}}}, "<s>"),
    ({"tokenizer_config.json": {"tokenizer_class": "LlamaTokenizerFast"}}, "<s>"),
    ({"tokenizer_config.json": {"tokenizer_class": "LlamaTokenizerFast", "bos_token": None}}, None),
    ({"tokenizer_config.json": {"tokenizer_class": "GemmaTokenizer"}}, None),  # "<bos>": not in the vocabulary
])
def test_prompts_start_with_the_bos_token_transformers_finds(tmp_path, files, bos):
    from tokenizers import models, pre_tokenizers

    from jaxmerge.moe.routers import PromptTokenizer

    words = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "a": 2}, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.add_special_tokens(["<s>"])
    words.save(str(tmp_path / "tokenizer.json"))
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    ids, _ = PromptTokenizer(tmp_path)(["a"])
    assert ids.tolist() == ([[1, 2]] if bos else [[2]])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_forward_pass_equals_a_numpy_one(kind):
    config = {"model_type": kind, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 11, "head_dim": 4, "rope_theta": 500.0}
    params = random_params(config, jax.random.key(1), scale=0.3)
    if kind == "llama":  # with mlp_bias
        sizes = {"gate": 24, "up": 24, "down": 16}
        params.update({f"model.layers.{i}.mlp.{n}_proj.bias": 0.3 * jax.random.normal(jax.random.key(7 + i), (size,))
                       for i in range(2) for n, size in sizes.items()})
    ids, mask = jnp.asarray([[3, 3, 1, 7, 2], [4, 5, 6, 7, 8]]), jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    inputs, final = hidden_states(params, config, ids, mask)
    ref_inputs, ref_final = layer_inputs(params, config, ids, mask)  # padded positions too (hidden_avg reads them)
    np.testing.assert_allclose(np.asarray(inputs), ref_inputs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final), ref_final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout,kind", [("mixtral", "llama"), ("qwen3_moe", "qwen3"), ("qwen2_moe", "qwen2")])
def test_a_mixture_of_identical_experts_computes_the_dense_model(layout, kind):
    config = {"model_type": kind, "hidden_size": 8, "intermediate_size": 12, "num_attention_heads": 2,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 9, "head_dim": 4}
    dense = random_params(config, jax.random.key(0), scale=0.4)
    routers = jax.random.normal(jax.random.key(1), (2, 3, 8))
    silent = {**dense, **{f"model.layers.{i}.mlp.down_proj.weight": jnp.zeros((8, 12)) for i in range(2)}}
    shared = {"shared": silent, "shared_routers": jnp.ones((2, 1, 8))} if layout == "qwen2_moe" else {}
    tensors, moe_config = moe_from_dense(dense, [dense] * 3, routers, config=config, layout=layout,
                                         experts_per_token=1, **shared)
    ids = jnp.asarray([[1, 2, 3, 4, 5, 6]])
    np.testing.assert_allclose(logits(tensors, moe_config, ids), logits(dense, config, ids), rtol=1e-5, atol=1e-5)
    different = moe_from_dense(dense, [dense, random_params(config, jax.random.key(5)), dense], routers, config=config,
                               layout=layout, **shared)[0]
    assert not np.allclose(logits(different, moe_config, ids), logits(dense, config, ids), atol=1e-3)


def test_qwen_moe_from_llama_adds_zero_biases_and_a_scaled_shared_expert(models, tmp_path):
    root, _, experts = models
    shared = [{"source_model": str(root / "e2"), "residual_scale": 0.5}]
    moe, config = _build(root, tmp_path, gate_mode="random", architecture="qwen", shared_experts=shared)
    assert config["model_type"] == "qwen2_moe" and config["num_experts"] == 3 and config["qkv_bias"] is True
    for i in range(LAYERS):
        for p in "qkv":
            np.testing.assert_array_equal(moe[f"model.layers.{i}.self_attn.{p}_proj.bias"], np.zeros(HIDDEN))
        mlp = f"model.layers.{i}.mlp."
        np.testing.assert_array_equal(moe[mlp + "experts.1.up_proj.weight"], experts[1][mlp + "up_proj.weight"])
        np.testing.assert_allclose(moe[mlp + "shared_expert.down_proj.weight"],
                                   0.5 * np.asarray(experts[2][mlp + "down_proj.weight"]), rtol=1e-6)
        assert moe[mlp + "shared_expert_gate.weight"].shape == (1, HIDDEN)


def test_non_expert_merge_merges_each_shared_tensor_with_the_method(models, tmp_path):
    root, base, experts = models
    merge = {"method": "ties", "parameters": {"density": 0.5, "weight": 0.7}}
    moe, _ = _build(root, tmp_path, gate_mode="random", non_expert_merge=merge)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        expected = jaxmerge.ties(base[name], [e[name] for e in experts], [0.7] * 3, density=0.5)
        np.testing.assert_allclose(moe[name], expected, rtol=1e-6)
        assert not np.allclose(moe[name], base[name])


def test_expert_noise_is_reproducible_and_of_the_given_scale(models):
    _, base, experts = models
    config = {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2,
              "intermediate_size": 24}
    noisy = [ExpertScaling(noise_scale=0.01)] * 3
    build = lambda key: moe_from_dense(base, experts, jnp.zeros((2, 3, 16)), config=config, scalings=noisy,
                                       key=key)[0]["model.layers.0.mlp.experts.down_proj"]
    first, again, other = build(jax.random.key(0)), build(jax.random.key(0)), build(jax.random.key(1))
    np.testing.assert_array_equal(first, again)
    noise = np.asarray(first[1]) - np.asarray(experts[1]["model.layers.0.mlp.down_proj.weight"])
    assert 0.008 < noise.std() < 0.012 and not np.array_equal(first, other)


def test_merging_experts_averages_groups_and_their_router_rows():
    rng = np.random.default_rng(0)
    moe = {"model.layers.0.mlp.experts.gate_up_proj": jnp.asarray(rng.standard_normal((4, 6, 2)), jnp.float32),
           "model.layers.0.mlp.gate.weight": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
           "model.norm.weight": jnp.ones(2)}
    merged, config = merge_experts(moe, {"model_type": "qwen3_moe", "num_local_experts": 4, "num_experts_per_tok": 4},
                                   [[0, 3], [1], [2]])
    stacked = np.asarray(moe["model.layers.0.mlp.experts.gate_up_proj"])
    np.testing.assert_allclose(merged["model.layers.0.mlp.experts.gate_up_proj"],
                               [(stacked[0] + stacked[3]) / 2, stacked[1], stacked[2]], rtol=1e-6)
    router = np.asarray(moe["model.layers.0.mlp.gate.weight"])
    np.testing.assert_allclose(merged["model.layers.0.mlp.gate.weight"][0], (router[0] + router[3]) / 2, rtol=1e-6)
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 3
    per_expert = {f"model.layers.0.mlp.experts.{e}.up_proj.weight": jnp.full((2, 2), float(e)) for e in range(3)}
    merged, _ = merge_experts(per_expert, {"model_type": "qwen2_moe", "num_experts": 3}, [[1, 2], [0]])
    assert sorted(merged) == [f"model.layers.0.mlp.experts.{k}.up_proj.weight" for k in range(2)]
    assert float(merged["model.layers.0.mlp.experts.0.up_proj.weight"][0, 0]) == 1.5
    with pytest.raises(JaxmergeError, match="must split the experts 0..2"):
        merge_experts(per_expert, {"model_type": "qwen2_moe", "num_experts": 3}, [[0, 1]])


@pytest.mark.parametrize("change,message", [
    ({"experts_per_token": 4}, "3 experts, fewer than experts_per_token"),
    ({"gate_mode": "sideways"}, "gate_mode must be one of"),
    ({"colour": 1}, "unknown key 'colour'"),
    ({"experts": [{"source_model": "e0"}, {"source_model": "e1"}]}, r"experts\[0\] has no positive_prompts"),
    ({"experts": [{"source_model": "e0", "positive_prompts": ["ab"]}, {"source_model": "e1", "positive_prompts": ["ab"]}]},
     "every expert has the same prompts"),
    ({"experts": [{"source_model": "e0", "positive_prompts": ["ab"]}, {"source_model": "e0", "positive_prompts": ["c"]}]},
     "every expert is the same model"),
    ({"experts": [{"source_model": "e9"}], "gate_mode": "random"}, r"experts\[0\].source_model: path 'e9' does not"),
    ({"architecture": "qwen3", "gate_mode": "random"}, "Qwen3 MoE takes qwen3 models, got 'llama'"),
    ({"shared_experts": [{"source_model": "e2"}]}, "mergekit-moe writes these models as DeepSeek MoE"),
    ({"shared_experts": [{"source_model": "e2", "negative_prompts": ["ab"]}]},  # Qwen MoE's rule, not DeepSeek's
     "Qwen MoE routes to its shared expert by prompts"),
    ({"non_expert_merge": {"method": "ties", "parameters": {"colour": 1}}}, "ties has no parameter 'colour'"),
    ({"routing_texts": ["ab"]}, "routing_texts are read by gate_mode perplexity only"),
    ({"routing_texts": "ab", "gate_mode": "perplexity"}, "routing_texts must be a list of non-empty strings"),
])
def test_bad_configs_are_refused_in_one_line_and_write_nothing(models, tmp_path, capsys, change, message):
    root, _, _ = models
    config = {"base_model": "base", "experts": [{"source_model": f"e{i}", "positive_prompts": p}
                                                for i, (p, _) in enumerate(PROMPTS)], **change}
    path = root / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["moe", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_an_output_holding_an_input_is_refused(models, tmp_path, capsys):
    root, base, _ = models
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(root / "base"), "gate_mode": "random",
                                    "experts": [{"source_model": str(root / f"e{i}")} for i in range(2)]}))
    assert main(["moe", str(path), str(root / "base"), "--force", "--no-progress"]) == 2
    assert "base" in capsys.readouterr().err
    np.testing.assert_array_equal(checkpoints.load(root / "base")["model.norm.weight"], base["model.norm.weight"])
