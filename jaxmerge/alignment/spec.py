"""Permutation specs: which axes of which leaves share a permutation of hidden units.

Permuting the hidden units of a layer (its output axis, with its bias and norm statistics)
together with the matching input axis of the next layer leaves the network's function
unchanged. A :class:`PermutationSpec` lists, for every leaf that such permutations touch,
the permutation (by name) acting on each of its axes, or ``None``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from jaxmerge._tree import PyTree, flatten_with_keys, leaf_spec, path_str
from jaxmerge.errors import JaxmergeError


def _as_key(path) -> tuple[str, ...]:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
    """``axes[leaf path] = (permutation name or None, one per axis)``.

    Paths are ``'/'``-joined (``'params/Dense_0/kernel'``) or tuples of names; a path may
    stop short of a trailing ``value`` (the leaves of an ``nnx.State``). Combine specs with
    ``|``.
    """

    axes: Mapping[tuple[str, ...], tuple[str | None, ...]]

    def __init__(self, axes: Mapping):
        object.__setattr__(self, "axes", {_as_key(k): tuple(v) for k, v in axes.items()})

    def __or__(self, other: PermutationSpec) -> PermutationSpec:
        overlap = set(self.axes) & set(other.axes)
        if overlap:
            raise JaxmergeError(f"both specs name the leaf {path_str(min(overlap))!r}")
        return PermutationSpec({**self.axes, **other.axes})

    @property
    def names(self) -> list[str]:
        """The permutations, in order of first appearance."""
        return list(dict.fromkeys(p for axes in self.axes.values() for p in axes if p is not None))

    def bind(self, params: PyTree) -> BoundSpec:
        """Match the spec to ``params``' leaves, checking leaves, axes and sizes.

        Raises:
          ValueError: a leaf the params do not have, a wrong number of axes, or axes of
            different sizes sharing a permutation (naming the leaves and sizes).
        """
        keys, leaves, _ = flatten_with_keys(params)
        index = {}
        for spec_key, axes in self.axes.items():
            found = [i for i, k in enumerate(keys) if k == spec_key or k == spec_key + ("value",)]
            if not found:
                raise JaxmergeError(f"the permutation spec names the leaf {path_str(spec_key)!r}, "
                                 "which params do not have")
            shape = leaf_spec(leaves[found[0]]).shape
            if len(axes) != len(shape):
                raise JaxmergeError(f"the permutation spec gives {len(axes)} axes for {path_str(spec_key)!r} "
                                 f"of shape {shape}")
            index[spec_key] = found[0]
        sizes: dict[str, tuple[int, str, int]] = {}
        for spec_key, axes in self.axes.items():
            shape = leaf_spec(leaves[index[spec_key]]).shape
            for axis, name in enumerate(axes):
                if name is None:
                    continue
                if name in sizes and sizes[name][0] != shape[axis]:
                    size, other, other_axis = sizes[name]
                    raise JaxmergeError(f"permutation {name!r} joins axes of different sizes: {path_str(spec_key)!r} "
                                     f"axis {axis} has {shape[axis]}, {other!r} axis {other_axis} has {size}")
                sizes.setdefault(name, (shape[axis], path_str(spec_key), axis))
        return BoundSpec(self, {k: index[k] for k in self.axes}, {n: s[0] for n, s in sizes.items()})


@dataclasses.dataclass(frozen=True)
class BoundSpec:
    """A spec matched to a tree: the leaf index of every spec path and every permutation's size."""
    spec: PermutationSpec
    leaf_index: dict[tuple[str, ...], int]
    sizes: dict[str, int]

    def axes_of(self, name: str) -> list[tuple[int, int]]:
        """``(leaf index, axis)`` of every axis that permutation ``name`` acts on."""
        return [(self.leaf_index[k], axis) for k, axes in self.spec.axes.items()
                for axis, n in enumerate(axes) if n == name]


def _natural(key: tuple[str, ...]):
    return [int(t) if t.isdigit() else t for part in key for t in re.split(r"(\d+)", part)]


def _find(keys: list[tuple[str, ...]], prefix: str, name: str) -> tuple[str, ...] | None:
    want = _as_key(prefix) + (name,)
    for k in keys:
        if k == want or k == want + ("value",):
            return want
    return None


def _dense_layers(params: PyTree) -> list[str]:
    keys = [k[:-1] if k[-1] == "value" else k for k in flatten_with_keys(params)[0]]
    kernels = [k[:-1] for k, leaf in zip(keys, flatten_with_keys(params)[1])
               if k[-1] == "kernel" and len(leaf_spec(leaf).shape) == 2]
    return [path_str(k) for k in sorted(kernels, key=_natural)]


