"""mergekit-style YAML merge configs, turned into a streaming merge.

A config names a ``merge_method``, the ``models`` (each with optional ``parameters``), an
optional ``base_model``, global ``parameters``, and ``dtype``/``out_dtype``. A parameter is
looked up per tensor as mergekit does: the model's own setting, else the global one, else
the method's default; a setting is a number, a layer gradient (a list of numbers), or a
list of ``{filter, value}`` conditions matched by substring of the tensor name (first
match wins; a condition that matches nothing falls through to the next level).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import yaml

from jaxmerge._hyper import PerModel, gradient_value, layer_positions, per_model
from jaxmerge._tree import TreeSpec
from jaxmerge.checkpoints.errors import CheckpointError
from jaxmerge.merging.karcher import karcher_plan
from jaxmerge.merging.linear import average_plan
from jaxmerge.merging.magmax import magmax_plan
from jaxmerge.merging.model_stock import model_stock_plan
from jaxmerge.merging.sce import sce_plan
from jaxmerge.merging.slerp import slerp_plan
from jaxmerge.merging.task_vectors import task_vector_plan

REQUIRED = object()
TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
IGNORED = {"tokenizer_source", "tokenizer", "chat_template", "name"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def evaluate_setting(setting, tensor: str, t: float):
    """A mergekit parameter setting's value for one tensor (``None`` if no condition matches)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return gradient_value(setting, t)
        for condition in setting:
            if not isinstance(condition, dict) or "value" not in condition:
                raise CheckpointError("a parameter list must hold numbers or {filter, value} entries, "
                                      f"got {condition!r}")
            pattern = condition.get("filter")
            if pattern in (None, "*") or pattern in tensor:
                return evaluate_setting(condition["value"], tensor, t)
        return None
    return setting


@dataclasses.dataclass(frozen=True)
class Method:
    """How a config method maps onto a plan: its per-model and global parameters with
    defaults (``REQUIRED`` if none), whether it needs a base, and the plan builder."""
    build: Callable
    model_params: dict
    global_params: dict
    base: str  # "required", "ignored" or "pair" (slerp: base and one other model)


