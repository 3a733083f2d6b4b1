"""Merged vocabularies (``tokenizer_source``, ``tokenizer``) and chat templates in ``jaxmerge merge``,
checked against a NumPy reference written from mergekit 0.1.5's rules, token by token."""

import json

import jinja2.sandbox
import numpy as np
import pytest
import yaml

from jaxmerge import checkpoints
from jaxmerge.cli.chat_templates import TEMPLATES
from jaxmerge.cli.main import main
from jaxmerge.cli.tokenizer import add_token
from tests.checkpoints.hf import llama_tensors, write_model

SPECIAL = ["<unk>", "<s>", "</s>"]
CHARS = list("abcdefgh")
WORDS = ["ab", "cd", "ef"]
PLAIN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _tokenizer(order, words, added=(), special_added=()):
    """A BPE tokenizer.json: special tokens, characters in ``order``, ``words`` (merged from two
    characters), then ``special_added`` and ``added`` tokens after the model's vocabulary."""
    tokens = SPECIAL + order + words
    entries = [{"id": i, "content": t, **PLAIN, "normalized": False, "special": True} for i, t in enumerate(SPECIAL)]
    for content, special in [(t, True) for t in special_added] + [(t, False) for t in added]:
        entries.append({"id": len(tokens) + len(entries) - len(SPECIAL), "content": content, **PLAIN,
                        "normalized": not special, "special": special})
    return {"version": "1.0", "added_tokens": entries, "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
            "model": {"type": "BPE", "unk_token": "<unk>", "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": [f"{w[0]} {w[1]}" for w in words]}}


