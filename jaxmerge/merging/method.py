"""Merge methods as records: one definition per method, from which everything else is derived.

A :class:`Method` holds what a merge method is: its name (mergekit's, used in configs), its
hyperparameters (:class:`Param`: scope, valid range or choices, config key), its base
policy, the *plan* that turns a tree and resolved hyperparameters into a leaf function, and
its references. The public Python function, its argument checks, the ``jaxmerge merge``
config entry, ``jaxmerge methods`` and the conformance tests are all derived from it.

A method is defined by decorating its public function with :func:`merge_method`. The
function's signature holds the defaults (each stated once: there, or in the :class:`Param`
where the signature says ``None``, as for ``weights``) and its docstring the
documentation; its body is that docstring only, since the record implements it: bind the
arguments, check the trees and the hyperparameters, plan, and run the leafwise driver.

Hyperparameter scopes:

- ``'model'``: one per-leaf value per model (``weights``, ``density``, ``gamma``);
- ``'leaf'``: one per-leaf value for the whole merge (``lambda_``, ``t``, ``alpha``);
- ``'option'``: one plain value (``normalize``, ``majority_sign``, ``key``).

Base policies: ``'required'`` and ``'optional'`` (the function takes ``base, models``),
``'none'`` (``models``) and ``'pair'`` (``a, b``; in a config, the ``base_model`` and one
other model).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal

from jaxmerge import _hyper
from jaxmerge._driver import TreeSink, TreeSource, TreeStore, run
from jaxmerge._hyper import REQUIRED, Levels, Range, Resolver
from jaxmerge._tree import LeafFn, PyTree, TreeSpec
from jaxmerge.errors import JaxmergeError

Scope = Literal["model", "leaf", "option"]
BasePolicy = Literal["required", "optional", "none", "pair"]
_TREE_ARGUMENTS = {"required": ("base", "models"), "optional": ("base", "models"), "none": ("models",),
                   "pair": ("a", "b")}


@dataclasses.dataclass(frozen=True)
class Param:
    """One hyperparameter of a merge method.

    Attributes:
      name: the Python keyword (``lambda_``).
      scope: ``'model'``, ``'leaf'`` or ``'option'`` (see the module docstring).
      doc: one line for ``jaxmerge methods``.
      check: the range a number must lie in.
      choices: the values an option may take.
      config_choices: the values a config may give it, where fewer than ``choices`` (mergekit's
        ``rescale`` is a boolean).
      kind: the type of an option: ``bool``, ``int``, ``float`` (may be traced) or None (any).
      config: its key in merge configs: ``''`` for the name without a trailing ``_``,
        None when configs cannot set it.
      config_required: configs must set it (mergekit gives it no default).
      sequence: Python takes it as one entry per model (``weights``).
      default: the default, read from the function's signature; given here only for a
        parameter that exists in configs alone or that the signature leaves ``None``.
    """

    name: str
    scope: Scope
    doc: str
    check: Range | None = None
    choices: tuple | None = None
    config_choices: tuple | None = None
    kind: type | None = None
    config: str | None = ""
    config_required: bool = False
    sequence: bool = False
    default: Any = REQUIRED

    @property
    def key(self) -> str | None:
        """The config key, or None."""
        return self.name.rstrip("_") if self.config == "" else self.config

    def checked_option(self, value, where: str, config: bool = False):
        """``value`` after checking it is a valid setting of this option (named ``where``; from a
        config with ``config``)."""
        choices = self.allowed_choices(config)
        if choices is not None:
            if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
                raise JaxmergeError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            return value
        if self.kind is bool and not isinstance(value, bool):
            raise TypeError(f"{where} must be a boolean, got {value!r}")
        if self.kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{where} must be an integer, got {value!r}")
        if self.kind is int:
            _hyper.checked(value, where, self.check)
        if self.kind is float:
            return _hyper.checked(value, where, self.check)
        return value

    def allowed_choices(self, config: bool = False) -> tuple | None:
        """The values an option may take (in a config, with ``config``), or None if any of its kind."""
        return self.config_choices if config and self.config_choices is not None else self.choices

    def describe(self, config: bool = False) -> str:
        """``name=default`` with its range or choices, for listings (of configs, with ``config``)."""
        required = self.default is REQUIRED or (config and self.config_required)
        default = "required" if required else repr(self.default)
        allowed = f" in {self.check}" if self.check else ""
        choices = self.allowed_choices(config)
        if choices:
            allowed = f" one of {', '.join(map(repr, choices))}"
        return f"{self.key if config else self.name}={default}{allowed}"


Settings = dict  # name -> Levels (model and leaf scopes) or the plain value (options)
Plan = Callable[..., LeafFn]  # plan(spec, hp) or plan(spec, hp, statistics) -> leaf_fn(i, base, leaves)


@dataclasses.dataclass(frozen=True)
class Method:
    """A merge method's record (see the module docstring).

    Attributes:
      name: mergekit's name for it (``'linear'`` for :func:`jaxmerge.average`).
      function: the public Python function.
      params: its hyperparameters.
      base: the base policy.
      plan: ``plan(spec, hp[, statistics]) -> leaf_fn``; ``hp`` maps each parameter name to
        its resolved value (per-leaf lists for model and leaf scopes, the value for options).
      references: arXiv ids.
      min_models, max_models: how many models (not counting a base) it merges.
      statistics: the name of its per-model statistics argument (``'fishers'``), if any.
    """

    name: str
    function: Callable
    params: tuple[Param, ...]
    base: BasePolicy
    plan: Plan
    references: tuple[str, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    statistics: str | None = None

    @property
    def summary(self) -> str:
        return inspect.getdoc(self.function).splitlines()[0]

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def python_settings(self, hyperparameters: dict) -> Settings:
        """Settings from the keyword arguments of the Python function (``None``: the default).

        Raises:
          TypeError: a keyword the function does not take.
        """
        allowed = {p.name for p in self.params if p.name in inspect.signature(self.function).parameters}
        if unknown := sorted(set(hyperparameters) - allowed):
            raise TypeError(f"{self.function.__name__}() got an unexpected keyword argument {unknown[0]!r}")
        settings = {}
        for p in self.params:
            value = hyperparameters.get(p.name)
            if p.scope == "option":
                settings[p.name] = value
                continue
            try:
                settings[p.name] = _hyper.python_levels(value, sequence=p.sequence)
            except TypeError as error:
                raise TypeError(f"{p.name} {error} ({self.name})") from None
        return settings

    def resolve(self, spec: TreeSpec, settings: Settings, model_names: Sequence[str], *, config: bool = False,
                positions: Sequence[float] | None = None, input_paths: Sequence[Sequence[str]] | None = None) -> dict:
        """Every hyperparameter checked and resolved against ``spec``: per-leaf lists for the
        model and leaf scopes, the checked value for options, and ``'exact'``, whether to compute
        as mergekit does in the models' dtype (:func:`~jaxmerge._tree.compute_dtype`). With
        ``config`` (a merge config's plan), errors name the config keys, the parameters configs
        must set have no default, and the arithmetic is mergekit's; ``positions`` are the
        leaves' layer positions for gradients (default: read from their paths), ``input_paths``
        per model the names its leaves are read under, which its own settings' filters match
        (default: the leaf paths)."""
        resolver = Resolver(spec, positions, input_paths)
        hp = {}
        for p in self.params:
            value, name = settings.get(p.name), (p.key or p.name) if config else p.name
            levels = value if value is not None else Levels()
            default = REQUIRED if config and p.config_required and p.key is not None else p.default
            if p.scope == "option":
                if value is None and p.default is REQUIRED:
                    raise JaxmergeError(f"{self.name} needs {name}: {p.doc}")
                hp[p.name] = p.checked_option(p.default if value is None else value, name, config)
            elif p.scope == "leaf":
                hp[p.name] = resolver.leafwise(levels.shared, name, default, p.check)
            else:
                hp[p.name] = resolver.per_model(levels, name, model_names, default, p.check)
        hp["exact"] = config
        return hp

    def check_models(self, num_models: int, has_base: bool) -> None:
        """Raise unless the base policy and the model count allow this many models."""
        if self.base == "required" and not has_base:
            raise JaxmergeError(f"{self.name} needs a base model (base is None)")
        if num_models < self.min_models or (self.max_models is not None and num_models > self.max_models):
            wanted = (f"exactly {self.min_models}" if self.min_models == self.max_models
                      else f"at most {self.max_models}" if num_models >= self.min_models
                      else f"at least {self.min_models}")
            raise JaxmergeError(f"{self.name} merges {wanted} model{'s' if wanted[-2:] != ' 1' else ''}, "
                                f"got {num_models}")

    def leaf_fn(self, spec: TreeSpec, settings: Settings, statistics: Sequence | None = None,
                model_names: Sequence[str] | None = None, *, config: bool = False,
                positions: Sequence[float] | None = None, input_paths: Sequence[Sequence[str]] | None = None) -> LeafFn:
        """The leaf function of this method on ``spec``, after checking everything (see
        :meth:`resolve` for ``config``, ``positions`` and ``input_paths``)."""
        self.check_models(spec.num_models, spec.has_base)
        names = model_names or [f"models[{j}]" for j in range(spec.num_models)]
        hp = self.resolve(spec, settings, names, config=config, positions=positions, input_paths=input_paths)
        if self.statistics is None:
            return self.plan(spec, hp)
        if not isinstance(statistics, (list, tuple)) or len(statistics) != spec.num_models:
            count = len(statistics) if isinstance(statistics, (list, tuple)) else type(statistics).__name__
            raise JaxmergeError(f"{self.statistics} must be a list with one statistics tree per model "
                                f"({spec.num_models}), got {count}")
        return self.plan(spec, hp, statistics)

    def merge(self, models: Sequence[PyTree], *, base: PyTree | None = None, statistics: Sequence | None = None,
              names: Sequence[str] | None = None, **hyperparameters) -> PyTree:
        """This method on in-memory pytrees: the uniform entry behind its public function.

        Args:
          models: the models (for a ``'pair'`` method, the two of them).
          base: the base model, for methods that take one.
          statistics: one statistics tree per model, for methods that take them.
          names: the models' names in error messages (default ``models[i]``).
          **hyperparameters: as the public function takes them.
        """
        if base is not None and self.base in ("none", "pair"):
            raise JaxmergeError(f"{self.name} takes no base model")
        source = TreeSource(models, base, names=names)
        stores = None if statistics is None else [TreeStore(tree) for tree in statistics]
        leaf_fn = self.leaf_fn(source.spec, self.python_settings(hyperparameters), stores, names)
        return run(source.spec, leaf_fn, source, TreeSink(source.spec))


REGISTRY: dict[str, Method] = {}


def merge_method(name: str, *, base: BasePolicy, params: Sequence[Param], plan: Plan,
                 references: Sequence[str] = (), min_models: int = 1, max_models: int | None = None,
                 statistics: str | None = None) -> Callable[[Callable], Callable]:
    """Register the decorated public function as merge method ``name``, implemented by its record.

    The function's signature gives each parameter's default; its trees come first
    (see the module docstring), then one argument per :class:`Param`.
    """
    def register(function: Callable) -> Callable:
        signature = inspect.signature(function)
        trees = _TREE_ARGUMENTS[base] + ((statistics,) if statistics else ())
        declared = {n for n in signature.parameters if n not in trees}
        unknown = declared - {p.name for p in params}
        config_only = [p.name for p in params if p.name not in declared and (p.config is None or p.default is REQUIRED)]
        if unknown or config_only:
            raise TypeError(f"{name}: the signature and the record disagree on {sorted(unknown) or config_only}")
        @functools.wraps(function)
        def merge(*args, **kwargs):
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError as error:
                raise TypeError(f"{function.__name__}() {error}") from None
            stats = arguments.pop(statistics) if statistics else None
            if base == "pair":
                return method.merge([arguments.pop("a"), arguments.pop("b")], **arguments)
            base_tree = arguments.pop("base", None)
            return method.merge(arguments.pop("models"), base=base_tree, statistics=stats, **arguments)

        filled = tuple(dataclasses.replace(p, default=_signature_default(signature, p)) for p in params)
        counts = (2, 2) if base == "pair" else (min_models, max_models)
        method = Method(name, merge, filled, base, plan, tuple(references), *counts, statistics)
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice")
        REGISTRY[name] = method
        merge.method = method
        return merge
    return register


def _signature_default(signature: inspect.Signature, param: Param):
    """The default in the signature; a ``None`` there defers to the record's (``weights``: 1.0)."""
    parameter = signature.parameters.get(param.name)
    if parameter is None or (parameter.default is None and param.default is not REQUIRED):
        return param.default
    return REQUIRED if parameter.default is inspect.Parameter.empty else parameter.default


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """A merge method with its hyperparameters, not yet applied to any models.

    Made by :func:`plan` (from Python keyword arguments) or from a merge config
    (``config=True``: errors name config keys, and parameters that configs must set have
    no default); the streamed driver (:func:`jaxmerge.checkpoints.stream_merge`) applies it
    to checkpoints.

    Attributes:
      method: the method's record.
      settings: its hyperparameters' settings, unresolved (see :class:`~jaxmerge._hyper.Levels`).
      config: whether the settings came from a merge config.

    Examples:
      >>> import jaxmerge
      >>> p = jaxmerge.plan("linear", weights=[3.0, 1.0])
      >>> isinstance(p, jaxmerge.MergePlan), p.method.function is jaxmerge.average
      (True, True)
    """

    method: Method
    settings: Settings
    config: bool = False

    def leaf_fn(self, spec: TreeSpec, statistics: Sequence | None = None, model_names: Sequence[str] | None = None,
                positions: Sequence[float] | None = None, input_paths: Sequence[Sequence[str]] | None = None) -> LeafFn:
        return self.method.leaf_fn(spec, self.settings, statistics, model_names, config=self.config,
                                   positions=positions, input_paths=input_paths)


def method(name_or_function) -> Method:
    """The record of a merge method, by mergekit name (``'ties'``) or public function."""
    if callable(name_or_function):
        found = getattr(name_or_function, "method", None)
        if found is None:
            raise JaxmergeError(f"{name_or_function!r} is not a merge method")
        return found
    if name_or_function not in REGISTRY:
        raise JaxmergeError(f"unknown merge method {name_or_function!r}; one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name_or_function]


def plan(method_: str | Callable, **hyperparameters) -> MergePlan:
    """A merge method and its hyperparameters, for :func:`jaxmerge.checkpoints.stream_merge`.

    The hyperparameters are those of the method's Python function (the trees excluded),
    checked against the tensors when the plan is applied.

    Args:
      method_: the method's mergekit name (``'ties'``, ``'linear'``) or its public function
        (``jaxmerge.ties``).
      **hyperparameters: keyword arguments of that function.

    Returns:
      A :class:`MergePlan`.

    Raises:
      JaxmergeError: an unknown method. TypeError: a keyword the method does not take.

    Examples:
      >>> import jaxmerge
      >>> p = jaxmerge.plan("ties", weights=[1.0, 0.5], density=0.2)
      >>> p.method.name, p.method.function.__name__
      ('ties', 'ties')
    """
    record = method(method_)
    return MergePlan(record, record.python_settings(hyperparameters))


WEIGHTS = Param("weights", "model", "each model's weight", sequence=True, config="weight", config_required=True,
                default=1.0)
LAMBDA = Param("lambda_", "leaf", "scale of the merged task vector")
