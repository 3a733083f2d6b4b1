"""Per-leaf hyperparameters: the one resolver behind every merge function and every merge config.

A hyperparameter *setting* takes any of these forms:

- a **scalar**: the same value for every leaf;
- a **callable** ``fn(path, leaf) -> scalar``, where ``path`` is the leaf's path joined with
  ``/`` (``'params/Dense_0/kernel'``) and ``leaf`` is the reference model's leaf (a
  ``jax.ShapeDtypeStruct`` in streamed checkpoint merges);
- a **pytree of scalars** matched to the model by path: each of its leaves applies to the
  model leaves at or below its path, so it may be a prefix of the model
  (``{'encoder': 0.3, 'decoder': 0.7}``). Container types need not match: a plain dict
  works for an ``nnx.State``. Every entry must cover some leaf;
- a **list of numbers**, mergekit's layer *gradient*: anchor values spread evenly from the
  first to the last layer and linearly interpolated in between (see :func:`layer_positions`);
- a **list of** ``{'filter': str, 'value': v}`` **dicts**, mergekit's conditional form: the
  first entry whose ``filter`` is a substring of the leaf's path (or whose filter is
  missing or ``'*'``) gives the value, itself a scalar or a gradient.

**Precedence.** A hyperparameter is resolved from :class:`Levels`, settings in order of
precedence: a model's own setting, then the merge-wide one (in a config: the model's
``parameters``, then the global ``parameters``). The first level that gives a value for a
leaf wins; a level gives none where its filters all miss, where its pytree does not reach
the leaf, or where its callable returns ``None``; the method's default applies when no level
does, and a hyperparameter without a default is then an error. This is mergekit's rule.

Because a list of numbers means a gradient, a model whose top level is a list cannot take
a pytree-valued hyperparameter; use a callable there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxmerge._layers import LayerStack
from jaxmerge._tree import TreeSpec, flatten_with_keys, path_str
from jaxmerge.errors import JaxmergeError

REQUIRED = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()
"""The default of a hyperparameter that has none: some level must set it."""


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def _is_conditional(x) -> bool:
    return isinstance(x, dict) and "value" in x and set(x) <= {"filter", "value"}


def _is_plain(value) -> bool:
    return (hasattr(value, "shape") or _is_number(value) or value is None
            or isinstance(value, (bool, str, bytes, complex)))


def runtime_check(ok: jax.Array, message: str, *values) -> None:
    """Fail with ``message`` (followed by ``values``) when ``ok`` is False at run time, under
    :func:`jaxmerge.checked`; a no-op otherwise (``checkify.debug_check``)."""
    text = message.replace("{", "{{").replace("}", "}}") + " {}" * len(values)
    checkify.debug_check(ok, text, *values)


def scalar(value, where: str):
    """``value`` as a Python float after checking it is one finite real number.

    Traced values (inside ``jax.jit``) are returned as they are, checked for shape now and for
    finiteness at run time under :func:`jaxmerge.checked` (a no-op otherwise).

    Raises:
      TypeError: not a real scalar. JaxmergeError: NaN or infinite. Both name ``where``.
    """
    if isinstance(value, jax.core.Tracer):
        if value.shape != ():
            raise TypeError(f"{where} must be a scalar, got a traced array of shape {value.shape}")
        runtime_check(jnp.isfinite(value), f"{where} must be a finite number, got", value)
        return value
    arr = np.asarray(value)
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == jnp.bfloat16) \
            or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{where} must be a real number, got {value!r}")
    if not np.isfinite(arr):
        raise JaxmergeError(f"{where} must be a finite number, got {value!r}")
    return float(arr)


@dataclasses.dataclass(frozen=True)
class Range:
    """The interval a number must lie in: ``Range(0, 1, lo_open=True)`` is ``(0, 1]``."""

    lo: float
    hi: float = float("inf")
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        hi = "inf" if self.hi == float("inf") else f"{self.hi:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {hi}{')' if self.hi_open or hi == 'inf' else ']'}"

    def __call__(self, v: float) -> str | None:
        """The problem with ``v``, or None if it lies in the interval."""
        return f"must be in {self}" if self.outside(v) else None

    def outside(self, v):
        """Whether ``v`` (a float, or a traced array elementwise) lies outside the interval."""
        below = v <= self.lo if self.lo_open else v < self.lo
        above = v >= self.hi if self.hi_open else v > self.hi
        return below | above


def checked(value, where: str, check: Range | None = None):
    """``value`` as a checked scalar: a float, or a tracer checked for shape now and for its
    range at run time under :func:`jaxmerge.checked`."""
    value = scalar(value, where)
    if check is not None and isinstance(value, jax.core.Tracer):
        runtime_check(~check.outside(value), f"{where} must be in {check}, got", value)
    problem = check(value) if check is not None and isinstance(value, float) else None
    if problem:
        raise JaxmergeError(f"{where} {problem}, got {value!r}")
    return value


def layer_positions(keys: Sequence[tuple[str, ...]]) -> list[float]:
    """Each leaf's position ``t`` in [0, 1] along the layer stack, as mergekit assigns it.

    The layer stack is the numbered path entry (``model.layers.<i>``, ``layers/<i>``,
    ``Block_<i>``, ``Dense_<i>``) that the most leaves carry, ties going to the one with the
    most distinct indices (:class:`jaxmerge._layers.LayerStack`). A leaf in layer
    ``i`` of ``L`` gets ``i / (L - 1)`` (1.0 when ``L == 1``). Leaves outside the stack
    (embeddings, the final norm, the head) get 0.0, as mergekit 0.1.5 plans its pre- and
    post-layer weights.

    Args:
      keys: each leaf's path as a tuple of names (``('params', 'Block_0', 'kernel')``), or a
        flat name in a 1-tuple (``('model.layers.0.mlp.up_proj.weight',)``).

    Returns:
      One float per leaf.

    Examples:
      >>> import jaxmerge
      >>> jaxmerge.layer_positions([("embed",), ("layers", "0", "w"), ("layers", "2", "w"), ("head",)])
      [0.0, 0.0, 1.0, 0.0]
    """
    return LayerStack(keys).positions()


def gradient_value(anchors: Sequence[float], t: float) -> float:
    """mergekit's gradient: ``anchors`` spread evenly over [0, 1], linearly interpolated at ``t``."""
    scaled = t * (len(anchors) - 1)
    lo = int(scaled)
    hi = min(len(anchors) - 1, lo + 1)
    frac = scaled - lo
    return (1 - frac) * anchors[lo] + frac * anchors[hi]


