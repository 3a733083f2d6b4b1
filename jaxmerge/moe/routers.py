"""Router initialisation from prompts, as mergekit-moe does it: each expert's router row in
each layer is the normalised representation of its positive prompts minus that of its
negative prompts.

``cheap_embed``: the sum of the prompts' token embeddings (padding masked out), normalised,
the same in every layer. ``hidden`` (``hidden_last``): each layer's input hidden state at the
last token, averaged over the prompts; ``hidden_avg``: averaged over every position (padding
included, as mergekit does). Prompts are tokenized as ``bos_token + prompt`` without other
special tokens and padded on the left with the BOS token (else EOS). ``random``: standard
normal rows; ``uniform_random``: uniform in ``±1/sqrt(hidden)`` (``torch.nn.Linear``'s
initialisation), both drawn from an explicit key.

``perplexity`` (jaxmerge's; after MergeME's perplexity-based routing, Zhou et al., arXiv
2502.00997, whose exact formulation is not reproduced here): every routing text (the config's
``routing_texts`` and every expert's positive prompts) goes to the expert whose dense model
gives it the lowest perplexity (the mean negative log-likelihood of its tokens after the
first, in float32); each expert's router rows are then the ``hidden`` rows of the texts it
won, so that tokens are routed to the expert that models text like them best rather than to
the expert whose prompts a user listed. An expert that wins no text keeps its own positive
prompts, or, without any, is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.errors import JaxmergeError
from jaxmerge.moe.transformer import hidden_states, logits


class PromptTokenizer:
    """A base model's ``tokenizer.json`` (via the ``tokenizers`` package) with its BOS token,
    batching prompts as mergekit-moe does.

    Args:
      model: the model directory (``tokenizer.json``, and ``tokenizer_config.json`` for
        ``bos_token`` / ``eos_token``). Where ``tokenizer_config.json`` does not name a BOS
        token, transformers takes it from ``special_tokens_map.json``, else from its
        tokenizer class's default (``<s>`` for Llama's, ``<bos>`` for Gemma's), and so does
        this (when the vocabulary has it).

    Examples:
      >>> import json, pathlib, tempfile
      >>> from tokenizers import Tokenizer, models, pre_tokenizers
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> words = Tokenizer(models.WordLevel({"<pad>": 0, "a": 1, "b": 2}, unk_token="<pad>"))
      >>> words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
      >>> words.save(str(tmp / "tokenizer.json"))
      >>> ids, mask = PromptTokenizer(tmp)(["a", "b a"])  # no bos_token: none prepended, padded with id 0
      >>> ids.tolist(), mask.tolist()
      ([[0, 1], [2, 1]], [[0, 1], [1, 1]])
    """

    def __init__(self, model: str | Path):
        from tokenizers import Tokenizer

        model = Path(model)
        if not (model / "tokenizer.json").is_file():
            raise JaxmergeError(f"{model} has no tokenizer.json, which the gate mode needs to read its prompts")
        self.tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
        settings = _read_json(model / "tokenizer_config.json")
        self.bos = _token(settings["bos_token"]) if "bos_token" in settings else self._default_bos(model, settings)
        pad = self.bos or _token(settings.get("eos_token"))
        self.pad_id = 0 if pad is None else self.tokenizer.token_to_id(pad) or 0

    def _default_bos(self, model: Path, settings: dict) -> str | None:
        """The BOS token transformers gives a tokenizer whose config names none."""
        token = (_token(_read_json(model / "special_tokens_map.json").get("bos_token"))
                 or _CLASS_BOS.get(str(settings.get("tokenizer_class")).removesuffix("Fast")))
        return token if token is not None and self.tokenizer.token_to_id(token) is not None else None

    def __call__(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """``(input_ids, attention_mask)``, each ``(len(prompts), longest)``, padded on the left."""
        encoded = [self.tokenizer.encode((self.bos or "") + p, add_special_tokens=False).ids for p in prompts]
        longest = max(len(ids) for ids in encoded)
        ids = np.full((len(encoded), longest), self.pad_id, np.int32)
        mask = np.zeros((len(encoded), longest), np.int32)
        for row, tokens in enumerate(encoded):
            if tokens:
                ids[row, -len(tokens):], mask[row, -len(tokens):] = tokens, 1
        return jnp.asarray(ids), jnp.asarray(mask)


_CLASS_BOS = {"LlamaTokenizer": "<s>", "CodeLlamaTokenizer": "<s>", "GemmaTokenizer": "<bos>"}  # transformers' defaults


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def cheap_embedding(embeddings: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The normalised sum of the prompts' token embeddings, ``(hidden,)`` (float32)."""
    tokens = embeddings[input_ids].astype(jnp.float32) * attention_mask.astype(jnp.float32)[..., None]
    total = tokens.sum(axis=1).sum(axis=0)  # over positions, then prompts, as mergekit-moe sums
    return total / jnp.maximum(jnp.linalg.norm(total), 1e-8)


def prompt_hidden_states(params: Mapping[str, jax.Array], config: Mapping, input_ids: jax.Array,
                         attention_mask: jax.Array, *, average: bool = False) -> jax.Array:
    """Each layer's input hidden state over the prompts, ``(layers, hidden)`` (float32): at the
    last position, or (``average``) the mean over positions, then the mean over prompts."""
    inputs, _ = hidden_states(params, config, input_ids, attention_mask)
    per_prompt = inputs.mean(axis=2) if average else inputs[:, :, -1]
    return per_prompt.astype(jnp.float32).mean(axis=1)


