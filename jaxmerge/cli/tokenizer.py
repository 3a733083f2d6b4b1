"""The merged model's vocabulary, built from the models' ``tokenizer.json`` files as mergekit 0.1.5 builds it.

A config's ``tokenizer_source`` (or ``tokenizer.source``) picks the output vocabulary:

- ``base``: the base model's (else the first model's) tokenizer, *stripped* of the tokens whose
  ids are at or beyond its ``vocab_size`` (a BPE tokenizer's unused entries);
- ``union``: the stripped base tokenizer with every other token of every model (ids below its
  model's ``vocab_size``) added after it: plain tokens first, then the models' added (special)
  tokens with their settings;
- a model: that model's tokenizer as it is.

The tokens named in ``tokenizer.tokens`` are then added when missing. New tokens get ids as the
``tokenizers`` library gives them (an added token whose text is already known keeps its id; a new
one goes after the largest id). For each model a permutation maps each output id to the model's
own id for the same token (-1 where it lacks it), which :mod:`jaxmerge.cli.vocabulary` uses to
move embedding and head rows.

The files are read as JSON (the ``tokenizers`` format); nothing is imported from
``transformers``. A model with no tokenizer files is taken to share the base's vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxmerge.cli.config import TokenizerSpec
from jaxmerge.errors import ConfigError

# The files that make up a Hugging Face tokenizer; a built tokenizer replaces them all.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
_VOCAB_SIZE_KEYS = (("vocab_size",), ("text_config", "vocab_size"))
_PLAIN_TOKEN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a :class:`ConfigError` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return value


def config_value(config: dict, key: tuple[str, ...]):
    """The value at ``key`` (a path of nested keys) in a config, or None."""
    for part in key:
        config = config.get(part) if isinstance(config, dict) else None
    return config


def vocab_size_key(config: dict) -> tuple[str, ...]:
    """Where a model's ``config.json`` keeps its vocabulary size (``text_config`` for multimodal models)."""
    for key in _VOCAB_SIZE_KEYS:
        value = config_value(config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key
    return _VOCAB_SIZE_KEYS[0]


def configured_vocab_size(model: Path) -> int | None:
    """The ``vocab_size`` in ``model``'s config.json (the rows of its embedding), if it has one."""
    path = model / "config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    value = config_value(config, vocab_size_key(config))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def vocab(tokenizer: dict) -> dict[str, int]:
    """``{token: id}`` of a ``tokenizer.json``: its model's vocabulary and its added tokens."""
    entries = tokenizer.get("model", {}).get("vocab", {})
    if isinstance(entries, list):  # Unigram: [[piece, score], ...]
        entries = {piece: i for i, (piece, _) in enumerate(entries)}
    result = dict(entries)
    result.update({token["content"]: token["id"] for token in tokenizer.get("added_tokens", [])})
    return result


def read_tokenizer(model: Path, required: bool) -> dict | None:
    """``model``'s ``tokenizer.json``; None when the model has no tokenizer and ``required`` is false."""
    path = model / "tokenizer.json"
    if path.is_file():
        tokenizer = read_json(path)
        if not isinstance(tokenizer.get("model"), dict) or not isinstance(tokenizer.get("added_tokens", []), list):
            raise ConfigError(f"{path}: not a tokenizers file (no 'model' object)")
        return tokenizer
    if not required and not any((model / name).exists() for name in TOKENIZER_FILES):
        return None
    raise ConfigError(f"{model}: merging vocabularies needs its tokenizer.json (the tokenizers library's format); "
                      "save the tokenizer with a fast tokenizer (save_pretrained) to write one")


def stripped(tokenizer: dict, size: int | None, model: Path) -> dict:
    """``tokenizer`` without the tokens whose ids are ``size`` or more (and the BPE merges using them)."""
    unused = {token for token, i in vocab(tokenizer).items() if size is not None and i >= size}
    if not unused:
        return tokenizer
    if tokenizer["model"].get("type") != "BPE":
        raise ConfigError(f"{model}: its tokenizer has {len(unused)} tokens beyond vocab_size {size}, and only a BPE "
                          f"tokenizer can be stripped of them (this one is {tokenizer['model'].get('type')})")
    result = copy.deepcopy(tokenizer)
    result["added_tokens"] = [t for t in result.get("added_tokens", []) if t["id"] < size]
    result["model"]["vocab"] = {t: i for t, i in result["model"]["vocab"].items() if t not in unused}
    merges = result["model"].get("merges", [])
    result["model"]["merges"] = [m for m in merges if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    return result


def add_token(tokenizer: dict, token: dict) -> None:
    """Add ``token`` (an ``added_tokens`` entry without id) as the tokenizers library does: skipped
    when already an added token, given the id of the same text in the vocabulary, else the next id
    (the model's size, or after the largest added id when that is beyond it)."""
    added = tokenizer.setdefault("added_tokens", [])
    if any(t["content"] == token["content"] for t in added):
        return
    model_vocab = vocab({"model": tokenizer["model"]})
    if token["content"] in model_vocab:
        new_id = model_vocab[token["content"]]
    else:
        largest = max((t["id"] for t in added), default=None)
        size = len(model_vocab)
        new_id = size if largest is None or (largest < size and size) else largest + 1
    added.append({"id": new_id, **token})


def union(base: dict, others: list[tuple[dict, int]]) -> dict:
    """The base tokenizer with every token of ``others`` (``(tokenizer, vocab_size)`` pairs, the
    base first) that it lacks: plain tokens in id order, model by model, then added tokens (the
    first model's settings of each)."""
    plain, special = {}, {}
    for tokenizer, size in others:
        added = {t["content"]: t for t in tokenizer.get("added_tokens", []) if t["id"] < size}
        for token, i in sorted(vocab(tokenizer).items(), key=lambda item: item[1]):
            if i < size and token not in added:
                plain.setdefault(token, None)
        for token, entry in added.items():
            special.setdefault(token, {k: v for k, v in entry.items() if k != "id"})
    result = copy.deepcopy(base)
    known = vocab(base)
    for token in plain:
        if token not in known and token not in special:
            add_token(result, {"content": token, **_PLAIN_TOKEN})
    for entry in special.values():
        add_token(result, entry)
    return result


@dataclasses.dataclass
class Vocabulary:
    """The output vocabulary and how each model's rows map onto it.

    Attributes:
      tokenizer: the output ``tokenizer.json`` (a dict).
      tokens: ``{token: output id}``.
      rows: the rows of the output's embedding and head (``len(tokens)``, padded).
      permutations: per model (resolved path), ``p[output id]`` = the model's id of that token, or
        -1 where it lacks it (or has it beyond its ``vocab_size``).
      original: per model with a tokenizer, its own ``{token: id}``.
      source: the model whose tokenizer files (tokenizer_config.json, chat template) go with it.
    """

    tokenizer: dict
    tokens: dict[str, int]
    rows: int
    permutations: dict[Path, np.ndarray]
    original: dict[Path, dict[str, int]]
    source: Path


def build_vocabulary(spec: TokenizerSpec, base: Path, models: list[Path]) -> Vocabulary:
    """The output vocabulary of a config (mergekit's ``build_tokenizer``).

    Args:
      spec: the config's tokenizer settings.
      base: the base model (else the first model).
      models: every model the config reads.

    Raises:
      ConfigError: a missing or malformed tokenizer.json, or a non-BPE base tokenizer with
        unused tokens.
    """
    sizes = {m.resolve(): configured_vocab_size(m) for m in [base, *models]}
    base_tokenizer = stripped(read_tokenizer(base, required=True), sizes[base.resolve()], base)
    tokenizers = {base.resolve(): base_tokenizer}
    for model in models:
        if model.resolve() not in tokenizers and (tokenizer := read_tokenizer(model, required=False)) is not None:
            tokenizers[model.resolve()] = tokenizer
    if spec.source == "base":
        output, source = base_tokenizer, base
    elif spec.source == "union":
        output = union(base_tokenizer, [(t, sizes[m] or len(vocab(t))) for m, t in tokenizers.items()])
        source = base
    else:
        output, source = read_tokenizer(spec.source, required=True), spec.source
    output = copy.deepcopy(output)
    for token in spec.tokens:
        if token not in vocab(output):
            add_token(output, {"content": token, **_PLAIN_TOKEN})
    tokens = vocab(output)
    rows = len(tokens)
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    if max(tokens.values(), default=-1) >= len(tokens):
        raise ConfigError(f"{source}: the merged tokenizer's ids are not 0 to {len(tokens) - 1}")
    permutations = {}
    for model in dict.fromkeys(m.resolve() for m in models):
        own = vocab(tokenizers.get(model, base_tokenizer))
        size = sizes[model] or len(own)
        permutation = np.full(len(tokens), -1, np.int64)
        for token, i in tokens.items():
            if own.get(token, size) < size:
                permutation[i] = own[token]
        permutations[model] = permutation
    original = {m: vocab(t) for m, t in tokenizers.items()}
    return Vocabulary(output, tokens, rows, permutations, original, source)


def tokenizer_files(vocabulary: Vocabulary | None, reference: Path, template: str | None) -> dict[str, str | None]:
    """The tokenizer files of the output, over those copied from ``reference`` (None: not copied).

    With a merged ``vocabulary``: its tokenizer.json, the source tokenizer's tokenizer_config.json
    (its ``added_tokens_decoder``, if any, rewritten to the new added tokens), special-tokens map
    and chat template; the reference's other tokenizer files are left out. A ``template`` is
    written as chat_template.jinja in either case, replacing the tokenizer's own.
    """
    files: dict[str, str | None] = {}
    source = reference
    if vocabulary is not None:
        source = vocabulary.source
        files = dict.fromkeys(TOKENIZER_FILES)
        files["tokenizer.json"] = json.dumps(vocabulary.tokenizer, indent=2, ensure_ascii=False) + "\n"
        for name in ("special_tokens_map.json", "chat_template.jinja", "chat_template.json"):
            if (source / name).is_file():
                files[name] = (source / name).read_text(encoding="utf-8")
    elif template is None:
        return files
    settings = read_json(source / "tokenizer_config.json") if (source / "tokenizer_config.json").is_file() else None
    if settings is not None and vocabulary is not None and "added_tokens_decoder" in settings:
        settings["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                            for t in vocabulary.tokenizer.get("added_tokens", [])}
    if template is not None:
        files.update({"chat_template.jinja": template, "chat_template.json": None})
        if settings is not None:
            settings.pop("chat_template", None)
    if settings is not None:
        files["tokenizer_config.json"] = json.dumps(settings, indent=2, ensure_ascii=False) + "\n"
    return files
