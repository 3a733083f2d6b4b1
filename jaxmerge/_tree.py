"""Pytree plumbing shared by every merge: leaf paths, compatibility checks, float32 sums.

A merge sees its inputs as a :class:`TreeSpec` (the paths, shapes and dtypes of the
reference model: the base if there is one, else the first model) plus the leaves of each
model in the spec's order. A method turns the spec and its hyperparameters into a *leaf
function* ``leaf_fn(i, base_leaf, model_leaves) -> Array``, which the one driver
(:mod:`jaxmerge._driver`) runs over in-memory trees and over leaves read from disk alike.
``model_leaves`` is a fresh list for each call, which the leaf function may clear entries
of once it is done with them (so that streamed inputs are freed early).

Only floating-point leaves are merged. Integer, boolean and other non-float leaves (step
counters, RNG keys, masks) are passed through unchanged from the reference model, never
averaged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.errors import JaxmergeError

PyTree = Any
LeafFn = Callable[[int, Any, Sequence[Any]], Any]


def key_name(key) -> str:
    """The name of one path entry: a dict key, attribute name or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keys: Sequence[str]) -> str:
    """``('params', 'Dense_0', 'kernel')`` -> ``'params/Dense_0/kernel'``."""
    return "/".join(keys)


def state_key(key: tuple[str, ...]) -> tuple[str, ...]:
    """A leaf's key without the trailing ``'value'`` of an ``nnx.State``'s leaves."""
    return key[:-1] if key and key[-1] == "value" else key


def leaf_spec(leaf) -> jax.ShapeDtypeStruct:
    """Shape and dtype of a leaf (an array, a Python/NumPy scalar or a ShapeDtypeStruct)."""
    if not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)


def is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def acc_dtype(dtype):
    """The dtype to accumulate ``dtype`` in: float32 for bf16/fp16/fp32, float64 for float64."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _kind(dtype) -> str:
    for kind in (jnp.floating, jnp.complexfloating, jnp.signedinteger, jnp.unsignedinteger, jnp.bool_):
        if jnp.issubdtype(dtype, kind):
            return kind.__name__
    return str(dtype)


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """The structure a merge works on: the reference model's leaves, paths and treedef.

    Attributes:
      keys: per leaf, the path as a tuple of entry names.
      leaves: the reference model's leaves (arrays in memory, ``jax.ShapeDtypeStruct`` when
        streaming from a checkpoint).
      treedef: structure of the output.
      num_models: number of models being merged (not counting the base).
      has_base: whether a base model is given.
    """

    keys: tuple[tuple[str, ...], ...]
    leaves: tuple[Any, ...]
    treedef: Any
    num_models: int
    has_base: bool

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(path_str(k) for k in self.keys)

    def is_float(self, i: int) -> bool:
        return is_float(leaf_spec(self.leaves[i]).dtype)

    def size(self, i: int) -> int:
        return int(np.prod(leaf_spec(self.leaves[i]).shape))

    def float_indices(self) -> list[int]:
        return [i for i in range(len(self.keys)) if self.is_float(i)]


def flatten_with_keys(tree: PyTree) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """Leaves of ``tree`` with their paths as tuples of names, and its treedef."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = [tuple(key_name(k) for k in path) for path, _ in with_path]
    return keys, [leaf for _, leaf in with_path], treedef


def _aligned_leaves(name: str, tree: PyTree, ref_keys, ref_specs, ref_name: str) -> list:
    """Leaves of ``tree`` in the order of ``ref_keys``, after checking they match the reference."""
    keys, leaves, _ = flatten_with_keys(tree)
    by_key = dict(zip(keys, leaves))
    for key in ref_keys:
        if key not in by_key:
            raise JaxmergeError(f"{name} has no leaf {path_str(key)!r} (present in {ref_name})")
    extra = set(by_key) - set(ref_keys)
    if extra:
        raise JaxmergeError(f"{name} has a leaf {path_str(min(extra))!r} that {ref_name} does not have")
    out = []
    for key, ref in zip(ref_keys, ref_specs):
        leaf = by_key[key]
        spec = leaf_spec(leaf)
        if spec.shape != ref.shape:
            raise JaxmergeError(
                f"{name} {path_str(key)!r}: shape {spec.shape} != {ref.shape} of {ref_name}")
        if _kind(spec.dtype) != _kind(ref.dtype):
            raise JaxmergeError(
                f"{name} {path_str(key)!r}: dtype {spec.dtype} is not of the same kind as "
                f"{ref.dtype} of {ref_name}")
        out.append(leaf)
    return out