class PerModel(tuple):
    """A hyperparameter given separately for each model; see :func:`per_model`."""


def per_model(*values) -> PerModel:
    """Give a hyperparameter one value per model: ``density=jaxmerge.per_model(0.3, 0.5)``.

    Each value may itself be any per-leaf form (scalar, pytree, function, gradient, filters).
    Hyperparameters that mergekit sets per model (``density``, ``gamma``, ``epsilon``)
    accept this; without it, one value applies to every model.

    Args:
      *values: one setting per model, in the order of the models.

    Returns:
      The settings, marked as per-model.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(4)}
      >>> tunes = [{"w": jnp.asarray([4.0, 3.0, 2.0, 1.0])}, {"w": jnp.asarray([1.0, 2.0, 3.0, 4.0])}]
      >>> merged = jaxmerge.ties(base, tunes, density=jaxmerge.per_model(0.25, 0.5), normalize=False)
      >>> merged["w"].tolist()
      [4.0, 0.0, 3.0, 4.0]
    """
    return PerModel(values)


@dataclasses.dataclass(frozen=True)
class Levels:
    """The settings of one hyperparameter, highest precedence first.

    Attributes:
      shared: settings that apply to every model (or to the whole merge).
      per_model: for per-model hyperparameters, one tuple of settings per model, which
        take precedence over ``shared``; ``None`` when not given per model.
    """

    shared: tuple = ()
    per_model: tuple[tuple, ...] | None = None

    def of_model(self, j: int) -> tuple:
        return (self.per_model[j] if self.per_model is not None else ()) + self.shared


