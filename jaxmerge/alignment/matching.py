"""Git Re-Basin weight matching (Ainsworth et al., arXiv 2209.04836): permute a model's hidden
units to line up with a reference model's, so that the two can be interpolated or merged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge._tree import PyTree, flatten_models, flatten_with_keys
from jaxmerge.alignment.spec import BoundSpec, PermutationSpec, grouped, permute_axis, units
from jaxmerge.errors import JaxmergeError


def _permuted(leaf, axes: tuple, perm: dict, skip_axis: int | None = None):
    for axis, entry in enumerate(axes):
        name, block = units(entry)
        if name is not None and axis != skip_axis:
            leaf = permute_axis(leaf, axis, np.asarray(perm[name]), block)
    return leaf


def _check_perm(bound: BoundSpec, perm: dict) -> None:
    for name, size in bound.sizes.items():
        if name not in perm:
            raise JaxmergeError(f"perm has no permutation {name!r}")
        if sorted(np.asarray(perm[name]).tolist()) != list(range(size)):
            raise JaxmergeError(f"perm[{name!r}] is not a permutation of {size} units")


def apply_permutation(spec: PermutationSpec, perm: dict, params: PyTree) -> PyTree:
    """Reorder the hidden units of ``params`` by the permutations ``perm``.

    Every axis the spec names is reordered by its permutation's index array:
    ``leaf = take(leaf, perm[name], axis)``, i.e. ``new[..., j, ...] = old[..., perm[name][j], ...]``,
    one named axis after another. Leaves the spec does not name are unchanged; so is the
    function the network computes, when the spec describes it correctly. Entries of
    ``perm`` that the spec does not name are ignored.

    Args:
      spec: which axes of which leaves each permutation acts on.
      perm: ``{name: index array}`` with a permutation of ``0 .. n-1`` for every name of
        ``spec`` (as :func:`weight_matching` or :func:`random_permutation` return).
      params: the parameter tree to permute.

    Returns:
      A pytree with ``params``' structure; the spec'd leaves are permuted (as JAX
      arrays), the others are ``params``' own.

    Raises:
      JaxmergeError: ``spec`` does not match ``params`` (a missing leaf, a wrong number of
        axes, or a permutation joining axes of different sizes), ``perm`` lacks one of the
        spec's names, or an entry is not a permutation of its axis' size.

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> spec = jaxmerge.PermutationSpec({"l0/kernel": (None, "h"), "l0/bias": ("h",), "l1/kernel": ("h", None)})
      >>> params = {"l0": {"kernel": jnp.asarray([[1.0, 2.0, 3.0]]), "bias": jnp.asarray([10.0, 20.0, 30.0])},
      ...           "l1": {"kernel": jnp.asarray([[4.0], [5.0], [6.0]])}}
      >>> out = jaxmerge.apply_permutation(spec, {"h": [2, 0, 1]}, params)
      >>> out["l0"]["kernel"].tolist(), out["l0"]["bias"].tolist(), out["l1"]["kernel"].tolist()
      ([[3.0, 1.0, 2.0]], [30.0, 10.0, 20.0], [[6.0], [4.0], [5.0]])
    """
    bound = spec.bind(params)
    _check_perm(bound, perm)
    _, leaves, treedef = flatten_with_keys(params)
    leaves = list(leaves)
    for spec_key, index in bound.leaf_index.items():
        leaves[index] = _permuted(jnp.asarray(leaves[index]), spec.axes[spec_key], perm)
    return jax.tree.unflatten(treedef, leaves)


def weight_matching(spec: PermutationSpec, reference: PyTree, model: PyTree, *, max_iter: int = 100,
                    seed: int = 0, init_perm: dict | None = None) -> dict[str, np.ndarray]:
    """Permutations of ``model``'s units that best match ``reference``'s weights (Git Re-Basin).

    Maximises ``sum_leaves <W_reference, P(W_model)>`` (the Frobenius inner product, summed
    over every leaf the spec names; ``P`` applies the permutations as
    :func:`apply_permutation` does) by coordinate descent. It starts from ``init_perm``, or
    else from each permutation solved on the leaves that no other permutation touches (biases,
    norms, the first layer's kernel; the identity where there are none), which keeps
    networks with a shared residual stream out of poor local optima. Then, in
    an order drawn at random each sweep, each permutation ``p`` of size ``n`` is re-solved
    with the others held fixed, as the linear assignment problem
    ``max_pi sum_i C[i, pi(i)]``, where ``C[i, j]`` sums, over every axis ``p`` acts on, the
    inner product of unit ``i`` of the reference with unit ``j`` of the model (all its other
    axes already permuted). The sweeps stop when one improves nothing, or after
    ``max_iter``. Computed in float64 with NumPy and SciPy, on the host.

    Args:
      spec: which axes of which leaves each permutation acts on.
      reference: the parameter tree to match (it is not changed).
      model: the parameter tree to permute, with ``reference``'s structure and shapes.
      max_iter: the most sweeps over all permutations.
      seed: seed of the random order of the permutations within a sweep.
      init_perm: the permutations to start from (default: as described above), e.g. the previous
        solution when ``reference`` has changed a little.

    Returns:
      ``{name: index array}`` to pass to :func:`apply_permutation` (on ``model``).

    Raises:
      JaxmergeError: ``model`` and ``reference`` differ in leaves, shapes or dtype kinds,
        or ``spec`` does not match them (a missing leaf, a wrong number of axes, or a
        permutation joining axes of different sizes).

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> spec = jaxmerge.PermutationSpec({"l0/kernel": (None, "h"), "l0/bias": ("h",), "l1/kernel": ("h", None)})
      >>> reference = {"l0": {"kernel": jnp.asarray([[1.0, 2.0, 3.0]]), "bias": jnp.asarray([10.0, 20.0, 30.0])},
      ...              "l1": {"kernel": jnp.asarray([[4.0], [5.0], [6.0]])}}
      >>> # model's unit j is reference's unit [2, 0, 1][j]; matching finds the inverse
      >>> model = jaxmerge.apply_permutation(spec, {"h": [2, 0, 1]}, reference)
      >>> jaxmerge.weight_matching(spec, reference, model)["h"].tolist()
      [1, 2, 0]
    """
    import scipy.optimize  # imported here: it takes a while, and only weight matching needs it

    flatten_models([reference, model], names=["reference", "model"])
    bound = spec.bind(reference)
    ref = [np.asarray(x, np.float64) for x in flatten_with_keys(reference)[1]]
    other = [np.asarray(x, np.float64) for x in flatten_with_keys(model)[1]]
    axes = {index: spec.axes[key] for key, index in bound.leaf_index.items()}

    def cost(name, only_alone=False):
        size = bound.sizes[name]
        total = np.zeros((size, size))
        for index, axis, block in bound.axes_of(name):
            if only_alone and sum(e is not None for e in axes[index]) > 1:
                continue
            a = np.moveaxis(grouped(ref[index], axis, block), axis, 0).reshape(size, -1)
            b = _permuted(other[index], axes[index], perm, skip_axis=axis)
            b = np.moveaxis(grouped(b, axis, block), axis, 0).reshape(size, -1)
            total += a @ b.T
        return total

    perm = {name: np.arange(size) for name, size in bound.sizes.items()}
    if init_perm is not None:
        _check_perm(bound, init_perm)
        perm = {name: np.asarray(init_perm[name]) for name in perm}
    else:  # each permutation solved on the leaves that only it permutes, where there are any
        for name in perm:
            alone = cost(name, only_alone=True)
            if alone.any():
                perm[name] = scipy.optimize.linear_sum_assignment(alone, maximize=True)[1]
    rng = np.random.default_rng(seed)
    names = spec.names
    for _ in range(max_iter):
        improved = False
        for name in rng.permutation(names):
            size = bound.sizes[name]
            cost_matrix = cost(name)
            _, assignment = scipy.optimize.linear_sum_assignment(cost_matrix, maximize=True)
            rows = np.arange(size)
            if cost_matrix[rows, assignment].sum() > cost_matrix[rows, perm[name]].sum() + 1e-12:
                improved = True
            perm[name] = assignment
        if not improved:
            break
    return perm


def align(spec: PermutationSpec, reference: PyTree, model: PyTree, **kwargs) -> PyTree:
    """``model`` with its hidden units permuted to line up with ``reference``'s (Git Re-Basin).

    ``apply_permutation(spec, weight_matching(spec, reference, model, **kwargs), model)``:
    the permutations that maximise ``sum_leaves <W_reference, P(W_model)>``, applied to
    ``model``. The result computes the same function as ``model`` (when the spec describes
    the network), but lies closer to ``reference``, so that interpolating or averaging the
    two works better than without alignment.

    Args:
      spec: which axes of which leaves each permutation acts on.
      reference: the parameter tree to match (it is not changed).
      model: the parameter tree to permute, with ``reference``'s structure and shapes.
      **kwargs: ``max_iter``, ``seed`` and ``init_perm``, passed to :func:`weight_matching`.

    Returns:
      ``model`` permuted: a pytree with its structure.

    Raises:
      JaxmergeError: ``model`` and ``reference`` differ in leaves, shapes or dtype kinds,
        or ``spec`` does not match them.
      TypeError: a keyword argument :func:`weight_matching` does not take.

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> spec = jaxmerge.PermutationSpec({"l0/kernel": (None, "h"), "l1/kernel": ("h", None)})
      >>> reference = {"l0": {"kernel": jnp.asarray([[1.0, 2.0, 3.0]])},
      ...              "l1": {"kernel": jnp.asarray([[4.0], [5.0], [6.0]])}}
      >>> model = {"l0": {"kernel": jnp.asarray([[3.0, 1.0, 2.0]])},  # the same units, shuffled
      ...          "l1": {"kernel": jnp.asarray([[6.0], [4.0], [5.0]])}}
      >>> aligned = jaxmerge.align(spec, reference, model)
      >>> aligned["l0"]["kernel"].tolist(), aligned["l1"]["kernel"].tolist()
      ([[1.0, 2.0, 3.0]], [[4.0], [5.0], [6.0]])
    """
    return apply_permutation(spec, weight_matching(spec, reference, model, **kwargs), model)
