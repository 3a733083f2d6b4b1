"""Per-leaf hyperparameters.

Every merge hyperparameter that is documented as *per-leaf* (a weight, ``t``, ``density``,
...) may be given in any of these forms:

- a **scalar**: the same value for every leaf;
- a **callable** ``fn(path, leaf) -> scalar``, where ``path`` is the leaf's path joined
  with ``/`` (``'params/Dense_0/kernel'``) and ``leaf`` is the reference model's leaf (a
  ``jax.ShapeDtypeStruct`` in streamed checkpoint merges);
- a **pytree of scalars** matched to the model by path: each of its leaves applies to the
  model leaves at or below its path, so it may be a prefix of the model
  (``{'encoder': 0.3, 'decoder': 0.7}``). Container types need not match: a plain dict
  works for an ``nnx.State``. Every float leaf of the model must be covered, and every
  entry must cover some leaf;
- a **list of numbers**, mergekit's layer *gradient*: anchor values spread evenly from the
  first to the last layer and linearly interpolated in between (see :func:`layer_positions`);
- a **list of** ``{'filter': str, 'value': v}`` **dicts**, mergekit's conditional form: the
  first entry whose ``filter`` is a substring of the leaf's path (or whose filter is
  missing or ``'*'``) gives the value, itself a scalar or a gradient.

Because a list of numbers means a gradient, a model whose top level is a list cannot take
a pytree-valued hyperparameter; use a callable there.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge._tree import TreeSpec, flatten_with_keys, path_str

_NAME_WITH_INDEX = re.compile(r"(.*\D)_(\d+)")
_EMBEDDING_NAMES = ("embed", "wte", "wpe")


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def _is_conditional(x) -> bool:
    return isinstance(x, dict) and "value" in x and set(x) <= {"filter", "value"}


def scalar(value, where: str):
    """``value`` as a Python float after checking it is one finite real number.

    Traced values (inside ``jax.jit``) are returned as they are, checked for shape only.

    Raises:
      TypeError: not a real scalar. ValueError: NaN or infinite. Both name ``where``.
    """
    if isinstance(value, jax.core.Tracer):
        if value.shape != ():
            raise TypeError(f"{where} must be a scalar, got a traced array of shape {value.shape}")
        return value
    arr = np.asarray(value)
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == jnp.bfloat16) \
            or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{where} must be a real number, got {value!r}")
    if not np.isfinite(arr):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(arr)


def _stack_parts(path_keys: tuple[str, ...]) -> list[str]:
    # Flat checkpoint names ('model.layers.3.mlp.up_proj.weight') are split on dots too.
    return [part for key in path_keys for part in key.split(".")]


def _numbered_parts(path_keys: tuple[str, ...]) -> list[tuple[tuple[str, ...], int]]:
    """``(stack, index)`` for each numbered entry of a path: ``layers/3`` or ``Block_3``."""
    parts = _stack_parts(path_keys)
    found = []
    for j, part in enumerate(parts):
        if part.isdigit():
            found.append((tuple(parts[:j]), int(part)))
        elif match := _NAME_WITH_INDEX.fullmatch(part):
            found.append((tuple(parts[:j]) + (match[1],), int(match[2])))
    return found


def layer_positions(keys: Sequence[tuple[str, ...]]) -> list[float]:
    """Each leaf's position ``t`` in [0, 1] along the layer stack, as mergekit assigns it.

    The layer stack is the numbered path entry with the most distinct indices
    (``model.layers.<i>``, ``layers/<i>``, ``Block_<i>``, ``Dense_<i>``). A leaf in layer
    ``i`` of ``L`` gets ``i / (L - 1)`` (1.0 when ``L == 1``). Leaves outside the stack get
    0.0 if their path names an embedding (``embed``, ``wte``, ``wpe``), as mergekit's
    pre-layer weights do, else 1.0, as its post-layer weights (final norm, head) do.
    """
    numbered = [_numbered_parts(k) for k in keys]
    indices: dict[tuple[str, ...], set[int]] = defaultdict(set)
    for entries in numbered:
        for stack, index in entries:
            indices[stack].add(index)
    stack = max(indices, key=lambda s: len(indices[s])) if indices else None
    num_layers = max(indices[stack]) + 1 if indices else 0
    positions = []
    for path_keys, entries in zip(keys, numbered):
        index = dict(entries).get(stack)
        if index is not None:
            positions.append(index / (num_layers - 1) if num_layers > 1 else 1.0)
        else:
            lowered = [p.lower() for p in _stack_parts(path_keys)]
            is_embedding = any(name in p for p in lowered for name in _EMBEDDING_NAMES)
            positions.append(0.0 if is_embedding else 1.0)
    return positions


def gradient_value(anchors: Sequence[float], t: float) -> float:
    """mergekit's gradient: ``anchors`` spread evenly over [0, 1], linearly interpolated at ``t``."""
    scaled = t * (len(anchors) - 1)
    lo = int(scaled)
    hi = min(len(anchors) - 1, lo + 1)
    frac = scaled - lo
    return (1 - frac) * anchors[lo] + frac * anchors[hi]


def _gradient_fn(anchors, name: str, spec: TreeSpec) -> Callable[[int], Any]:
    if not anchors:
        raise ValueError(f"{name} is an empty gradient list")
    anchors = [scalar(a, f"{name} gradient entry") for a in anchors]
    positions = layer_positions(spec.keys)
    return lambda i: gradient_value(anchors, positions[i])


def _conditional_fn(entries, name: str, spec: TreeSpec) -> Callable[[int], Any]:
    fns = [(e.get("filter"), _leaf_fn(e["value"], f"{name} filter {e.get('filter')!r}", spec))
           for e in entries]
    paths = spec.paths

    def value(i):
        for pattern, fn in fns:
            if pattern in (None, "*") or pattern in paths[i]:
                return fn(i)
        raise ValueError(f"{name}: no filter matches leaf {paths[i]!r}; add an entry without "
                         "a filter as the default")
    return value


