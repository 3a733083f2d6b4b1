"""mergekit-style YAML merge configs, turned into a :class:`~jaxmerge.merging.method.MergePlan`.

A config names a ``merge_method``, the ``models`` (each with optional ``parameters``), an
optional ``base_model``, global ``parameters``, and ``dtype``/``out_dtype``. Which
parameters a method takes, their defaults and ranges, and whether it needs a base all
come from the method's record (:mod:`jaxmerge.merging.method`); the values are resolved
per tensor by the same resolver as the Python functions' (:mod:`jaxmerge._hyper`): the
model's own setting, else the global one, else the default, with mergekit's fall-through
when no filter matches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import yaml

from jaxmerge._hyper import Levels
from jaxmerge.errors import ConfigError
from jaxmerge.merging import methods
from jaxmerge.merging.method import MergePlan, Method, Param

TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
IGNORED = {"tokenizer_source", "tokenizer", "chat_template", "name"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
STATISTICS = "statistics"  # the per-model parameter naming a model's statistics checkpoint
_TRUE, _FALSE = {"1", "on", "t", "true", "y", "yes"}, {"0", "off", "f", "false", "n", "no"}


def _coerce(param: Param, value):
    """A config value as mergekit's validation (pydantic's lax mode) reads it: numeric strings
    (YAML reads ``1e-6`` as a string) are numbers, and ``'true'``/``'no'``/``1``-style values of
    boolean options are booleans. Lists and ``{filter, value}`` entries are read inside."""
    if isinstance(value, list):
        return [_coerce(param, v) for v in value]
    if isinstance(value, dict):
        return {k: _coerce(param, v) if k == "value" else v for k, v in value.items()}
    if param.kind is bool and (isinstance(value, int) or isinstance(value, str)) and not isinstance(value, bool):
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
class MergeConfig:
    """A parsed config: the method, the model paths (relative paths resolved against the
    working directory, then the config's directory), and the settings."""

    method: Method
    base: Path | None
    models: list[Path]
    model_labels: list[str]
    model_settings: list[dict]
    global_settings: dict
    statistics: list[Path] | None
    dtype: str | None
    out_dtype: str | None
    text: str

    def plan(self, seed: int) -> MergePlan:
        """The merge plan, random methods drawing from ``jax.random.key(seed)``."""
        settings = {}
        for p in self.method.params:
            given = [_coerce(p, s[p.key]) for s in [self.global_settings] if p.key in s]
            if p.key is None:
                settings[p.name] = jax.random.key(seed) if p.name == "key" else None
            elif p.scope == "option":
                settings[p.name] = given[0] if given else None
            elif p.scope == "leaf":
                settings[p.name] = Levels(shared=tuple(given))
            else:
                own = tuple(((_coerce(p, s[p.key]),) if p.key in s else ()) for s in self.model_settings)
                settings[p.name] = Levels(shared=tuple(given), per_model=own)
        return MergePlan(self.method, settings, config=True)


def _resolve(path: str, config_dir: Path, where: str) -> Path:
    candidate = Path(path).expanduser()
    for option in (candidate, config_dir / candidate):
        if option.exists():
            return option
    raise ConfigError(f"{where}: path {path!r} does not exist")


def _dtype(value, key: str) -> str | None:
    if value is None:
        return None
    if str(value) not in DTYPES:
        raise ConfigError(f"{key} must be one of {sorted(set(DTYPES.values()))}, got {value!r}")
    return DTYPES[str(value)]


def _read(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping with merge_method and models")
    for key in raw:
        if key in ("slices", "modules"):
            raise ConfigError(f"{path}: {key!r} configs are not supported; list whole models under 'models'")
        if key not in TOP_LEVEL | IGNORED:
            raise ConfigError(f"{path}: unknown config key {key!r}")
    return raw, text


def load_config(path: str | Path) -> MergeConfig:
    """Read and check a YAML config (one-line :class:`~jaxmerge.errors.ConfigError` naming the key otherwise)."""
    path = Path(path)
    raw, text = _read(path)
    registry = methods()
    if raw.get("merge_method") not in registry:
        raise ConfigError(f"{path}: unknown merge_method {raw.get('merge_method')!r}; one of {', '.join(registry)}")
    method = registry[raw["merge_method"]]
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'models' must be a non-empty list of {{model: path, parameters: ...}}")
    base = raw.get("base_model")
    base_path = _resolve(str(base), path.parent, "base_model") if base is not None else None
    models, labels, settings, statistics = [], [], [], []
    for i, entry in enumerate(entries):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{path}: models[{i}] needs a 'model' key")
        model_path = _resolve(str(entry["model"]), path.parent, f"models[{i}]")
        parameters = dict(entry.get("parameters") or {})
        _check_names(parameters, method, f"models[{i}].parameters", path, per_model=True)
        if base_path is not None and model_path.resolve() == base_path.resolve() and method.base != "none":
            continue  # the base is not one of the merged task vectors, as in mergekit
        if method.statistics:
            if STATISTICS not in parameters:
                raise ConfigError(f"{path}: models[{i}] needs a 'statistics' parameter naming its statistics "
                                  f"checkpoint ({method.name} merges by them)")
            statistics.append(_resolve(str(parameters.pop(STATISTICS)), path.parent, f"models[{i}].statistics"))
        models.append(model_path)
        labels.append(f"models[{i}] ({entry['model']})")
        settings.append(parameters)
    global_settings = raw.get("parameters") or {}
    _check_names(global_settings, method, "parameters", path, per_model=False)
    _check_base(method, base_path, len(models), path)
    return MergeConfig(method, None if method.base == "none" else base_path, models, labels, settings,
                       global_settings, statistics if method.statistics else None, _dtype(raw.get("dtype"), "dtype"),
                       _dtype(raw.get("out_dtype"), "out_dtype"), text)


def _check_base(method: Method, base_path: Path | None, count: int, path: Path) -> None:
    if method.base in ("required", "pair") and base_path is None:
        raise ConfigError(f"{path}: merge_method {method.name!r} needs a base_model")
    if method.base == "pair" and count != 1:
        raise ConfigError(f"{path}: {method.name} merges the base_model with exactly one other model, got {count}")


def _check_names(parameters, method: Method, where: str, path: Path, per_model: bool) -> None:
    if not isinstance(parameters, dict):
        raise ConfigError(f"{path}: {where} must be a mapping")
    known = {p.key for p in method.params if p.key is not None and (p.scope == "model" or not per_model)}
    known |= {STATISTICS} if method.statistics and per_model else set()
    for name in parameters:
        if name not in known:
            raise ConfigError(f"{path}: {where} has the parameter {name!r}, which merge_method {method.name!r} does "
                              f"not take (it takes {', '.join(sorted(known)) or 'none'})")