def _vocab(tokenizer):
    return {**tokenizer["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer["added_tokens"]}}


def _model(path, seed, tokenizer, rows, base_tensors=None):
    tensors = {k: np.asarray(v) for k, v in llama_tensors(seed, vocab=rows, scale=0.1 if base_tensors else 1.0).items()}
    if base_tensors is not None:
        tensors = {k: (v if k in VOCAB_TENSORS else base_tensors[k] + v) for k, v in tensors.items()}
    write_model(path, tensors, config={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
                                       "intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 2,
                                       "num_hidden_layers": 2, "vocab_size": rows, "tie_word_embeddings": False})
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "bos_token": "<s>", "chat_template": f"model {seed}"}))
    return tensors


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base: 14 tokens in 19 rows (five unused); m0: two more tokens and a special one; m1: the
    characters reversed, no 'ab', a 'gh' and an added 'hello'."""
    root = tmp_path_factory.mktemp("vocab")
    tokenizers = {"base": _tokenizer(CHARS, WORDS),
                  "m0": _tokenizer(CHARS, WORDS + ["gh", "bc"], special_added=["<|im|>"]),
                  "m1": _tokenizer(CHARS[::-1], ["cd", "ef", "gh"], added=["hello"])}
    rows = {"base": 19, "m0": 20, "m1": 19}
    base = _model(root / "base", 0, tokenizers["base"], rows["base"])
    tensors = {"base": base, "m0": _model(root / "m0", 1, tokenizers["m0"], rows["m0"], base),
               "m1": _model(root / "m1", 2, tokenizers["m1"], rows["m1"], base)}
    return root, tokenizers, tensors


def _merge(tmp_path, config):
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0
    out = tmp_path / "out"
    return out, json.loads((out / "tokenizer.json").read_text()), checkpoints.load(out)


def _reference_rows(tensor, order, tokenizers, vocab, base=None, configured=None, rows=None):
    """Each model's row of every output token, by mergekit's rules, written token by token."""
    configured = configured or {}
    own = {m: {t: i for t, i in _vocab(tokenizers[m]).items() if i < tensor[m].shape[0]} for m in order}
    result = {m: np.zeros((rows or len(vocab), tensor[m].shape[1]), np.float32) for m in order}
    for token, i in vocab.items():
        having = [m for m in order if token in own[m]]
        source, force = configured.get(token, (None, False))
        if source == "zero":
            default = np.zeros(tensor[order[0]].shape[1], np.float32)
        elif isinstance(source, tuple):  # (model, token id in its own vocabulary)
            default = tensor[source[0]][source[1]]
        elif source is not None:
            default = tensor[source][own[source][token]]
        elif len(having) == 1:
            default = tensor[having[0]][own[having[0]][token]]
        elif not having:
            default = np.zeros(tensor[order[0]].shape[1], np.float32)
        elif base in having:
            default = tensor[base][own[base][token]]
        else:
            default = sum(tensor[m][own[m][token]] for m in having) / len(having)
        for m in order:
            result[m][i] = tensor[m][own[m][token]] if token in own[m] and not force else default
    for m in order:
        result[m][len(vocab):] = result[m][:len(vocab)].mean(0)
    return result


def _check_rows(out, models, order, vocab, weights, **rules):
    root, tokenizers, tensors = models
    for name in VOCAB_TENSORS:
        tensor = {m: tensors[m][name] for m in order}
        expected = _reference_rows(tensor, order, tokenizers, vocab, **rules)
        merged = sum(w * expected[m] for m, w in zip(order, weights)) / sum(weights)
        np.testing.assert_allclose(np.asarray(out[name]), merged, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_union_of_vocabularies_moves_every_row_to_its_token(tmp_path, models):
    root, tokenizers, tensors = models
    config = {"merge_method": "linear", "base_model": str(root / "base"), "tokenizer_source": "union",
              "models": [{"model": str(root / m), "parameters": {"weight": w}}
                         for m, w in [("m0", 1.0), ("m1", 0.5), ("base", 1.0)]]}
    out, tokenizer, merged = _merge(tmp_path, config)
    vocab = _vocab(tokenizer)
    base_vocab = _vocab(tokenizers["base"])
    assert {t: vocab[t] for t in base_vocab} == base_vocab  # the base keeps its ids; its unused rows are gone
    # new plain tokens after the base's 14, model by model in id order, then the added tokens
    assert sorted(vocab, key=vocab.get)[14:] == ["gh", "bc", "<|im|>", "hello"]
    assert [t for t in tokenizer["added_tokens"] if t["content"] == "<|im|>"][0]["special"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab) == merged["lm_head.weight"].shape[0]
    assert tokenizer["model"]["merges"] == tokenizers["base"]["model"]["merges"]
    _check_rows(merged, models, ["m0", "m1", "base"], vocab, [1.0, 0.5, 1.0], base="base")
    np.testing.assert_allclose(np.asarray(merged["model.norm.weight"]),
                               sum(w * tensors[m]["model.norm.weight"] for m, w in [("m0", 1), ("m1", .5), ("base", 1)])
                               / 2.5, rtol=1e-6)
    assert not (out / "chat_template.jinja").exists()


def test_the_base_vocabulary_is_stripped_of_unused_tokens(tmp_path, models):
    root, tokenizers, _ = models
    stretched = dict(tokenizers["base"], model=dict(tokenizers["base"]["model"]))
    stretched["model"]["vocab"] = {**stretched["model"]["vocab"], "gx": 14, "zz": 19}  # 19 rows: zz unused
    stretched["model"]["merges"] = [*stretched["model"]["merges"], "g x", "zz a"]  # the last uses zz
    (tmp_path / "base").mkdir()
    for file in (root / "base").iterdir():
        (tmp_path / "base" / file.name).write_bytes(file.read_bytes())
    (tmp_path / "base" / "tokenizer.json").write_text(json.dumps(stretched))
    config = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "tokenizer_source": "base",
              "models": [{"model": str(root / "m1"), "parameters": {"weight": 1.0}}]}
    _, tokenizer, merged = _merge(tmp_path, config)
    assert "zz" not in _vocab(tokenizer) and tokenizer["model"]["merges"][-2:] == ["e f", "g x"]
    assert merged["model.embed_tokens.weight"].shape[0] == 15


def test_configured_tokens_sources_forcing_and_padding(tmp_path, models):
    root, tokenizers, tensors = models
    m1_id_of_b = _vocab(tokenizers["m1"])["b"]
    config = {"merge_method": "linear", "base_model": str(root / "base"),
              "models": [{"model": str(root / m), "parameters": {"weight": w}}
                         for m, w in [("base", 0.2), ("m0", 1.0), ("m1", 0.5)]],
              "tokenizer": {"source": str(root / "m1"), "pad_to_multiple_of": 8, "tokens": {
                  "<|im|>": {"source": str(root / "m0")},
                  "zz": {"source": {"kind": "zero"}},
                  "a": {"source": {"kind": "model_token", "model": str(root / "m1"), "token": "b"}, "force": True},
                  "<|new|>": {"source": {"kind": "model_token", "model": str(root / "m0"), "token_id": 5}},
                  "cd": {"source": str(root / "m1"), "force": True}}}}
    out, tokenizer, merged = _merge(tmp_path, config)
    vocab = _vocab(tokenizer)
    m1_vocab = _vocab(tokenizers["m1"])
    assert {t: vocab[t] for t in m1_vocab} == m1_vocab  # the source model's tokenizer as it is
    assert sorted(vocab, key=vocab.get)[len(m1_vocab):] == ["<|im|>", "zz", "<|new|>"]
    rows = -(-len(vocab) // 8) * 8
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows == merged["lm_head.weight"].shape[0]
    configured = {"<|im|>": ("m0", False), "zz": ("zero", False), "a": (("m1", m1_id_of_b), True),
                  "<|new|>": (("m0", 5), False), "cd": ("m1", True)}
    _check_rows(merged, models, ["base", "m0", "m1"], vocab, [0.2, 1.0, 0.5], base="base", configured=configured,
                rows=rows)


def test_slices_remap_the_embeddings_of_the_first_and_the_head_of_the_last(tmp_path, models):
    root, tokenizers, tensors = models
    config = {"merge_method": "passthrough", "tokenizer_source": "union", "slices": [
        {"sources": [{"model": str(root / "m0"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(root / "m1"), "layer_range": [1, 2]}]}]}
    out, tokenizer, merged = _merge(tmp_path, config)
    vocab = _vocab(tokenizer)
    assert set(vocab) == set(_vocab(tokenizers["m0"])) | set(_vocab(tokenizers["m1"]))
    for name, model in [("model.embed_tokens.weight", "m0"), ("lm_head.weight", "m1")]:
        expected = _reference_rows({model: tensors[model][name]}, [model], tokenizers, vocab)[model]
        np.testing.assert_allclose(np.asarray(merged[name]), expected, err_msg=name)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_named_chat_template_is_written_with_the_tokenizer(tmp_path, models, name):
    root, _, _ = models
    config = {"merge_method": "linear", "chat_template": name,
              "models": [{"model": str(root / m), "parameters": {"weight": 1.0}} for m in ("m1", "base")]}
    out, _, _ = _merge(tmp_path, config)
    assert (out / "chat_template.jinja").read_text() == TEMPLATES[name]
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "tokenizer.json").read_text() == (root / "m1" / "tokenizer.json").read_text()


def test_auto_takes_the_models_most_common_template(tmp_path, models):
    root, _, _ = models
    (tmp_path / "m2").mkdir()
    for file in (root / "m1").iterdir():
        (tmp_path / "m2" / file.name).write_bytes(file.read_bytes())
    config = {"merge_method": "linear", "chat_template": "auto", "tokenizer_source": "union",
              "models": [{"model": str(p), "parameters": {"weight": 1.0}}
                         for p in (root / "m0", root / "m1", tmp_path / "m2")]}
    out, _, _ = _merge(tmp_path, config)
    assert (out / "chat_template.jinja").read_text() == "model 2"  # m1's, which m2 shares


RENDER = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": " U "}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("name, expected", [
    ("chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n U <|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
               "<|im_start|>assistant\n"),
    ("llama3", "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\n<|start_header_id|>user<|end_header_id|>"
               "\n\nU<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>\n"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("mistral", "<s> [INST] S\n\n U  [/INST] A</s>"),
    ("alpaca", "S\n\n### Instruction:\nU\n\n### Response:\nA"),
    ("exaone", "    [|system|]S\n        [|endofturn|]\n\n    [|user|] U \n        \n\n    [|assistant|]A\n        "
               "[|endofturn|]\n\n    [|assistant|]\n"),
])
def test_named_templates_render_their_formats(name, expected):
    rendered = RENDER.from_string(TEMPLATES[name]).render(messages=CHAT, add_generation_prompt=True, bos_token="<s>",
                                                          eos_token="</s>")
    assert rendered == expected


def test_added_tokens_take_ids_as_the_tokenizers_library_gives_them():
    tokenizer = {"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 0, "content": "a"}]}
    add_token(tokenizer, {"content": "b"})  # known to the model: its id
    add_token(tokenizer, {"content": "x"})  # the first new one: the model's size
    add_token(tokenizer, {"content": "y"})
    add_token(tokenizer, {"content": "x", "special": True})  # already added: skipped
    assert [(t["id"], t["content"]) for t in tokenizer["added_tokens"]] == [(0, "a"), (1, "b"), (2, "x"), (3, "y")]
    beyond = {"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 7, "content": "<pad>"}]}
    add_token(beyond, {"content": "z"})
    assert beyond["added_tokens"][-1]["id"] == 8


@pytest.mark.parametrize("tokenizer, message", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "give one of 'tokenizer_source' and 'tokenizer'"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "other"}}}}}, "tokenizer.tokens['x'].source must be"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "{m0}"}}}}}, "exactly one of token"),
    ({"tokenizer": {"tokens": {"x": {"force": "maybe"}}}}, "force must be true or false"),
    ({"tokenizer": {"pad_to_multiple_of": 1.5}}, "pad_to_multiple_of must be a whole number"),
    ({"tokenizer": {"tokens": {"zz": {"source": {"kind": "model_token", "model": "{m0}", "token_id": 99}}}}},
     "token_id 99 is out of range"),
    ({"tokenizer": {"tokens": {"zz": {"source": {"kind": "model_token", "model": "{m0}", "token": "nope"}}}}},
     "the token 'nope' is not in the vocabulary"),
    ({"tokenizer": {"tokens": {"zz": {}}}}, "tokenizer.tokens['zz'] has no source"),
    ({"tokenizer_source": 5}, "tokenizer_source must be 'union', 'base' or a model"),
    ({"chat_template": "short"}, "chat_template must be one of alpaca, chatml"),
])
def test_bad_tokenizer_settings_are_refused_naming_the_key(tmp_path, models, capsys, tokenizer, message):
    root, _, _ = models
    text = json.dumps(tokenizer).replace("{m0}", str(root / "m0"))
    config = {"merge_method": "linear", **json.loads(text),
              "models": [{"model": str(root / m), "parameters": {"weight": 1.0}} for m in ("m0", "m1")]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_tokenizer_shares_the_base_vocabulary_but_a_slow_one_is_refused(tmp_path, models, capsys):
    root, tokenizers, tensors = models
    (tmp_path / "bare").mkdir()
    for file in ("model.safetensors", "config.json"):
        (tmp_path / "bare" / file).write_bytes((root / "base" / file).read_bytes())
    config = {"merge_method": "linear", "tokenizer_source": "union",
              "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (root / "m0", tmp_path / "bare")]}
    _, tokenizer, merged = _merge(tmp_path, config)
    bare = {**tokenizers, "bare": tokenizers["m0"]}  # its rows read by the first model's ids
    rows = _reference_rows({"bare": tensors["base"]["lm_head.weight"]}, ["bare"], bare, _vocab(tokenizer))["bare"]
    mean = (rows + _reference_rows({"m0": tensors["m0"]["lm_head.weight"]}, ["m0"], bare, _vocab(tokenizer))["m0"]) / 2
    np.testing.assert_allclose(np.asarray(merged["lm_head.weight"]), mean, rtol=1e-6)
    (tmp_path / "bare" / "tokenizer.model").write_bytes(b"sentencepiece")
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "needs its tokenizer.json" in capsys.readouterr().err
