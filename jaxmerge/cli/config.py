"""mergekit-style YAML merge configs, read into slices of source models.

A config names a ``merge_method``, an optional ``base_model``, global ``parameters``,
``dtype``/``out_dtype``, and either ``models`` (each with optional ``parameters``) or
``slices``: output layer ranges, each with ``sources`` (``model``, ``layer_range``,
``parameters``), an optional ``base_model`` and ``parameters``. As in mergekit, a ``models``
config is one slice of whole models, with the base model added when it is not listed. Which
parameters a method takes, their defaults and ranges, and whether it needs a base all come
from the method's record (:mod:`jaxmerge.merging.method`); the values are resolved per
tensor by the same resolver as the Python functions' (:mod:`jaxmerge._hyper`): the source's
own setting, else the slice's, else the global one, else the default, with mergekit's
fall-through when no filter matches. Keys and parameters that mergekit ignores (it reads
configs leniently) are reported, then ignored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from jaxmerge.cli.adapted import AdaptedModels
from jaxmerge.errors import ConfigError, JaxmergeError
from jaxmerge.merging.method import Method, Param, method

TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "name",
             "tokenizer_source", "tokenizer", "chat_template"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
STATISTICS = "statistics"  # the per-model parameter naming a model's statistics checkpoint
_TRUE, _FALSE = {"1", "on", "t", "true", "y", "yes"}, {"0", "off", "f", "false", "n", "no"}


def coerce(param: Param, value):
    """A config value as mergekit's validation (pydantic's lax mode) reads it: numeric strings
    (YAML reads ``1e-6`` as a string) are numbers, and ``'true'``/``'no'``/``1``-style values of
    boolean options are booleans. Lists and ``{filter, value}`` entries are read inside."""
    if isinstance(value, list):
        return [coerce(param, v) for v in value]
    if isinstance(value, dict):
        return {k: coerce(param, v) if k == "value" else v for k, v in value.items()}
    boolean = param.kind is bool or param.allowed_choices(config=True) == (False, True)
    if boolean and isinstance(value, (int, str)) and not isinstance(value, bool):
        text = str(value).strip().lower()
        return True if text in _TRUE else False if text in _FALSE else value
    if isinstance(value, str) and param.choices is None:
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if param.kind is int and number.is_integer() else number
    if param.kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclasses.dataclass
class Source:
    """One model of a slice: its layers ``[start, end)`` (None: all), its own parameters, its
    statistics checkpoint (``fisher``, ``regmean``) and its name in messages."""

    model: Path
    label: str
    layers: tuple[int, int] | None
    parameters: dict
    statistics: Path | None = None


@dataclasses.dataclass
class Slice:
    """A range of output layers merged from ``sources``, with its base model and parameters."""

    sources: list[Source]
    base: Path | None
    parameters: dict


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding row comes from (mergekit's ``tokenizer.tokens.<token>.source``):
    ``kind`` ``'zero'``, ``'model'`` (the token's row in ``model``) or ``'model_token'`` (the row
    of ``token`` or of ``token_id`` in ``model``'s own vocabulary); None: no source given."""

    kind: str | None
    model: Path | None = None
    token: str | None = None
    token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary: ``source`` ``'union'``, ``'base'`` or a model's path; ``tokens``
    added to it with their embedding sources and ``force`` flags; rows padded to a multiple of
    ``pad_to_multiple_of``."""

    source: str | Path
    tokens: dict[str, tuple[TokenSource, bool]]
    pad_to_multiple_of: int | None = None


@dataclasses.dataclass
class MergeConfig:
    """A parsed config (relative paths resolved against the working directory, then the
    config's directory).

    Attributes:
      method: the merge method's record.
      base: the global base model.
      slices: the output slices (a ``models`` config is one slice of whole models).
      sliced: whether the config gave ``slices`` (else ``models``).
      global_settings: the global ``parameters``.
      dtype, out_dtype: the compute and output dtypes (names), if given.
      text: the config as written.
      ignored: what mergekit would ignore in it, one line each.
      tokenizer: the merged vocabulary, if the config asks for one (``tokenizer_source`` or
        ``tokenizer``).
      chat_template: the chat template to write with the tokenizer (a name, ``'auto'`` or a
        template).
    """

    method: Method
    base: Path | None
    slices: list[Slice]
    sliced: bool
    global_settings: dict
    dtype: str | None
    out_dtype: str | None
    text: str
    ignored: list[str]
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None


def parse_dtype(value, key: str) -> str | None:
    if value is None:
        return None
    if str(value) not in DTYPES:
        raise ConfigError(f"{key} must be one of {sorted(set(DTYPES.values()))}, got {value!r}")
    return DTYPES[str(value)]


def _cycle(value, where: str = "the config", enclosing: frozenset = frozenset()) -> str | None:
    """Where ``value`` contains itself (YAML aliases can make a value its own member), or None."""
    if isinstance(value, (dict, list)):
        if id(value) in enclosing:
            return where
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if (found := _cycle(item, f"{where}[{key!r}]", enclosing | {id(value)})) is not None:
                return found
    return None


def read_yaml(path: Path) -> tuple[dict, str]:
    """A YAML config's mapping and text, or a :class:`ConfigError` naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (a YAML config is text)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if (where := _cycle(raw)) is not None:
        raise ConfigError(f"{path}: {where} contains itself (a YAML alias to an enclosing value)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values")
    return raw, text


def _read(path: Path) -> tuple[dict, str]:
    raw, text = read_yaml(path)
    if "modules" in raw:
        raise ConfigError(f"{path}: 'modules' configs (models of several modules) are not supported")
    if sum(key in raw for key in ("models", "slices")) != 1:
        raise ConfigError(f"{path}: give exactly one of 'models' and 'slices'")
    return raw, text


class _Reader:
    """Reads the parts of one config, resolving paths and collecting what mergekit ignores."""

    def __init__(self, path: Path, method: Method, adapted: AdaptedModels):
        self.path, self.method, self.ignored, self.adapted = path, method, [], adapted

    def model(self, value, where: str) -> Path:
        return self.adapted.resolve(value, self.path.parent, where)

    def parameters(self, parameters, where: str, per_model: bool) -> dict:
        """The parameters a method takes at this level; the others are reported and ignored."""
        if parameters is None:
            return {}
        if not isinstance(parameters, dict):
            raise ConfigError(f"{self.path}: {where} must be a mapping")
        known = {p.key for p in self.method.params if p.key is not None and (p.scope == "model" or not per_model)}
        known |= {STATISTICS} if self.method.statistics and per_model else set()
        for name in sorted(set(parameters) - known):
            self.ignored.append(f"{where} has the parameter {name!r}, which merge_method {self.method.name!r} does "
                                f"not take (it takes {', '.join(sorted(known)) or 'none'}): ignored")
        return {name: value for name, value in parameters.items() if name in known}

    def keys(self, entry: dict, known: set[str], where: str) -> None:
        """Report the keys of an entry that mergekit does not read."""
        self.ignored += [f"{where} has the key {key!r}, which is not read: ignored" for key in entry if key not in known]

    def source(self, entry, where: str, layers: bool) -> Source:
        entry = {"model": entry} if isinstance(entry, str) and not layers else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{self.path}: {where} needs a 'model' key")
        self.keys(entry, {"model", "parameters", *(("layer_range",) if layers else ())}, where)
        layer_range = None
        if layers:
            layer_range = entry.get("layer_range")
            if (not isinstance(layer_range, list) or len(layer_range) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
                    or not 0 <= layer_range[0] <= layer_range[1]):
                raise ConfigError(f"{self.path}: {where}.layer_range must be [start, end] with 0 <= start <= end, "
                                  f"got {layer_range!r}")
            layer_range = tuple(layer_range)
        parameters = self.parameters(entry.get("parameters"), f"{where}.parameters", per_model=True)
        statistics = None
        if self.method.statistics:
            if STATISTICS not in parameters:
                raise ConfigError(f"{self.path}: {where} needs a 'statistics' parameter naming its statistics "
                                  f"checkpoint ({self.method.name} merges by them)")
            statistics = self.model(parameters.pop(STATISTICS), f"{where}.statistics")
        return Source(self.model(entry["model"], where), f"{where} ({entry['model']})", layer_range, parameters,
                      statistics)


    def tokenizer(self, raw: dict) -> TokenizerSpec | None:
        """``tokenizer_source`` (a source) or ``tokenizer`` (a source, tokens to add, padding)."""
        if raw.get("tokenizer_source") and raw.get("tokenizer"):
            raise ConfigError(f"{self.path}: give one of 'tokenizer_source' and 'tokenizer', not both")
        if raw.get("tokenizer_source"):
            return TokenizerSpec(self.vocabulary_source(raw["tokenizer_source"], "tokenizer_source"), {})
        entry = raw.get("tokenizer")
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise ConfigError(f"{self.path}: tokenizer must be a mapping with source, tokens, pad_to_multiple_of")
        self.keys(entry, {"source", "tokens", "pad_to_multiple_of"}, "tokenizer")
        tokens = entry.get("tokens") or {}
        if not isinstance(tokens, dict):
            raise ConfigError(f"{self.path}: tokenizer.tokens must map tokens to {{source, force}}")
        pad = entry.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
            raise ConfigError(f"{self.path}: tokenizer.pad_to_multiple_of must be a whole number, got {pad!r}")
        return TokenizerSpec(self.vocabulary_source(entry.get("source", "union"), "tokenizer.source"),
                             {str(token): self.token(setting, f"tokenizer.tokens[{token!r}]")
                              for token, setting in tokens.items()}, pad or None)

    def vocabulary_source(self, value, where: str) -> str | Path:
        if value in ("union", "base"):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{self.path}: {where} must be 'union', 'base' or a model, got {value!r}")
        return self.model(value, where)

    def token(self, setting, where: str) -> tuple[TokenSource, bool]:
        """A token's ``{source, force}``: its embedding's source and whether every model takes it."""
        setting = {} if setting is None else setting
        if not isinstance(setting, dict):
            raise ConfigError(f"{self.path}: {where} must be a mapping with source and force")
        self.keys(setting, {"source", "force"}, where)
        force = setting.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{self.path}: {where}.force must be true or false, got {force!r}")
        source = setting.get("source")
        if source is None:
            return TokenSource(None), force
        if isinstance(source, str):
            return TokenSource("model", self.model(source, f"{where}.source")), force
        kind = source.get("kind") if isinstance(source, dict) else None
        if kind == "zero":
            return TokenSource("zero"), force
        if kind != "model_token":
            raise ConfigError(f"{self.path}: {where}.source must be a model, {{kind: zero}} or {{kind: model_token, "
                              f"model: ..., token: ... | token_id: ...}}, got {source!r}")
        token, token_id = source.get("token"), source.get("token_id")
        if (token is None) == (token_id is None) or "model" not in source:
            raise ConfigError(f"{self.path}: {where}.source (model_token) needs a model and exactly one of token and "
                              "token_id")
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
            raise ConfigError(f"{self.path}: {where}.source.token_id must be a whole number, got {token_id!r}")
        model = self.model(source["model"], f"{where}.source.model")
        return TokenSource("model_token", model, None if token is None else str(token), token_id), force


def _chat_template(value, path: Path) -> str | None:
    """``chat_template``: one of mergekit's named templates, ``'auto'``, or a Jinja template."""
    from jaxmerge.cli.chat_templates import TEMPLATES

    if value is None or value == "":
        return None
    if not isinstance(value, str) or (value not in TEMPLATES and value != "auto"
                                      and (len(value) < 20 or "{" not in value)):
        raise ConfigError(f"{path}: chat_template must be one of {', '.join(sorted(TEMPLATES))}, 'auto' or a Jinja "
                          f"template, got {value!r}")
    return value


def load_config(path: str | Path, *, adapted: AdaptedModels | None = None) -> MergeConfig:
    """Read and check a YAML config.

    Args:
      path: the config file.
      adapted: collects the models named with an adapter (``model+adapter``), to apply before
        merging (:mod:`jaxmerge.cli.adapted`); default: such models are refused.

    Raises:
      ConfigError: one line naming the key or the path at fault.
    """
    path = Path(path)
    raw, text = _read(path)
    try:
        record = method(str(raw.get("merge_method")))
    except JaxmergeError as error:
        raise ConfigError(f"{path}: {error}") from None
    reader = _Reader(path, record, adapted or AdaptedModels(None))
    reader.ignored += [f"the config key {key!r} is not read: ignored" for key in raw if key not in TOP_LEVEL]
    base = reader.model(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    if record.statistics and "slices" in raw:
        raise ConfigError(f"{path}: {record.name} merges whole models by their statistics; use 'models', not 'slices'")
    if "models" in raw:
        slices = [_models_slice(reader, raw["models"], base)]
    else:
        slices = _slices(reader, raw["slices"])
    return MergeConfig(record, base, slices, "slices" in raw,
                       reader.parameters(raw.get("parameters"), "parameters", per_model=False),
                       parse_dtype(raw.get("dtype"), "dtype"), parse_dtype(raw.get("out_dtype"), "out_dtype"), text,
                       reader.ignored, reader.tokenizer(raw), _chat_template(raw.get("chat_template"), path))


def _models_slice(reader: _Reader, entries, base: Path | None) -> Slice:
    """A ``models`` config as one slice of whole models, the base added unless listed (as in mergekit)."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{reader.path}: 'models' must be a non-empty list of {{model: path, parameters: ...}}")
    sources = [reader.source(entry, f"models[{i}]", layers=False) for i, entry in enumerate(entries)]
    if base is not None and all(s.model.resolve() != base.resolve() for s in sources):
        sources.append(Source(base, f"base_model ({base})", None, {}))
    return Slice(sources, None, {})


def _slices(reader: _Reader, entries) -> list[Slice]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{reader.path}: 'slices' must be a non-empty list of {{sources: [...]}}")
    slices = []
    for i, entry in enumerate(entries):
        where = f"slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise ConfigError(f"{reader.path}: {where} needs a non-empty 'sources' list")
        reader.keys(entry, {"sources", "base_model", "parameters", "residual_weight"}, where)
        sources = [reader.source(s, f"{where}.sources[{j}]", layers=True) for j, s in enumerate(entry["sources"])]
        lengths = {s.layers[1] - s.layers[0] for s in sources}
        if len(lengths) > 1:
            raise ConfigError(f"{reader.path}: the sources of {where} must hold the same number of layers, got "
                              f"{', '.join(str(s.layers[1] - s.layers[0]) for s in sources)}")
        base = reader.model(entry["base_model"], f"{where}.base_model") if entry.get("base_model") else None
        slices.append(Slice(sources, base, reader.parameters(entry.get("parameters"), f"{where}.parameters",
                                                             per_model=False)))
    return slices
