"""A merge config's slices as groups of output tensors for the streamed driver, as mergekit plans them.

A ``models`` config is merged as one group, tensor name for tensor name. A ``slices`` config
gives, in order: the tensors before the layer stack (embeddings) from the first slice's
sources, each slice's layers renumbered after the previous slice's, and the tensors after
the stack (final norm, head) from the last slice's sources. Layer gradients are evaluated
within each slice (its layer ``i`` of ``n`` at ``i / (n - 1)``, 1 when ``n == 1``), the
tensors outside the stack at 0, as mergekit 0.1.5 does.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from jaxmerge._hyper import Levels
from jaxmerge._layers import LayerStack, position
from jaxmerge.checkpoints.safetensors import set_config_dtype
from jaxmerge.checkpoints.stream import TIED_EMBEDDINGS, Group, open_checkpoint
from jaxmerge.cli.config import MergeConfig, Slice, Source, coerce
from jaxmerge.cli.tokenizer import Vocabulary, config_value, vocab_size_key
from jaxmerge.cli.vocabulary import VocabularyRemap
from jaxmerge.errors import ConfigError, JaxmergeError
from jaxmerge.merging.method import MergePlan

_EMBEDDING_NAMES = ("embed", "wte", "wpe")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def merge_plan(config: MergeConfig, slice_: Slice, sources: list[Source], seed: int) -> MergePlan:
    """The method with its settings for ``sources`` of ``slice_``: a source's own parameters, then the
    slice's, then the global ones (mergekit's precedence); random methods draw from ``seed``."""
    settings = {}
    for p in config.method.params:
        given = [coerce(p, level[p.key]) for level in (slice_.parameters, config.global_settings) if p.key in level]
        if p.key is None:
            settings[p.name] = jax.random.key(seed) if p.name == "key" else None
        elif p.scope == "option":
            settings[p.name] = given[0] if given else None
        elif p.scope == "leaf":
            settings[p.name] = Levels(shared=tuple(given))
        else:
            own = tuple(((coerce(p, s.parameters[p.key]),) if p.key in s.parameters else ()) for s in sources)
            settings[p.name] = Levels(shared=tuple(given), per_model=own)
    return MergePlan(config.method, settings, config=True)


def _roles(config: MergeConfig, slice_: Slice, where: str) -> tuple[list[Source], Source | None]:
    """``(merged sources, base source)`` of a slice by the method's base policy (for a ``'pair'``
    method the base is the first merged source, ``t = 0``), after checking their number."""
    policy, base = config.method.base, slice_.base or config.base
    models, base_source = slice_.sources, None
    if policy != "none" and base is not None:
        found = [s for s in slice_.sources if s.model.resolve() == base.resolve()]
        if not found:
            raise ConfigError(f"{where}: the base_model {base} is not one of its sources")
        models, base_source = [s for s in slice_.sources if s is not found[0]], found[0]
        if policy == "pair":
            models, base_source = [base_source, *models], None
    elif policy in ("required", "pair"):
        raise ConfigError(f"merge_method {config.method.name!r} needs a base_model")
    try:
        config.method.check_models(len(models), base_source is not None)
    except JaxmergeError as error:
        raise ConfigError(f"{where}: {error}") from None
    return models, base_source


def _group(plan: MergePlan, models: list[Source], base: Source | None, vocabulary, **layout) -> Group:
    return Group(plan, tuple(s.model for s in models), base=base and base.model,
                 model_names=tuple(s.label for s in models), vocabulary=vocabulary(models, base), **layout)


def plan_groups(config: MergeConfig, seed: int, vocabulary: Vocabulary | None = None) -> list[Group]:
    """The groups of output tensors of ``config``, each with its merge plan; the first group's
    base (else first model) is the output's reference, whose config and tokenizer it takes.
    With a merged ``vocabulary``, each group's embedding and head rows are moved onto it.

    Raises:
      ConfigError: a slice without its base model among its sources, a method given the wrong
        number of models (naming the slice), a layer range beyond a model's layers, or no
        tensor to write; CheckpointError: unreadable models.
    """
    def remap(slice_: Slice):
        def bind(models: list[Source], base: Source | None) -> VocabularyRemap | None:
            if vocabulary is None:
                return None
            return VocabularyRemap(vocabulary, config.tokenizer.tokens, [s.model for s in slice_.sources],
                                   slice_.base or config.base, [s.model for s in models], base and base.model)
        return bind

    if not config.sliced:
        slice_ = config.slices[0]
        models, base = _roles(config, slice_, "models")
        statistics = tuple(s.statistics for s in models) if config.method.statistics else None
        return [_group(merge_plan(config, slice_, models, seed), models, base, remap(slice_),
                       statistics=statistics)]
    layouts = {}

    def layout(source: Source) -> tuple[list[str], LayerStack]:
        if source.model not in layouts:
            names = open_checkpoint(source.model).names
            layouts[source.model] = names, LayerStack([(n,) for n in names])
        return layouts[source.model]

    groups, offset = [], 0
    for i, slice_ in enumerate(config.slices):
        models, base = _roles(config, slice_, f"slices[{i}]")
        plan = merge_plan(config, slice_, models, seed)
        template = base or models[0]
        names, stack = layout(template)
        for source in [*models, *([base] if base else [])]:
            if source.layers[1] > layout(source)[1].num_layers:
                raise ConfigError(f"{source.label}: layer_range {list(source.layers)} goes beyond its "
                                  f"{layout(source)[1].num_layers} layers")
        if i == 0:
            groups.append(_outside(plan, models, base, remap(slice_), names, stack, before=True))
        count = template.layers[1] - template.layers[0]
        outputs, inputs, base_inputs, positions = [], [{} for _ in models], {}, {}
        for step in range(count):
            for k, name in enumerate(names):
                if stack.indices[k] != template.layers[0] + step:
                    continue
                out = stack.renumbered(k, name, offset + step)
                outputs.append(out)
                positions[out] = position(step, count)
                for j, source in enumerate(models):
                    inputs[j][out] = stack.renumbered(k, name, source.layers[0] + step)
                if base is not None:
                    base_inputs[out] = stack.renumbered(k, name, base.layers[0] + step)
        groups.append(_group(plan, models, base, remap(slice_), outputs=tuple(outputs), inputs=tuple(inputs),
                             base_inputs=base_inputs, positions=positions))
        offset += count
        if i == len(config.slices) - 1:
            sources = [*models, *([base] if base else [])]
            tied = tuple(n for n in TIED_EMBEDDINGS if n not in names and any(n in layout(s)[0] for s in sources))
            groups.append(_outside(plan, models, base, remap(slice_), names, stack, before=False, tied=tied))
    groups = [g for g in groups if g.outputs]
    if not groups:
        raise ConfigError("the slices give no tensor to write")
    return groups


def _outside(plan: MergePlan, models: list[Source], base: Source | None, vocabulary, names: list[str],
             stack: LayerStack, *, before: bool, tied: tuple = ()) -> Group:
    """The group of the tensors outside the layer stack: those before it (embeddings) or after
    it, with ``tied``: output embeddings that the template leaves out (its embeddings are
    tied) and another source has."""
    outputs = tuple(n for k, n in enumerate(names)
                    if stack.indices[k] is None and any(e in n.lower() for e in _EMBEDDING_NAMES) == before) + tied
    return _group(plan, models, base, vocabulary, outputs=outputs, positions={n: position(None, 0) for n in outputs})


def output_config(config: MergeConfig, reference: Path, out_dtype: str | None, vocab_rows: int | None) -> str | None:
    """The merged model's ``config.json``: the reference model's, with its dtype set to the
    written one, for slices its layer count to the output's, and with a merged vocabulary its
    ``vocab_size`` to ``vocab_rows``; None without one."""
    path = Path(reference) / "config.json"
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if out_dtype is not None:
        set_config_dtype(values, out_dtype)
    if config.sliced:
        key = next((k for k in _LAYER_COUNT_KEYS if k in values), "num_hidden_layers")
        values[key] = sum(s.sources[0].layers[1] - s.sources[0].layers[0] for s in config.slices)
    if vocab_rows is not None:
        *parents, key = vocab_size_key(values)
        config_value(values, tuple(parents))[key] = vocab_rows
    return json.dumps(values, indent=2) + "\n"