LeafValue = Callable[[int], Any]


class Resolver:
    """Resolves hyperparameter :class:`Levels` against one tree, one value per float leaf.

    Layer gradients are evaluated at ``positions`` (one per leaf; default: read from the
    leaf paths by :func:`layer_positions`). Filters match the leaf paths, those of a model's
    own settings ``input_paths[j]`` (the names model ``j``'s leaves are read under, which
    differ where a merge config's slice takes other layers: mergekit matches a model's
    parameters against them).

    Every resolved hyperparameter has one type: a list aligned with ``spec.keys`` holding,
    for each float leaf, a float (or a tracer under ``jax.jit``) for a merge-wide value, or a
    vector with one entry per model (:func:`vector`) for a per-model value; ``None`` for the
    other leaves, which are passed through and need no value.
    """

    def __init__(self, spec: TreeSpec, positions: Sequence[float] | None = None,
                 input_paths: Sequence[Sequence[str]] | None = None):
        self.spec = spec
        self._positions = None if positions is None else list(positions)
        self.input_paths = input_paths

    @property
    def positions(self) -> list[float]:
        if self._positions is None:
            self._positions = layer_positions(self.spec.keys)
        return self._positions

    def leafwise(self, levels: Sequence, name: str, default=REQUIRED, check: Range | None = None,
                 paths: Sequence[str] | None = None) -> list:
        """One checked scalar per float leaf from ``levels`` (settings, highest precedence first).

        ``name`` labels errors (``'density of models[1]'``); a value that depends on the leaf
        is named with its path too. Filters match ``paths`` (default: the leaf paths).

        Raises:
          JaxmergeError: a value out of ``check``'s range, not finite, or missing where there
            is no default (naming ``name`` and the path). TypeError: a value that is not a
            real number.
        """
        levels = [setting for setting in levels if setting is not None]  # None: not given at that level
        float_leaves = self.spec.float_indices()
        if not levels or _is_plain(levels[0]):
            value = default if not levels else levels[0]
            if value is REQUIRED:
                raise JaxmergeError(f"{name} is required but not given")
            value = checked(value, name, check) if float_leaves else None
            return [value if self.spec.is_float(i) else None for i in range(len(self.spec.keys))]
        getters = [self._getter(setting, name, paths or self.spec.paths) for setting in levels]
        out: list = [None] * len(self.spec.keys)
        for i in float_leaves:
            value = next((v for v in (get(i) for get in getters) if v is not None), default)
            where = f"{name} at {self.spec.paths[i]!r}"
            if value is REQUIRED:
                raise JaxmergeError(f"{where} is required: no setting gives it a value")
            out[i] = checked(value, where, check)
        return out

    def per_model(self, levels: Levels, name: str, model_names: Sequence[str], default=REQUIRED,
                  check: Range | None = None) -> list:
        """One checked vector (one entry per model) per float leaf; see :meth:`leafwise`.

        Raises:
          JaxmergeError: as :meth:`leafwise`, naming the model; or ``levels.per_model`` with
            the wrong number of entries.
        """
        n = self.spec.num_models
        if levels.per_model is not None and len(levels.per_model) != n:
            raise JaxmergeError(f"{name} has {len(levels.per_model)} entries but there are {n} models")
        columns = [self.leafwise(levels.of_model(j), f"{name} of {model_names[j]}", default, check,
                                 None if self.input_paths is None else self.input_paths[j]) for j in range(n)]
        return [None if columns[0][i] is None else vector([c[i] for c in columns]) for i in range(len(self.spec.keys))]

    def _getter(self, setting, name: str, paths: Sequence[str]) -> LeafValue:
        """A function from leaf index to the (unchecked) value ``setting`` gives, or None;
        filters match ``paths``."""
        spec = self.spec
        if callable(setting) and not hasattr(setting, "shape"):
            return lambda i: setting(spec.paths[i], spec.leaves[i])
        if isinstance(setting, (list, tuple)) and setting and all(_is_number(v) for v in setting):
            anchors = [scalar(a, f"{name} gradient entry") for a in setting]
            return lambda i: gradient_value(anchors, self.positions[i])
        if isinstance(setting, dict) and _is_conditional(setting):
            setting = [setting]
        if isinstance(setting, (list, tuple)) and all(_is_conditional(v) for v in setting):
            return self._conditional(setting, name, paths)
        if _is_plain(setting):
            return lambda i: setting
        return self._pytree(setting, name)

    def _conditional(self, entries, name: str, paths: Sequence[str]) -> LeafValue:
        for e in entries:
            if e.get("filter") is not None and not isinstance(e["filter"], str):
                raise JaxmergeError(f"{name}: a filter is a substring of tensor names, got {e['filter']!r}")
        getters = [(e.get("filter"), self._getter(e["value"], f"{name} filter {e.get('filter')!r}", paths))
                   for e in entries]

        def value(i):
            for pattern, get in getters:
                if pattern in (None, "*") or pattern in paths[i]:
                    return get(i)
            return None
        return value

    def _pytree(self, tree, name: str) -> LeafValue:
        leaf_parts = [tuple(path.split("/")) for path in self.spec.paths]
        owner: dict[int, Any] = {}
        for entry_keys, entry_value in zip(*flatten_with_keys(tree)[:2]):
            parts = tuple(path_str(entry_keys).split("/"))
            matched = [i for i, leaf in enumerate(leaf_parts) if leaf[:len(parts)] == parts]
            if not matched:
                raise JaxmergeError(f"{name} has an entry {path_str(entry_keys)!r} that matches no leaf")
            for i in matched:
                owner.setdefault(i, entry_value)
        return owner.get