def flatten_models(models: Sequence[PyTree], base: PyTree | None = None, *,
                   names: Sequence[str] | None = None) -> tuple[TreeSpec, list | None, list[list]]:
    """Check that ``base`` and ``models`` are compatible and flatten them.

    Every model must have the reference's leaf paths, shapes and dtype kinds (float widths
    may differ: a bf16 model merges with a float32 one). The reference is ``base`` when
    given, else ``models[0]``; the output has its structure and dtypes.

    ``names`` are the models' names in error messages (default ``models[i]``).

    Returns:
      ``(spec, base_leaves or None, [leaves of each model])``, leaves in ``spec`` order.

    Raises:
      TypeError: ``models`` is not a list or tuple.
      JaxmergeError: no models, or a missing/extra leaf, shape or dtype-kind mismatch,
        naming the model index and the leaf path.
    """
    if not isinstance(models, (list, tuple)):
        raise TypeError(
            f"models must be a list or tuple of pytrees, got {type(models).__name__}")
    if not models:
        raise JaxmergeError("models is empty: give at least one model to merge")
    names = list(names) if names is not None else [f"models[{i}]" for i in range(len(models))]
    reference, ref_name = (base, "base") if base is not None else (models[0], names[0])
    ref_keys, ref_leaves, treedef = flatten_with_keys(reference)
    ref_specs = [leaf_spec(leaf) for leaf in ref_leaves]
    spec = TreeSpec(tuple(ref_keys), tuple(ref_leaves), treedef, len(models), base is not None)
    model_leaves = [
        _aligned_leaves(name, m, ref_keys, ref_specs, ref_name) for name, m in zip(names, models)
    ]
    return spec, (ref_leaves if base is not None else None), model_leaves


def keep_sharding(out, reference):
    """``out`` placed like ``reference`` when both are concrete arrays sharded differently
    (merges return leaves sharded like their reference leaf, whatever a kernel's
    reductions made of it; under ``jax.jit`` the caller's shardings decide)."""
    sharding = getattr(reference, "sharding", None)
    if (isinstance(out, jax.Array) and not isinstance(out, jax.core.Tracer) and isinstance(reference, jax.Array)
            and not isinstance(reference, jax.core.Tracer) and not out.sharding.is_equivalent_to(sharding, out.ndim)):
        return jax.device_put(out, sharding)
    return out


def exact_jit(static_argnames: tuple[str, ...] = ()) -> Callable:
    """``jax.jit`` for a kernel with a static ``exact`` argument (see :func:`compute_dtype`):
    ``exact=True`` calls run a build that XLA compiles without excess precision, so that every
    16-bit operation rounds to 16 bits, as torch's do, instead of keeping float32 between fused
    operations. (Inside a caller's ``jax.jit`` the caller's build decides.)"""
    names = (*static_argnames, "exact")

    def decorate(fn: Callable) -> Callable:
        loose = jax.jit(fn, static_argnames=names)
        strict = jax.jit(fn, static_argnames=names, compiler_options={"xla_allow_excess_precision": False})

        @functools.wraps(fn)
        def kernel(*args, exact: bool = False, **kwargs):
            return (strict if exact else loose)(*args, exact=exact, **kwargs)
        return kernel
    return decorate


def compute_dtype(dtype, exact: bool = False):
    """The dtype a merge computes a leaf of ``dtype`` in: float32 (float64 for float64), or,
    ``exact``, the leaf's own dtype, rounding after each operation where mergekit's torch code
    does (how ``jaxmerge merge`` gives mergekit's numbers for 16-bit models)."""
    return jnp.dtype(dtype) if exact else acc_dtype(dtype)


def total(xs: Sequence[jax.Array], dtype) -> jax.Array:
    """``sum(xs)`` accumulated in float32 (float64 for float64) and cast to ``dtype``, as a torch
    ``sum`` over a stacked 16-bit tensor is."""
    acc = acc_dtype(dtype)
    out = xs[0].astype(acc)
    for x in xs[1:]:
        out = out + x.astype(acc)
    return out.astype(dtype)


def norm(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """The Euclidean norm of ``x`` over ``axis`` as torch computes it for a 16-bit tensor: the
    squares summed in float32 (float64 for float64), the root rounded once to ``x.dtype``."""
    squares = jnp.square(x.astype(acc_dtype(x.dtype)))
    return jnp.sqrt(jnp.sum(squares, axis=axis, keepdims=keepdims)).astype(x.dtype)


def scaled(x: jax.Array, factor) -> jax.Array:
    """``x * factor`` computed in float32 (or float64) and cast back: a tensor times a Python
    number, as torch computes it for 16-bit tensors."""
    acc = acc_dtype(x.dtype)
    return (x.astype(acc) * jnp.asarray(factor).astype(acc)).astype(x.dtype)


def weighted_sum(leaves: Sequence[jax.Array], weights: jax.Array, dtype) -> jax.Array:
    """``sum_i weights[i] * leaves[i]`` accumulated in ``dtype`` (one fused pass under jit)."""
    weights = weights.astype(dtype)
    total = weights[0] * leaves[0].astype(dtype)
    for i in range(1, len(leaves)):
        total = total + weights[i] * leaves[i].astype(dtype)
    return total