def _pytree_fn(tree, name: str, spec: TreeSpec) -> Callable[[int], Any]:
    entries = list(zip(*flatten_with_keys(tree)[:2]))
    owner: dict[int, Any] = {}
    for entry_keys, entry_value in entries:
        matched = [i for i, keys in enumerate(spec.keys) if keys[:len(entry_keys)] == entry_keys]
        if not matched:
            raise ValueError(f"{name} has an entry {path_str(entry_keys)!r} that matches no leaf")
        for i in matched:
            owner.setdefault(i, entry_value)
    missing = [i for i in spec.float_indices() if i not in owner]
    if missing:
        raise ValueError(f"{name} gives no value for leaf {spec.paths[missing[0]]!r}")
    return owner.__getitem__


def _leaf_fn(value, name: str, spec: TreeSpec) -> Callable[[int], Any]:
    """A function from leaf index to the (unchecked) value of the hyperparameter."""
    if callable(value) and not hasattr(value, "shape"):
        return lambda i: value(spec.paths[i], spec.leaves[i])
    if isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
        return _gradient_fn(value, name, spec)
    if isinstance(value, (list, tuple)) and value and all(_is_conditional(v) for v in value):
        return _conditional_fn(value, name, spec)
    if isinstance(value, dict) and _is_conditional(value):
        return _conditional_fn([value], name, spec)
    if _is_plain(value):
        value = scalar(value, name)
        return lambda i: value
    return _pytree_fn(value, name, spec)


def _is_plain(value) -> bool:
    return (hasattr(value, "shape") or _is_number(value) or value is None
            or isinstance(value, (bool, str, bytes, complex)))


Check = Callable[[float], "str | None"]


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A check that a value lies in the interval from ``lo`` to ``hi``."""
    text = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def check(v):
        below = v <= lo if lo_open else v < lo
        above = v >= hi if hi_open else v > hi
        return f"must be in {text}" if below or above else None
    return check


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def checked(value, where: str, check: Check | None = None):
    """``value`` as a checked scalar (a float; a tracer passes unchecked beyond its shape)."""
    value = scalar(value, where)
    problem = check(value) if check is not None and isinstance(value, float) else None
    if problem:
        raise ValueError(f"{where} {problem}, got {value!r}")
    return value


def resolve(value, name: str, spec: TreeSpec, check: Check | None = None) -> list:
    """Resolve a per-leaf hyperparameter to one checked scalar per float leaf.

    Args:
      value: the hyperparameter in any of the forms of this module.
      name: its argument name, for error messages.
      spec: the tree it applies to.
      check: optional ``check(v) -> problem or None`` for concrete values.

    Returns:
      A list aligned with ``spec.keys``: a float (or a tracer) for every float leaf,
      ``None`` for the others (which are passed through and need no value).
    """
    if _is_plain(value):
        value = checked(value, name, check)
        return [value if spec.is_float(i) else None for i in range(len(spec.keys))]
    fn = _leaf_fn(value, name, spec)
    return [checked(fn(i), f"{name} at {spec.paths[i]!r}", check) if spec.is_float(i) else None
            for i in range(len(spec.keys))]


class PerModel(tuple):
    """A hyperparameter given separately for each model; see :func:`per_model`. ``names``,
    if set, are the models' names in error messages."""

    names: tuple | None = None


def per_model(*values, names=None) -> PerModel:
    """Give a hyperparameter one value per model: ``density=jaxmerge.per_model(0.3, 0.5)``.

    Each value may itself be any per-leaf form (scalar, pytree, function, gradient, filters).
    Hyperparameters that mergekit sets per model (``density``, ``gamma``, ``epsilon``)
    accept this; without it, one value applies to every model.
    """
    marked = PerModel(values)
    marked.names = None if names is None else tuple(names)
    return marked


def resolve_models(values, name: str, spec: TreeSpec, default=None, check: Check | None = None) -> list:
    """Resolve one per-leaf hyperparameter for each model to a float32 vector per leaf.

    Args:
      values: a sequence with one per-leaf hyperparameter per model (or a 1-d array), or
        ``None`` for ``default`` everywhere.

    Returns:
      A list aligned with ``spec.keys``: a vector of length ``spec.num_models``
      for every float leaf (a NumPy array, or a JAX array when a value is traced), ``None``
      for the others.
    """
    n = spec.num_models
    if values is None:
        values = [default] * n
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence with one entry per model ({n} models), "
                        f"got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} models")
    names = getattr(values, "names", None)
    columns = [resolve(v, f"{name}[{j}]" if names is None else f"{name} of {names[j]}", spec, check)
               for j, v in enumerate(values)]
    return [None if columns[0][i] is None else vector([c[i] for c in columns])
            for i in range(len(spec.keys))]


def resolve_shared(value, name: str, spec: TreeSpec, check: Check | None = None) -> list:
    """Like :func:`resolve_models`, for a value shared by all models unless :func:`per_model`."""
    if isinstance(value, PerModel):
        return resolve_models(value, name, spec, check=check)
    rows = resolve(value, name, spec, check)
    return [None if v is None else vector([v] * spec.num_models) for v in rows]


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
    """Raise if a concrete per-leaf weight vector sums to zero (normalisation would divide by 0)."""
    for path, w in zip(spec.paths, weights):
        if isinstance(w, np.ndarray) and w.sum(dtype=np.float64) == 0:
            raise ValueError(f"{name} sum to 0 at {path!r}, so they cannot be normalized; "
                             "pass normalize=False or change the weights")