def _task_vectors(method=None, consensus=None, normalize=False, rescale=False, extra=()):
    """A generalized task-arithmetic method: per-model ``weight`` (and, with a sparsifier,
    ``density`` and the ``extra`` per-model parameters), global normalize/rescale/lambda."""
    params = {"weight": REQUIRED, **({"density": 1.0, **dict(extra)} if method else {})}

    def build(spec, p, key, name):
        sparsifier = {k: p.models(k) for k in params if k != "weight"}
        return task_vector_plan(spec, p.models("weight"), lambda_=p.leaf("lambda"), normalize=p.scalar("normalize"),
                                method=method, consensus=consensus, rescale=p.scalar("rescale"), key=key, name=name,
                                **sparsifier)
    defaults = {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
    return Method(build, params, defaults, "required")


METHODS = {
    "linear": Method(lambda spec, p, key, name: average_plan(spec, p.models("weight"), normalize=p.scalar("normalize")),
                     {"weight": REQUIRED}, {"normalize": True}, "ignored"),
    "slerp": Method(lambda spec, p, key, name: slerp_plan(spec, p.leaf("t")), {}, {"t": REQUIRED}, "pair"),
    "task_arithmetic": _task_vectors(),
    "ties": _task_vectors("magnitude", "sum", normalize=True),
    "dare_ties": _task_vectors("random", "sum", rescale=True),
    "dare_linear": _task_vectors("random", None, rescale=True),
    "breadcrumbs": _task_vectors("breadcrumbs", None, extra=[("gamma", 0.01)]),
    "breadcrumbs_ties": _task_vectors("breadcrumbs", "sum", extra=[("gamma", 0.01)]),
    "della": _task_vectors("della", "sum", normalize=True, rescale=True, extra=[("epsilon", 0.15)]),
    "della_linear": _task_vectors("della", None, rescale=True, extra=[("epsilon", 0.15)]),
    "model_stock": Method(lambda spec, p, key, name: model_stock_plan(spec, filter_wise=p.scalar("filter_wise")),
                          {}, {"filter_wise": False}, "required"),
    "magmax": Method(lambda spec, p, key, name: magmax_plan(spec, lambda_=p.leaf("lambda")), {}, {"lambda": 1.0},
                     "required"),
    "sce": Method(lambda spec, p, key, name: sce_plan(spec, select_topk=p.leaf("select_topk")), {},
                  {"select_topk": 1.0, "int8_mask": False}, "required"),
    "karcher": Method(lambda spec, p, key, name: karcher_plan(spec, max_iter=int(p.scalar("max_iter")),
                                                              tol=p.scalar("tol")),
                      {}, {"max_iter": 10, "tol": 1e-5}, "ignored"),
}


class _Parameters:
    """Per-tensor lookup of a config's parameters against one spec (mergekit precedence)."""

    def __init__(self, method: Method, model_settings: list[dict], global_settings: dict, spec: TreeSpec,
                 model_names: list[str]):
        self.method, self.models_, self.globals_ = method, model_settings, global_settings
        self.positions = dict(zip(spec.paths, layer_positions(spec.keys)))
        self.model_names = model_names

    def _default(self, name: str):
        defaults = {**self.method.global_params, **self.method.model_params}
        return defaults[name]

    def _lookup(self, name: str, settings: list[dict], path: str, where: str):
        for level in settings:
            if name in level:
                value = evaluate_setting(level[name], path, self.positions[path])
                if value is not None:
                    return value
        default = self._default(name)
        if default is REQUIRED:
            raise CheckpointError(f"missing required parameter {name!r} for {where} at tensor {path!r}")
        return default

    def models(self, name: str) -> PerModel:
        """One per-leaf function per model: its own setting, else the global one, else the
        default (marked per model, with the models' names for error messages)."""
        return per_model(*[lambda path, leaf, j=j: self._lookup(name, [self.models_[j], self.globals_], path,
                                                                self.model_names[j])
                           for j in range(len(self.models_))], names=self.model_names)

    def leaf(self, name: str) -> Callable:
        return lambda path, leaf: self._lookup(name, [self.globals_], path, "the merge")

    def scalar(self, name: str):
        """A global, non-per-tensor parameter, of the default's type (bool, int or number)."""
        default = self._default(name)
        value = self.globals_.get(name, default)
        kinds = {bool: ((bool,), "a boolean"), int: ((int,), "an integer"), float: ((int, float), "a number")}
        types, described = kinds[type(default)]
        if not isinstance(value, types) or (type(default) is not bool and isinstance(value, bool)):
            raise CheckpointError(f"parameter {name!r} must be {described}, got {value!r}")
        return value


@dataclasses.dataclass
class MergeConfig:
    """A parsed config: the method, the model paths (relative paths resolved against the
    working directory, then the config's directory), and the settings."""
    method_name: str
    base: Path | None
    models: list[Path]
    model_labels: list[str]
    model_settings: list[dict]
    global_settings: dict
    dtype: str | None
    out_dtype: str | None
    text: str

    @property
    def method(self) -> Method:
        return METHODS[self.method_name]

    def plan(self, seed: int) -> Callable[[TreeSpec], Callable]:
        def build(spec: TreeSpec):
            parameters = _Parameters(self.method, self.model_settings, self.global_settings, spec,
                                     self.model_labels)
            return self.method.build(spec, parameters, jax.random.key(seed), self.method_name)
        return build


def _resolve(path: str, config_dir: Path, where: str) -> Path:
    candidate = Path(path).expanduser()
    for option in (candidate, config_dir / candidate):
        if option.exists():
            return option
    raise CheckpointError(f"{where}: model path {path!r} does not exist")


def _dtype(value, key: str) -> str | None:
    if value is None:
        return None
    if str(value) not in DTYPES:
        raise CheckpointError(f"{key} must be one of {sorted(set(DTYPES.values()))}, got {value!r}")
    return DTYPES[str(value)]


def load_config(path: str | Path) -> MergeConfig:
    """Read and check a YAML config (one-line ``CheckpointError`` naming the key otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config file does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CheckpointError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: a config is a mapping with merge_method and models")
    for key in raw:
        if key in ("slices", "modules"):
            raise CheckpointError(f"{path}: {key!r} configs are not supported; list whole models under 'models'")
        if key not in TOP_LEVEL | IGNORED:
            raise CheckpointError(f"{path}: unknown config key {key!r}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise CheckpointError(f"{path}: unknown merge_method {method!r}; one of {', '.join(sorted(METHODS))}")
    spec = METHODS[method]
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise CheckpointError(f"{path}: 'models' must be a non-empty list of {{model: path, parameters: ...}}")
    config_dir = path.parent
    base = raw.get("base_model")
    base_path = _resolve(str(base), config_dir, "base_model") if base is not None else None
    models, labels, settings = [], [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise CheckpointError(f"{path}: models[{i}] needs a 'model' key")
        model_path = _resolve(str(entry["model"]), config_dir, f"models[{i}]")
        parameters = entry.get("parameters") or {}
        _check_names(parameters, spec, f"models[{i}].parameters", path, per_model_only=True)
        if base_path is not None and model_path.resolve() == base_path.resolve() and spec.base != "ignored":
            continue  # the base is not one of the merged task vectors, as in mergekit
        models.append(model_path)
        labels.append(f"models[{i}] ({entry['model']})")
        settings.append(parameters)
    global_settings = raw.get("parameters") or {}
    _check_names(global_settings, spec, "parameters", path, per_model_only=False)
    if spec.base in ("required", "pair") and base_path is None:
        raise CheckpointError(f"{path}: merge_method {method!r} needs a base_model")
    if spec.base == "pair" and len(models) != 1:
        raise CheckpointError(f"{path}: slerp merges the base_model with exactly one other model, got {len(models)}")
    if spec.base == "ignored" and base_path is not None:
        base_path = None
    return MergeConfig(method, base_path, models, labels, settings, global_settings, _dtype(raw.get("dtype"), "dtype"),
                       _dtype(raw.get("out_dtype"), "out_dtype"), text)


def _check_names(parameters, method: Method, where: str, path: Path, per_model_only: bool) -> None:
    if not isinstance(parameters, dict):
        raise CheckpointError(f"{path}: {where} must be a mapping")
    known = set(method.model_params) | (set() if per_model_only else set(method.global_params))
    for name in parameters:
        if name not in known:
            raise CheckpointError(f"{path}: {where} has the parameter {name!r}, which this merge_method does not "
                                  f"take (it takes {', '.join(sorted(known)) or 'none'})")
