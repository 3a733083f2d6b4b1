"""Git Re-Basin weight matching (Ainsworth et al., arXiv 2209.04836): permute a model's hidden
units to line up with a reference model's, so that the two can be interpolated or merged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxmerge._tree import PyTree, flatten_models, flatten_with_keys
from jaxmerge.alignment.spec import BoundSpec, PermutationSpec
from jaxmerge.errors import JaxmergeError


def _permuted(leaf: np.ndarray, axes: tuple, perm: dict, skip_axis: int | None = None) -> np.ndarray:
    for axis, name in enumerate(axes):
        if name is not None and axis != skip_axis:
            leaf = np.take(leaf, perm[name], axis=axis)
    return leaf


def _check_perm(bound: BoundSpec, perm: dict) -> None:
    for name, size in bound.sizes.items():
        if name not in perm:
            raise JaxmergeError(f"perm has no permutation {name!r}")
        if sorted(np.asarray(perm[name]).tolist()) != list(range(size)):
            raise JaxmergeError(f"perm[{name!r}] is not a permutation of {size} units")


def apply_permutation(spec: PermutationSpec, perm: dict, params: PyTree) -> PyTree:
    """``params`` with every spec'd axis reordered: ``take(leaf, perm[name], axis)``.

    Leaves the spec does not name are unchanged; so is the function the network computes,
    when the spec describes it correctly.
    """
    bound = spec.bind(params)
    _check_perm(bound, perm)
    keys, leaves, treedef = flatten_with_keys(params)
    leaves = list(leaves)
    for spec_key, index in bound.leaf_index.items():
        leaf = leaves[index]
        for axis, name in enumerate(spec.axes[spec_key]):
            if name is not None:
                leaf = jnp.take(leaf, jnp.asarray(perm[name]), axis=axis)
        leaves[index] = leaf
    return jax.tree.unflatten(treedef, leaves)


def weight_matching(spec: PermutationSpec, reference: PyTree, model: PyTree, *, max_iter: int = 100,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Permutations of ``model``'s units that best match ``reference``'s weights.

    Maximises ``sum <W_reference, P(W_model)>`` over every spec'd leaf by coordinate descent:
    in random order, each permutation is re-solved as a linear assignment problem with the
    others held fixed, until a full sweep improves nothing (or ``max_iter`` sweeps).

    Returns:
      ``{name: index array}`` to pass to :func:`apply_permutation` (on ``model``).
    """
    flatten_models([reference, model], names=["reference", "model"])
    bound = spec.bind(reference)
    ref = [np.asarray(x, np.float64) for x in flatten_with_keys(reference)[1]]
    other = [np.asarray(x, np.float64) for x in flatten_with_keys(model)[1]]
    axes = {index: spec.axes[key] for key, index in bound.leaf_index.items()}
    perm = {name: np.arange(size) for name, size in bound.sizes.items()}
    rng = np.random.default_rng(seed)
    names = spec.names
    for _ in range(max_iter):
        improved = False
        for name in rng.permutation(names):
            size = bound.sizes[name]
            cost = np.zeros((size, size))
            for index, axis in bound.axes_of(name):
                a = np.moveaxis(ref[index], axis, 0).reshape(size, -1)
                b = np.moveaxis(_permuted(other[index], axes[index], perm, skip_axis=axis), axis, 0).reshape(size, -1)
                cost += a @ b.T
            _, assignment = linear_sum_assignment(cost, maximize=True)
            rows = np.arange(size)
            if cost[rows, assignment].sum() > cost[rows, perm[name]].sum() + 1e-12:
                improved = True
            perm[name] = assignment
        if not improved:
            break
    return perm


def align(spec: PermutationSpec, reference: PyTree, model: PyTree, **kwargs) -> PyTree:
    """``model`` with its units permuted to match ``reference`` (:func:`weight_matching`)."""
    return apply_permutation(spec, weight_matching(spec, reference, model, **kwargs), model)
