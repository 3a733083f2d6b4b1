"""Embedding and head rows moved onto a merged vocabulary, new rows filled as mergekit 0.1.5 fills them.

Before a vocabulary tensor (an embedding or a head, vocabulary on axis 0) is merged, each
model's rows are put in the output vocabulary's order (:mod:`jaxmerge.cli.tokenizer`). A model
keeps its own row for every token it has; a token it lacks, or one configured with
``force: true``, takes a default row, chosen as mergekit chooses it:

- a token in ``tokenizer.tokens`` takes its ``source``: zeros (``kind: zero``), a model's row
  of the same token (a model), or a model's row of another token or id (``kind: model_token``);
- otherwise: the row of the one model that has it; zeros if none has it; the base model's
  row if the base has it; else the mean of the rows of the models that have it (summed in the
  tensors' dtype, in the models' order, then divided).

Rows added by ``pad_to_multiple_of`` are the mean of the real rows. Then the merge method
runs on the rewritten tensors as on any others.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxmerge.cli.config import TokenSource
from jaxmerge.cli.tokenizer import Vocabulary
from jaxmerge.errors import ConfigError

# Tensors indexed by token on axis 0 in the architectures mergekit knows.
VOCABULARY_TENSORS = frozenset({
    "lm_head.weight", "lm_head.bias", "model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
    "embed_tokens.weight", "decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "shared.weight",
    "transformer.wte.weight", "transformer.embd.wte.weight", "transformer.word_embeddings.weight",
    "transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight", "gpt_neox.embed_in.weight",
    "embed_out.weight", "model.tok_embeddings.weight", "output.weight", "backbone.embeddings.weight",
    "embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight",
    "roberta.embeddings.word_embeddings.weight", "distilbert.embeddings.word_embeddings.weight",
    "cls.predictions.bias", "cls.predictions.decoder.weight", "lm_head.decoder.weight", "lm_head.linear.weight",
    "lm_head.linear.bias", "vocab_projector.weight", "vocab_projector.bias"})


def _per_row(values: np.ndarray, ndim: int) -> np.ndarray:
    """One value per row, shaped to broadcast against an ``ndim``-dimensional table of rows."""
    return values.reshape((-1,) + (1,) * (ndim - 1))


class VocabularyRemap:
    """Rewrites the vocabulary tensors of one slice's models onto the output vocabulary.

    Args:
      vocabulary: the output vocabulary.
      tokens: the config's ``tokenizer.tokens``: ``{token: (source, force)}``.
      sources: the slice's models in the config's order (the base among them where it is read).
      base: the slice's base model (mergekit's: its row wins for tokens some models lack), if any.
      models: the merged models, in the order the driver gives their tensors.
      merge_base: the base the driver reads separately (for methods that take one), if any.

    Attributes:
      rows: the rows of every rewritten tensor.
      names: the tensors rewritten.
    """

    names = VOCABULARY_TENSORS

    def __init__(self, vocabulary: Vocabulary, tokens: dict[str, tuple[TokenSource, bool]], sources: Sequence[Path],
                 base: Path | None, models: Sequence[Path], merge_base: Path | None):
        self.vocabulary, self.tokens, self.rows = vocabulary, tokens, vocabulary.rows
        self.order = list(dict.fromkeys(Path(s).resolve() for s in sources))
        self.base = None if base is None else Path(base).resolve()
        self.models = [Path(m).resolve() for m in models]
        self.merge_base = None if merge_base is None else Path(merge_base).resolve()

    def __call__(self, models: list, base):
        """``(models' tensors, base's tensor)`` with their rows on the output vocabulary."""
        arrays = dict(zip(self.models, models))
        if self.merge_base is not None:
            arrays[self.merge_base] = base
        new = self.remap({m: arrays[m] for m in self.order if m in arrays})
        return [new[m] for m in self.models], None if self.merge_base is None else new[self.merge_base]

    def remap(self, tables: dict[Path, object]) -> dict[Path, jnp.ndarray]:
        """Each model's ``{model: tensor}`` rows on the output vocabulary, padded to :attr:`rows`."""
        dtype = jnp.result_type(*[t.dtype for t in tables.values()])
        tables = {m: jnp.asarray(t, dtype) for m, t in tables.items()}
        permutations = {m: self.vocabulary.permutations[m] for m in tables}
        present = {m: p >= 0 for m, p in permutations.items()}
        permuted = {m: jnp.take(tables[m], np.maximum(permutations[m], 0), axis=0) for m in tables}
        forced = np.zeros(len(self.vocabulary.tokens), bool)
        for token, (_, force) in self.tokens.items():
            forced[self.vocabulary.tokens[token]] = force
        defaults = self._defaults(tables, permuted, present, forced)
        result = {}
        for m in tables:
            keep = _per_row(present[m] & ~forced, defaults.ndim)
            rows = jnp.where(keep, permuted[m], defaults)
            if self.rows > rows.shape[0]:
                mean = jnp.mean(rows.astype(jnp.float32), axis=0).astype(dtype)
                rows = jnp.concatenate([rows, jnp.broadcast_to(mean, (self.rows - rows.shape[0], *mean.shape))])
            result[m] = rows
        return result

    def _defaults(self, tables: dict, permuted: dict, present: dict, forced: np.ndarray) -> jnp.ndarray:
        """The default row of every token that is forced or missing from some model (zeros
        elsewhere), gathered in one scatter per source."""
        first = next(iter(tables.values()))
        defaults = jnp.zeros((len(forced), *first.shape[1:]), first.dtype)
        count = sum(p.astype(np.int64) for p in present.values())
        needed = forced | (count < len(tables))
        rows: dict[tuple, list] = {}  # (table kind, model) -> [(output id, row id)]
        average = []
        for token, i in self.vocabulary.tokens.items():
            if not needed[i]:
                continue
            if token in self.tokens:
                source = self._configured(token, i, self.tokens[token][0], tables, present)
                if source is not None:
                    rows.setdefault(source[:2], []).append((i, source[2]))
            elif count[i] == 1:
                rows.setdefault(("permuted", next(m for m in tables if present[m][i])), []).append((i, i))
            elif count[i] > 1 and self.base in tables and present[self.base][i]:
                rows.setdefault(("permuted", self.base), []).append((i, i))
            elif count[i] > 1:
                average.append(i)
        for (kind, model), pairs in rows.items():
            ids, sources = (np.array(column) for column in zip(*pairs))
            defaults = defaults.at[ids].set((permuted if kind == "permuted" else tables)[model][sources])
        if average:
            ids = np.array(average)
            total = jnp.zeros((len(ids), *first.shape[1:]), first.dtype)
            for m in tables:
                total = total + jnp.where(_per_row(present[m][ids], total.ndim), permuted[m][ids], 0)
            divisor = _per_row(count[ids], total.ndim).astype(np.float32)
            defaults = defaults.at[ids].set(total / divisor.astype(first.dtype))
        return defaults

    def _configured(self, token: str, i: int, source: TokenSource, tables: dict, present: dict):
        """Where ``tokenizer.tokens[token].source`` takes the row from: ``('permuted' | 'table',
        model, row)``, or None for zeros."""
        if source.kind == "zero":
            return None
        where = f"tokenizer.tokens[{token!r}]"
        if source.kind is None:
            raise ConfigError(f"{where} has no source, and some model lacks the token (or it is forced)")
        model = source.model.resolve()
        if model not in tables:
            raise ConfigError(f"{where}: its source {source.model} is not one of the models merged into this tensor")
        if source.kind == "model":
            if not present[model][i]:
                raise ConfigError(f"{where}: its source {source.model} has no such token")
            return "permuted", model, i
        token_id = source.token_id
        if token_id is None:
            own = self.vocabulary.original.get(model, {})
            if source.token not in own:
                raise ConfigError(f"{where}: the token {source.token!r} is not in the vocabulary of {source.model}")
            token_id = own[source.token]
        if not 0 <= token_id < tables[model].shape[0]:
            raise ConfigError(f"{where}: token_id {token_id} is out of range for {source.model} "
                              f"({tables[model].shape[0]} rows)")
        return "table", model, token_id