def _chain(params: PyTree, layers: Sequence[str], first_input: str | None, names: Sequence[str],
           kernel_axes) -> dict:
    """Spec entries for a chain of layers whose output perms feed the next layer's input."""
    keys = flatten_with_keys(params)[0]
    axes = {}
    for i, layer in enumerate(layers):
        into = first_input if i == 0 else names[i - 1]
        out = names[i] if i < len(names) else None
        kernel = _find(keys, layer, "kernel")
        if kernel is None:
            raise JaxmergeError(f"no kernel under {layer!r}")
        axes[kernel] = kernel_axes(into, out)
        bias = _find(keys, layer, "bias")
        if bias is not None:
            axes[bias] = (out,)
    return axes


def mlp_permutation_spec(params: PyTree, layers: Sequence[str] | None = None, *, prefix: str = "hidden"
                         ) -> PermutationSpec:
    """The spec of an MLP: hidden layer ``i``'s units permuted by ``'{prefix}_{i}'``.

    Args:
      params: the MLP's parameters (Linen ``{'params': ...}``, an ``nnx.State``, a dict).
      layers: the dense layers' paths in order (each holding ``kernel`` of shape
        ``(in, out)`` and optionally ``bias``); by default every 2-d ``kernel`` in natural
        order of their paths (``Dense_2`` before ``Dense_10``).
    """
    layers = list(layers) if layers is not None else _dense_layers(params)
    if len(layers) < 2:
        raise JaxmergeError(f"an MLP needs at least 2 dense layers to permute, found {layers}")
    names = [f"{prefix}_{i}" for i in range(len(layers) - 1)]
    return PermutationSpec(_chain(params, layers, None, names, lambda into, out: (into, out)))


def cnn_permutation_spec(params: PyTree, convs: Sequence[str], dense: Sequence[str] = (),
                         norms: Sequence[str | None] | None = None, *, prefix: str = "channels") -> PermutationSpec:
    """The spec of a CNN: conv layers (kernels ``(h, w, in, out)``), then global pooling and
    dense layers; conv ``i``'s channels are permuted by ``'{prefix}_{i}'``.

    Args:
      params: the parameters, with any BatchNorm statistics (e.g. Linen's whole variables).
      convs: the conv layers' paths in order.
      dense: the dense layers after global pooling, in order (the last one's outputs are
        not permuted).
      norms: for each conv, the name of the norm layer after it (or None); its ``scale``,
        ``bias``, ``mean`` and ``var`` leaves, in any collection, are permuted with it.
    """
    # without dense layers, the last conv's outputs are the network's and stay in place
    names = [f"{prefix}_{i}" for i in range(len(convs) if dense else len(convs) - 1)]
    axes = _chain(params, list(convs), None, names, lambda into, out: (None, None, into, out))
    if dense:
        hidden = [f"{prefix}_dense_{i}" for i in range(len(dense) - 1)]
        axes.update(_chain(params, list(dense), names[-1], hidden, lambda into, out: (into, out)))
    for norm, name in zip(norms or [], names):
        if norm is None:
            continue
        matched = [k for k in flatten_with_keys(params)[0] if norm in k and (k[-1] in ("scale", "bias", "mean", "var")
                   or (k[-1] == "value" and k[-2] in ("scale", "bias", "mean", "var")))]
        if not matched:
            raise JaxmergeError(f"no scale, bias, mean or var leaf under a {norm!r} module")
        axes.update({k[:-1] if k[-1] == "value" else k: (name,) for k in matched})
    return PermutationSpec(axes)


def transformer_block_permutation_spec(params: PyTree, *, query: str, key: str, value: str, out: str,
                                       fc1: str, fc2: str, prefix: str = "block") -> PermutationSpec:
    """The spec of one transformer block: attention heads and MLP hidden units.

    The heads permutation ``'{prefix}_heads'`` acts on the heads axis of the query, key and
    value kernels (``(d, heads, head_dim)``, Flax's ``DenseGeneral``/``LinearGeneral``
    layout) and biases (``(heads, head_dim)``), and of the output projection kernel
    (``(heads, head_dim, d)``); ``'{prefix}_mlp'`` acts on the MLP's hidden units
    (``fc1`` outputs and ``fc2`` inputs). The residual stream is not permuted. Combine the
    specs of several blocks (distinct ``prefix`` each) with ``|``.
    """
    keys = flatten_with_keys(params)[0]
    heads, mlp = f"{prefix}_heads", f"{prefix}_mlp"
    axes = {}
    for layer in (query, key, value):
        axes[_find(keys, layer, "kernel") or _missing(layer)] = (None, heads, None)
        bias = _find(keys, layer, "bias")
        if bias is not None:
            axes[bias] = (heads, None)
    axes[_find(keys, out, "kernel") or _missing(out)] = (heads, None, None)
    axes.update(_chain(params, [fc1, fc2], None, [mlp], lambda into, out_: (into, out_)))
    return PermutationSpec(axes)


def _missing(layer: str):
    raise JaxmergeError(f"no kernel under {layer!r}")


def random_permutation(spec: PermutationSpec, params: PyTree, seed: int = 0) -> dict[str, np.ndarray]:
    """A random permutation for every name of ``spec`` (for tests and demonstrations)."""
    rng = np.random.default_rng(seed)
    return {name: rng.permutation(size) for name, size in spec.bind(params).sizes.items()}