def python_levels(value, *, sequence: bool = False) -> Levels:
    """The :class:`Levels` of a hyperparameter given to a Python function.

    ``None`` means not given (the default applies); :func:`per_model` gives one setting per
    model; with ``sequence`` (``weights``) the value itself has one entry per model.

    Raises:
      TypeError: ``sequence`` and ``value`` is not a sequence.
    """
    if value is None:
        return Levels()
    if isinstance(value, PerModel):
        return Levels(per_model=tuple((v,) for v in value))
    if sequence:
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__") or getattr(value, "ndim", 1) != 1:
            raise TypeError(f"must be a sequence with one entry per model, got {type(value).__name__}")
        return Levels(per_model=tuple((value[j],) for j in range(len(value))))
    return Levels(shared=(value,))


def scalar_arg(value) -> np.ndarray | jax.Array:
    """A resolved scalar as a kernel argument (0-d float64 NumPy, or float32 JAX if traced)."""
    return np.asarray(value, np.float64) if isinstance(value, float) else jnp.asarray(value, jnp.float32)


def vector(values: Sequence) -> np.ndarray | jax.Array:
    """Scalars as one vector: float64 NumPy when all are concrete (checked exactly, cast to
    float32 on the way into a kernel), float32 JAX when one is traced."""
    if all(isinstance(v, (float, np.floating)) for v in values):
        return np.asarray(values, np.float64)
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


def check_nonzero_sums(weights: list, name: str, spec: TreeSpec) -> None:
    """Raise if a concrete per-leaf weight vector sums to zero (normalisation would divide by 0);
    a traced one is checked at run time under :func:`jaxmerge.checked`."""
    for path, w in zip(spec.paths, weights):
        message = f"{name} sum to 0 at {path!r}, so they cannot be normalized; pass normalize=False or change them"
        if isinstance(w, np.ndarray) and w.sum(dtype=np.float64) == 0:
            raise JaxmergeError(message)
        if isinstance(w, jax.core.Tracer):
            runtime_check(w.sum() != 0, message)


def resolve(value, name: str, spec: TreeSpec, check: Range | None = None) -> list:
    """A merge-wide per-leaf hyperparameter given in Python, resolved (see :meth:`Resolver.leafwise`)."""
    return Resolver(spec).leafwise(python_levels(value).shared, name, REQUIRED, check)
