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

import jax.numpy as jnp
import numpy as np

from jaxmerge._tree import PyTree, flatten_with_keys, leaf_spec, path_str, state_key
from jaxmerge.errors import JaxmergeError


def _as_key(path) -> tuple[str, ...]:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(str(p) for p in path)


def units(entry) -> tuple[str | None, int]:
    """``(permutation name, entries per unit)`` of one axis entry of a spec: ``'p'`` moves
    single entries, ``('p', k)`` blocks of ``k`` consecutive entries (e.g. attention heads in a
    flattened ``heads * head_dim`` axis); ``None`` is no permutation."""
    return (entry, 1) if entry is None or isinstance(entry, str) else (entry[0], int(entry[1]))


def grouped(leaf, axis: int, block: int):
    """``leaf`` with axis ``axis`` split into ``(units, block)``."""
    shape = tuple(leaf.shape)
    return leaf.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])


def permute_axis(leaf, axis: int, index, block: int = 1):
    """``leaf`` with the units of axis ``axis`` (blocks of ``block`` entries) reordered by
    ``index``: unit ``j`` of the result is unit ``index[j]`` of ``leaf``. NumPy in, NumPy out."""
    take = np.take if isinstance(leaf, np.ndarray) else jnp.take
    return take(grouped(leaf, axis, block), index, axis=axis).reshape(leaf.shape)


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which leaves are reordered by which permutation of hidden units.

    A spec maps each leaf path it touches to one entry per axis of that leaf: the name of
    the permutation acting on that axis, or ``None`` for an axis left in place; ``(name, k)``
    moves blocks of ``k`` consecutive entries as units (attention heads of a flattened
    ``heads * head_dim`` axis, with ``k = head_dim``). Every axis
    carrying the name ``p`` is reordered by the same index array ``perm[p]``, so a layer's
    output axis (with its bias and norm statistics) and the next layer's input axis, named
    alike, move together and the network computes the same function. The permutation
    ``p`` acting on axis ``k`` of a leaf ``W`` gives ``W'[..., j, ...] = W[..., perm[p][j], ...]``.

    Paths are ``'/'``-joined (``'params/Dense_0/kernel'``) or tuples of names; a path may
    stop short of a trailing ``value`` (the leaves of an ``nnx.State``). Combine the specs
    of separate parts of a network with ``|``. Leaves the spec does not name are never
    permuted.

    Args:
      axes: a mapping from leaf path (a ``'/'``-joined string or a tuple of names) to a
        sequence with one permutation name or ``None`` per axis of that leaf. Stored as
        :attr:`axes`, with tuple paths and tuple values.

    Returns:
      A frozen spec; check it against a parameter tree with :meth:`bind`.

    Raises:
      JaxmergeError: combining with ``|`` two specs that both name a leaf.

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> spec = jaxmerge.PermutationSpec({"l0/kernel": (None, "h"), "l0/bias": ("h",)})
      >>> spec = spec | jaxmerge.PermutationSpec({("l1", "kernel"): ("h", None)})
      >>> spec.names
      ['h']
      >>> spec.axes[("l1", "kernel")]
      ('h', None)
      >>> params = {"l0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "l1": {"kernel": jnp.ones((3, 1))}}
      >>> spec.bind(params).sizes
      {'h': 3}
    """

    axes: Mapping[tuple[str, ...], tuple[str | None, ...]]

    def __init__(self, axes: Mapping):
        object.__setattr__(self, "axes", {_as_key(k): tuple(v) for k, v in axes.items()})

    def __or__(self, other: PermutationSpec) -> PermutationSpec:
        """The union of two specs that name disjoint leaves (``spec_a | spec_b``).

        Args:
          other: a spec naming none of this spec's leaves.

        Returns:
          A spec with the entries of both.

        Raises:
          JaxmergeError: both specs name the same leaf.
        """
        overlap = set(self.axes) & set(other.axes)
        if overlap:
            raise JaxmergeError(f"both specs name the leaf {path_str(min(overlap))!r}")
        return PermutationSpec({**self.axes, **other.axes})

    @property
    def names(self) -> list[str]:
        """The permutations, in order of first appearance."""
        return list(dict.fromkeys(units(p)[0] for axes in self.axes.values() for p in axes if p is not None))

    def bind(self, params: PyTree) -> BoundSpec:
        """Match the spec to ``params``' leaves, checking leaves, axes and sizes.

        Args:
          params: the parameter tree the spec describes.

        Returns:
          A ``BoundSpec``: the index (in ``params``' flattened leaves) of every spec path,
          and the size of every permutation (``.sizes``, ``{name: number of units}``).

        Raises:
          JaxmergeError: a leaf the params do not have, a wrong number of axes, or axes of
            different sizes sharing a permutation, or an axis not a whole number of blocks
            (naming the leaves and sizes).
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
            for axis, entry in enumerate(axes):
                name, block = units(entry)
                if name is None:
                    continue
                if shape[axis] % block:
                    raise JaxmergeError(f"axis {axis} of {path_str(spec_key)!r} has {shape[axis]} entries, not a whole "
                                        f"number of blocks of {block} (permutation {name!r})")
                count = shape[axis] // block
                if name in sizes and sizes[name][0] != count:
                    size, other, other_axis = sizes[name]
                    raise JaxmergeError(f"permutation {name!r} joins axes of different sizes: {path_str(spec_key)!r} "
                                     f"axis {axis} has {count}, {other!r} axis {other_axis} has {size}")
                sizes.setdefault(name, (count, path_str(spec_key), axis))
        return BoundSpec(self, {k: index[k] for k in self.axes}, {n: s[0] for n, s in sizes.items()})


@dataclasses.dataclass(frozen=True)
class BoundSpec:
    """A spec matched to a tree: the leaf index of every spec path and every permutation's size."""
    spec: PermutationSpec
    leaf_index: dict[tuple[str, ...], int]
    sizes: dict[str, int]

    def axes_of(self, name: str) -> list[tuple[int, int, int]]:
        """``(leaf index, axis, entries per unit)`` of every axis that permutation ``name`` acts on."""
        return [(self.leaf_index[k], axis, units(entry)[1]) for k, axes in self.spec.axes.items()
                for axis, entry in enumerate(axes) if units(entry)[0] == name]


def _natural(key: tuple[str, ...]):
    return [int(t) if t.isdigit() else t for part in key for t in re.split(r"(\d+)", part)]


def _find(keys: list[tuple[str, ...]], prefix: str, name: str) -> tuple[str, ...] | None:
    want = _as_key(prefix) + (name,)
    for k in keys:
        if k == want or k == want + ("value",):
            return want
    return None


def _dense_layers(params: PyTree) -> list[str]:
    keys = [state_key(k) for k in flatten_with_keys(params)[0]]
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
    """The permutation spec of an MLP (a chain of dense layers).

    For dense layers ``0 .. L-1``, the output units of layer ``i < L-1`` (the hidden units)
    are permuted by ``'{prefix}_{i}'``: it acts on axis 1 of layer ``i``'s kernel, on its
    bias, and on axis 0 of layer ``i+1``'s kernel. The network's inputs (axis 0 of the
    first kernel) and outputs (axis 1 of the last kernel and its bias) stay in place, so
    ``x -> act(x W_0 + b_0) W_1 + ...`` is unchanged by any such permutation. Only the
    layers' kernels and biases are named; the spec is checked against the tree's shapes
    when it is used (:meth:`PermutationSpec.bind`).

    Args:
      params: the MLP's parameters (Linen ``{'params': ...}``, an ``nnx.State``, a dict).
      layers: the dense layers' paths in order (each holding ``kernel`` of shape
        ``(in, out)`` and optionally ``bias``); by default every 2-d ``kernel`` in natural
        order of their paths (``Dense_2`` before ``Dense_10``).
      prefix: the start of the permutations' names.

    Returns:
      A :class:`PermutationSpec` with the ``L - 1`` permutations
      ``'{prefix}_0' .. '{prefix}_{L-2}'``.

    Raises:
      JaxmergeError: fewer than 2 dense layers, or a layer path with no ``kernel`` leaf.

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
      ...           "Dense_1": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)}}
      >>> spec = jaxmerge.mlp_permutation_spec(params)
      >>> spec.names
      ['hidden_0']
      >>> spec.axes[("Dense_0", "kernel")], spec.axes[("Dense_1", "kernel")], spec.axes[("Dense_1", "bias")]
      ((None, 'hidden_0'), ('hidden_0', None), (None,))
    """
    layers = list(layers) if layers is not None else _dense_layers(params)
    if len(layers) < 2:
        raise JaxmergeError(f"an MLP needs at least 2 dense layers to permute, found {layers}")
    names = [f"{prefix}_{i}" for i in range(len(layers) - 1)]
    return PermutationSpec(_chain(params, layers, None, names, lambda into, out: (into, out)))


def cnn_permutation_spec(params: PyTree, convs: Sequence[str], dense: Sequence[str] = (),
                         norms: Sequence[str | None] | None = None, *, prefix: str = "channels") -> PermutationSpec:
    """The permutation spec of a CNN: conv layers, then global pooling and dense layers.

    Conv ``i``'s output channels are permuted by ``'{prefix}_{i}'``: it acts on axis 3 of
    conv ``i``'s kernel (``(h, w, in, out)``), on its bias, on the norm layer after it, and
    on axis 2 of the next conv's kernel, or on axis 0 of the first dense kernel after the
    last conv (global pooling keeps the channel axis). Dense layer ``j``'s hidden outputs
    are permuted by ``'{prefix}_dense_{j}'`` as in :func:`mlp_permutation_spec`. The
    network's input channels and final outputs stay in place: the last dense layer's
    outputs, or without dense layers the last conv's (which then gets no permutation, and
    its norm layer is not named).

    Args:
      params: the parameters, with any BatchNorm statistics (e.g. Linen's whole variables).
      convs: the conv layers' paths in order.
      dense: the dense layers after global pooling, in order (the last one's outputs are
        not permuted).
      norms: for each conv, the name of the norm layer after it (or None): one path entry
        such as ``'BatchNorm_0'``, not a ``'/'``-joined path. Every ``scale``, ``bias``,
        ``mean`` and ``var`` leaf under an entry of that name, in any collection, is
        permuted with the conv's channels.
      prefix: the start of the permutations' names.

    Returns:
      A :class:`PermutationSpec` with the permutations ``'{prefix}_{i}'`` (one per conv, or
      one per conv but the last without dense layers) and ``'{prefix}_dense_{j}'`` (one per
      dense layer but the last).

    Raises:
      JaxmergeError: a conv or dense path with no ``kernel`` leaf, or a norm name with no
        ``scale``, ``bias``, ``mean`` or ``var`` leaf under it.

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> variables = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 4))},
      ...                         "BatchNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
      ...                         "Dense_0": {"kernel": jnp.ones((4, 2))}},
      ...              "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}}
      >>> spec = jaxmerge.cnn_permutation_spec(variables, convs=["params/Conv_0"], dense=["params/Dense_0"],
      ...                                      norms=["BatchNorm_0"])
      >>> spec.names
      ['channels_0']
      >>> spec.axes[("params", "Conv_0", "kernel")], spec.axes[("params", "Dense_0", "kernel")]
      ((None, None, None, 'channels_0'), ('channels_0', None))
      >>> spec.axes[("batch_stats", "BatchNorm_0", "var")]
      ('channels_0',)
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
        matched = [state_key(k) for k in flatten_with_keys(params)[0]
                   if norm in k and state_key(k)[-1] in ("scale", "bias", "mean", "var")]
        if not matched:
            raise JaxmergeError(f"no scale, bias, mean or var leaf under a {norm!r} module")
        axes.update({k: (name,) for k in matched})
    return PermutationSpec(axes)


def transformer_block_permutation_spec(params: PyTree, *, query: str, key: str, value: str, out: str,
                                       fc1: str, fc2: str, prefix: str = "block", residual: str | None = None,
                                       norms: Sequence[str] = ()) -> PermutationSpec:
    """The permutation spec of one transformer block: attention heads and MLP hidden units.

    The heads permutation ``'{prefix}_heads'`` acts on the heads axis of the query, key and
    value kernels (``(d, heads, head_dim)``, Flax's ``DenseGeneral``/``LinearGeneral``
    layout) and biases (``(heads, head_dim)``), and of the output projection kernel
    (``(heads, head_dim, d)``): attention is a sum over heads, so reordering whole heads
    leaves it unchanged. ``'{prefix}_mlp'`` acts on the MLP's hidden units (axis 1 of the
    ``fc1`` kernel and its bias, axis 0 of the ``fc2`` kernel). The order of units within a
    head is not permuted. With ``residual``, that permutation acts on the model dimension
    ``d``: the input axis of the query, key, value and ``fc1`` kernels, the output axis of the
    ``out`` and ``fc2`` kernels and their biases, and the ``scale`` and ``bias`` of the block's
    ``norms`` (LayerNorm and RMSNorm normalise over ``d``, which no permutation changes).
    Combine the specs of several blocks (distinct ``prefix`` each, one ``residual`` name
    shared) with ``|``, and add the embedding (its ``d`` axis), the final norm and the head's
    input axis under the same name, so that the residual stream moves as one.

    Args:
      params: the parameters holding the block (a dict, Linen variables or an
        ``nnx.State``).
      query: path of the query projection.
      key: path of the key projection.
      value: path of the value projection.
      out: path of the attention output projection.
      fc1: path of the MLP's first dense layer (kernel ``(d, hidden)``).
      fc2: path of the MLP's second dense layer (kernel ``(hidden, d)``).
      prefix: the start of the permutations' names.
      residual: the name of the residual stream's permutation, or None to leave it in place.
      norms: paths of the block's norm layers (their ``scale`` and ``bias`` move with
        ``residual``).

    Returns:
      A :class:`PermutationSpec` with the permutations ``'{prefix}_heads'`` and
      ``'{prefix}_mlp'``, and ``residual`` if given.

    Raises:
      JaxmergeError: one of the six paths has no ``kernel`` leaf, or a norm path has no
        ``scale`` or ``bias``.

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> params = {name: {"kernel": jnp.ones((4, 2, 2))} for name in ("q", "k", "v")}
      >>> params |= {"o": {"kernel": jnp.ones((2, 2, 4))}, "fc1": {"kernel": jnp.ones((4, 8))},
      ...            "fc2": {"kernel": jnp.ones((8, 4))}}
      >>> spec = jaxmerge.transformer_block_permutation_spec(params, query="q", key="k", value="v", out="o",
      ...                                                    fc1="fc1", fc2="fc2")
      >>> spec.axes[("q", "kernel")], spec.axes[("o", "kernel")]
      ((None, 'block_heads', None), ('block_heads', None, None))
      >>> spec.bind(params).sizes
      {'block_heads': 2, 'block_mlp': 8}
    """
    keys = flatten_with_keys(params)[0]
    heads, mlp, r = f"{prefix}_heads", f"{prefix}_mlp", residual
    axes = {}
    for layer in (query, key, value):
        axes[_find(keys, layer, "kernel") or _missing(layer)] = (r, heads, None)
        bias = _find(keys, layer, "bias")
        if bias is not None:
            axes[bias] = (heads, None)
    axes[_find(keys, out, "kernel") or _missing(out)] = (heads, None, r)
    axes.update(_chain(params, [fc1, fc2], None, [mlp], lambda into, out_: (into, out_)))
    if r is not None:
        axes[_find(keys, fc1, "kernel")] = (r, mlp)
        axes[_find(keys, fc2, "kernel")] = (mlp, r)
        for layer, names in ((out, ("bias",)), (fc2, ("bias",)), *((norm, ("scale", "bias")) for norm in norms)):
            found = [k for k in (_find(keys, layer, n) for n in names) if k is not None]
            if layer in norms and not found:
                raise JaxmergeError(f"no scale or bias under the norm {layer!r}")
            axes.update({k: (r,) for k in found})
    return PermutationSpec(axes)


def _missing(layer: str):
    raise JaxmergeError(f"no kernel under {layer!r}")


def random_permutation(spec: PermutationSpec, params: PyTree, seed: int = 0) -> dict[str, np.ndarray]:
    """A random permutation for every name of ``spec`` (for tests and demonstrations).

    Binds ``spec`` to ``params`` to learn each permutation's size ``n``, then draws a
    uniformly random ordering of ``0 .. n-1`` for each name, from NumPy's
    ``default_rng(seed)``: the same ``seed`` gives the same permutations. Applying the
    result with :func:`apply_permutation` gives a functionally identical network with
    shuffled hidden units, which :func:`weight_matching` should undo.

    Args:
      spec: the permutation spec.
      params: a parameter tree the spec describes (only its shapes are read).
      seed: the seed of the random generator.

    Returns:
      ``{name: index array}``, one integer array of the permutation's size per name.

    Raises:
      JaxmergeError: ``spec`` does not match ``params`` (see :meth:`PermutationSpec.bind`).

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> spec = jaxmerge.PermutationSpec({"l0/kernel": (None, "h"), "l1/kernel": ("h", None)})
      >>> params = {"l0": {"kernel": jnp.ones((2, 5))}, "l1": {"kernel": jnp.ones((5, 1))}}
      >>> perm = jaxmerge.random_permutation(spec, params, seed=1)
      >>> sorted(perm["h"].tolist())
      [0, 1, 2, 3, 4]
      >>> bool((perm["h"] == jaxmerge.random_permutation(spec, params, seed=1)["h"]).all())
      True
    """
    rng = np.random.default_rng(seed)
    return {name: rng.permutation(size) for name, size in spec.bind(params).sizes.items()}