def text_losses(params: Mapping[str, jax.Array], config: Mapping, input_ids: jax.Array,
                attention_mask: jax.Array) -> jax.Array:
    """Each text's mean negative log-likelihood of its tokens after the first, ``(texts,)``
    (float32; the log of its perplexity)."""
    scores = jax.nn.log_softmax(logits(params, config, input_ids, attention_mask).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(scores[:, :-1], input_ids[:, 1:, None], axis=-1)[..., 0]
    counted = (attention_mask[:, 1:] * attention_mask[:, :-1]).astype(jnp.float32)  # a token and one before it
    return -(picked * counted).sum(axis=1) / jnp.maximum(counted.sum(axis=1), 1.0)


def perplexity_prompts(losses: np.ndarray, texts: Sequence[str],
                       own: Sequence[Sequence[str]]) -> list[tuple[list[str], list[str]]]:
    """Per expert, ``(texts it models best, [])`` from ``losses`` ``(experts, texts)``; an
    expert that is best on none keeps its own positive prompts ``own[e]``.

    Raises:
      JaxmergeError: an expert is best on no text and has no positive prompts.

    Examples:
      >>> perplexity_prompts(np.asarray([[1.0, 3.0, 2.0], [2.0, 1.0, 2.5]]), ["x", "y", "z"], [[], []])
      [(['x', 'z'], []), (['y'], [])]
    """
    best = np.argmin(np.asarray(losses), axis=0)
    prompts = []
    for e, fallback in enumerate(own):
        won = [t for t, b in zip(texts, best) if b == e]
        if not won and not fallback:
            raise JaxmergeError(f"experts[{e}] models none of the routing texts best and has no positive_prompts")
        prompts.append((won or list(fallback), []))
    return prompts


def _normalised(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def gate_vectors(mode: str, prompts: Sequence[tuple[Sequence[str], Sequence[str]]], *, layers: int, hidden: int,
                 key: jax.Array | None = None, embed: Callable[[Sequence[str]], jax.Array] | None = None) -> jax.Array:
    """Router rows ``(layers, experts, hidden)`` (float32) for every expert.

    Args:
      mode: ``random``, ``uniform_random``, ``cheap_embed``, ``hidden`` / ``hidden_last`` or
        ``hidden_avg``.
      prompts: per expert, ``(positive_prompts, negative_prompts)``.
      layers: the number of decoder layers.
      hidden: the hidden size.
      key: the key of the random modes.
      embed: for the prompt modes, ``embed(prompts) -> (layers, hidden)``: the prompts'
        representation in each layer (see :func:`prompt_embedder`).

    Returns:
      The rows, each expert's normalised (prompt modes).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> rows = gate_vectors("cheap_embed", [(["a"], []), (["b"], ["a"])], layers=2, hidden=2,
      ...                     embed=lambda ps: jnp.asarray([[1.0, 0.0]] * 2) if ps == ["a"] else jnp.ones((2, 2)))
      >>> rows[0].tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    shape = (layers, len(prompts), hidden)
    if mode in ("random", "uniform_random"):
        if key is None:
            raise JaxmergeError(f"gate_mode {mode!r} needs a key")
        if mode == "random":
            return jax.random.normal(key, shape, jnp.float32)
        scale = (1.0 / hidden) ** 0.5
        return jax.random.uniform(key, shape, jnp.float32, -scale, scale)
    rows = []
    for positive, negative in prompts:
        row = embed(list(positive))
        if negative:
            row = row - embed(list(negative))
        rows.append(_normalised(row))
    return jnp.stack(rows, axis=1)


def prompt_embedder(mode: str, tokenizer: PromptTokenizer, params: Mapping[str, jax.Array],
                    config: Mapping) -> Callable[[Sequence[str]], jax.Array]:
    """The prompts' representation in every layer for a prompt gate mode.

    Args:
      mode: ``cheap_embed`` (the normalised sum of token embeddings, the same in every layer),
        ``hidden`` / ``hidden_last`` or ``hidden_avg`` (each layer's input hidden state).
      tokenizer: the base model's :class:`PromptTokenizer`.
      params: the base model's tensors (float32 recommended; ``cheap_embed`` needs only the
        embeddings).
      config: the base model's ``config.json``.

    Returns:
      ``embed(prompts) -> (layers, hidden)``.

    Raises:
      JaxmergeError: ``mode`` does not route by prompts.

    Examples:
      >>> import json, pathlib, tempfile, jax.numpy as jnp
      >>> from tokenizers import Tokenizer, models
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> Tokenizer(models.WordLevel({"<s>": 0, "a": 1}, unk_token="<s>")).save(str(tmp / "tokenizer.json"))
      >>> embed = prompt_embedder("cheap_embed", PromptTokenizer(tmp), {"model.embed_tokens.weight": jnp.eye(2)},
      ...                         {"num_hidden_layers": 2})
      >>> embed(["a"]).tolist()
      [[0.0, 1.0], [0.0, 1.0]]
    """
    layers = config["num_hidden_layers"]
    if mode == "cheap_embed":
        table = params["model.embed_tokens.weight"]
        return lambda prompts: jnp.broadcast_to(cheap_embedding(table, *tokenizer(prompts)), (layers, table.shape[1]))
    if mode in ("hidden", "hidden_last", "hidden_avg"):
        forward = jax.jit(lambda p, ids, mask: prompt_hidden_states(p, config, ids, mask, average=mode == "hidden_avg"))
        return lambda prompts: forward(params, *tokenizer(prompts))
    raise JaxmergeError(f"gate_mode {mode!r} does not route by prompts")
