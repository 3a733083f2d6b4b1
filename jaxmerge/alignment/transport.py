"""Optimal-transport fusion (Singh & Jaggi, arXiv 1910.05653): move a model's units onto a
reference's by transport plans between neurons, layer by layer, so that models of different
widths can be averaged.

For each permutation name ``p`` of the spec (``n`` units in the model, ``m`` in the reference),
in an order where every layer's inputs are solved before its outputs, a transport plan ``T``
(``n x m``, uniform marginals ``1/n`` and ``1/m``) minimises ``sum T[i, j] C[i, j]``. The ground
cost ``C[i, j]`` is the squared distance between the model's unit ``i`` and the reference's
unit ``j``: of their incoming weights (the leaves' slices along ``p``, with their input axes
already transported), or of their activations on data. Then each leaf is transported along
``p``:

- where ``p`` is an output axis (the last axis of a kernel, a bias, a norm's statistics), unit
  ``j`` becomes the average of the model's units sent to it, ``sum_i T[i, j] w_i / sum_i T[i, j]``
  (the paper's ``T diag(1/beta)``);
- where ``p`` is an input axis (the second-to-last axis of a kernel), unit ``i``'s outgoing
  weights are split among the units it is sent to, ``w'_j = sum_i (T[i, j] / sum_j T[i, j]) w_i``,
  so that merging two identical units adds their outgoing weights and splitting one keeps its
  total. (The paper normalises input axes by ``diag(1/beta)`` too; for a permutation the two
  agree.)

The plans come from ott-jax: its Hungarian solver (``solver='exact'``; for ``n != m`` on the
``lcm(n, m)`` copies that turn uniform transport into an assignment, which is exact) or its
Sinkhorn solver (``solver='sinkhorn'``, soft plans).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge._promotion import standard_promotion
from jaxmerge._tree import PyTree, flatten_with_keys, leaf_spec, path_str
from jaxmerge.alignment.spec import PermutationSpec, units
from jaxmerge.errors import JaxmergeError

_MAX_EXPANDED_UNITS = 4096  # exact transport between n != m units solves an lcm(n, m) assignment


def _axis_roles(spec: PermutationSpec, params: PyTree) -> dict[tuple, tuple]:
    """``{leaf index: {axis: (name, 'in' | 'out')}}`` for every spec'd leaf: a kernel's
    second-to-last axis is its input, its last (or a 1-d leaf's only) axis its output."""
    bound = spec.bind(params)
    leaves = flatten_with_keys(params)[1]
    roles = {}
    for key, index in bound.leaf_index.items():
        ndim = len(leaf_spec(leaves[index]).shape)
        axes = {}
        for axis, entry in enumerate(spec.axes[key]):
            name, block = units(entry)
            if name is None:
                continue
            if block != 1:
                raise JaxmergeError(f"transport moves single units; the spec moves blocks of {block} along axis {axis} "
                                    f"of {path_str(key)!r}")
            if ndim >= 2 and axis == ndim - 2:
                axes[axis] = (name, "in")
            elif axis == ndim - 1:
                axes[axis] = (name, "out")
            else:
                raise JaxmergeError(f"transport moves the input (second-to-last) and output (last) axes of kernels and "
                                    f"the axis of 1-d leaves; the spec names axis {axis} of {path_str(key)!r}")
        roles[index] = axes
    return roles


def _order(roles: dict) -> list[str]:
    """The permutation names, each after those on the input axes of the leaves it is the output of."""
    needs: dict[str, set] = {}
    for axes in roles.values():
        inputs = {name for name, role in axes.values() if role == "in"}
        for name, role in axes.values():
            needs.setdefault(name, set())
            if role == "out":
                needs[name] |= inputs - {name}
    order: list[str] = []
    while len(order) < len(needs):
        ready = [name for name in needs if name not in order and needs[name] <= set(order)]
        if not ready:
            raise JaxmergeError(f"the spec's permutations depend on each other in a cycle: "
                                f"{sorted(set(needs) - set(order))}")
        order.extend(ready)
    return order


def _moved(leaf: np.ndarray, axis: int, matrix: np.ndarray) -> np.ndarray:
    """``leaf`` with axis ``axis`` (``n`` units) replaced by ``m``: ``new[.., j, ..] = sum_i M[i, j] old[.., i, ..]``."""
    return np.moveaxis(np.tensordot(leaf, matrix, axes=([axis], [0])), -1, axis)


@functools.cache
def _solvers() -> tuple:
    """ott-jax's Hungarian and Sinkhorn solvers on a cost matrix, jitted (imported on first use)."""
    with warnings.catch_warnings():  # ott-jax imports jaxopt, which warns that it is unmaintained
        warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
        try:
            from ott.geometry import geometry
            from ott.problems.linear import linear_problem
            from ott.solvers.linear import sinkhorn
            from ott.tools import unreg
        except ImportError as e:
            raise JaxmergeError("transport needs ott-jax: pip install 'jaxmerge[alignment]'") from e

    def exact(cost):
        return unreg.hungarian(geometry.Geometry(cost))[1].paired_indices

    def entropic(cost, epsilon):
        geom = geometry.Geometry(cost, epsilon=epsilon, relative_epsilon="mean")
        return sinkhorn.Sinkhorn()(linear_problem.LinearProblem(geom)).matrix

    return jax.jit(exact), jax.jit(entropic)


def _plan(cost: np.ndarray, solver: str, epsilon: float) -> np.ndarray:
    """The optimal transport plan between ``n`` and ``m`` units with uniform marginals."""
    exact, entropic = _solvers()
    n, m = cost.shape
    with standard_promotion():
        if solver == "sinkhorn":
            return np.asarray(entropic(jnp.asarray(cost, jnp.float32), epsilon), np.float64)
        size = math.lcm(n, m)
        if size > _MAX_EXPANDED_UNITS:
            raise JaxmergeError(f"exact transport between {n} and {m} units solves an assignment of lcm({n}, {m}) = "
                                f"{size} copies (at most {_MAX_EXPANDED_UNITS}); use solver='sinkhorn'")
        rows, cols = np.repeat(np.arange(n), size // n), np.repeat(np.arange(m), size // m)
        pairs = np.asarray(exact(jnp.asarray(cost[rows][:, cols], jnp.float32)))
    plan = np.zeros((n, m))
    np.add.at(plan, (rows[pairs[0]], cols[pairs[1]]), 1.0 / size)
    return plan


def transport(spec: PermutationSpec, reference: PyTree, model: PyTree, *, solver: Literal["exact", "sinkhorn"] = "exact",
              epsilon: float = 0.01, cost: Literal["weights", "activations"] = "weights",
              apply_fn: Callable | None = None, data: Iterable | None = None) -> PyTree:
    """``model`` moved onto ``reference``'s units by optimal transport, layer by layer.

    Args:
      spec: which axes of which leaves carry each set of units. Only the last two axes of a
        kernel (input, output) and the axis of 1-d leaves may be named (dense layers, convs,
        biases, norms: :func:`~jaxmerge.mlp_permutation_spec`,
        :func:`~jaxmerge.cnn_permutation_spec`).
      reference: the tree whose units ``model`` is moved onto; it sets the result's widths.
      model: the tree to move, with ``reference``'s structure; along the spec's named axes it
        may have any number of units.
      solver: ``'exact'`` (ott-jax's Hungarian solver, plans of ``1/lcm(n, m)`` masses; a
        permutation when the widths are equal) or ``'sinkhorn'`` (ott-jax's entropic solver,
        soft plans).
      epsilon: Sinkhorn's entropic regularisation, relative to the mean cost.
      cost: ``'weights'`` (distances between units' incoming weights) or ``'activations'``
        (between their activations on ``data`` run through ``apply_fn``, captured as
        :func:`~jaxmerge.activation_matching` does).
      apply_fn: ``apply_fn(params, batch)``, the forward pass of both models (for
        ``cost='activations'``).
      data: the batches (for ``cost='activations'``).

    Returns:
      ``model`` transported: a tree with ``reference``'s structure and shapes (float64
      leaves computed on the host, cast back to ``model``'s dtypes).

    Raises:
      JaxmergeError: trees of different structure or of different sizes outside the named
        axes, a spec naming an axis transport cannot move, an unknown solver or cost, a
        missing ``apply_fn`` or ``data``, or exact transport whose ``lcm(n, m)`` exceeds 4096.

    References:
      Singh & Jaggi, "Model Fusion via Optimal Transport", arXiv 1910.05653.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> spec = jaxmerge.PermutationSpec({"l0/kernel": (None, "h"), "l1/kernel": ("h", None)})
      >>> wide = {"l0": {"kernel": jnp.asarray([[1.0, 1.0, 5.0, 5.0]])},  # two pairs of equal units
      ...         "l1": {"kernel": jnp.asarray([[1.0], [2.0], [3.0], [4.0]])}}
      >>> narrow = {"l0": {"kernel": jnp.asarray([[5.1, 0.9]])}, "l1": {"kernel": jnp.zeros((2, 1))}}
      >>> moved = jaxmerge.transport(spec, narrow, wide)
      >>> moved["l0"]["kernel"].tolist(), moved["l1"]["kernel"].tolist()  # equal units merged, outputs added
      ([[5.0, 1.0]], [[7.0], [3.0]])
    """
    if solver not in ("exact", "sinkhorn"):
        raise JaxmergeError(f"solver must be 'exact' or 'sinkhorn', got {solver!r}")
    if cost not in ("weights", "activations"):
        raise JaxmergeError(f"cost must be 'weights' or 'activations', got {cost!r}")
    if cost == "activations" and (apply_fn is None or data is None):
        raise JaxmergeError("cost='activations' needs apply_fn and data")
    keys, ref_leaves, treedef = flatten_with_keys(reference)
    model_keys, model_leaves, _ = flatten_with_keys(model)
    if model_keys != keys:
        raise JaxmergeError("model and reference have different leaves")
    roles = _axis_roles(spec, reference)
    _axis_roles(spec, model)
    _check_other_axes(keys, roles, ref_leaves, model_leaves)
    moved = [np.asarray(x, np.float64) for x in model_leaves]
    ref = [np.asarray(x, np.float64) for x in ref_leaves]
    correlations = None
    if cost == "activations":
        from jaxmerge.alignment.activations import unit_correlations

        correlations = unit_correlations(spec, apply_fn, reference, model, data)
    for name in _order(roles):
        outputs = [(i, axis) for i, axes in roles.items() for axis, (n, role) in axes.items() if n == name and role == "out"]
        if correlations is not None:
            distance = correlations[name].squared_distance().T
        elif outputs:
            distance = _weight_distance(moved, ref, outputs)
        else:
            raise JaxmergeError(f"no leaf has {name!r} as its output axis, so its units have no weights to compare")
        _carry(moved, roles, name, _plan(distance, solver, epsilon))
    return _rebuilt(treedef, moved, model_leaves, roles)


def _carry(moved: list, roles: dict, name: str, plan: np.ndarray) -> None:
    """Move every axis carrying ``name`` by ``plan`` (``n x m``): output axes take the mean of
    the units sent to each new one, input axes split each unit's weights by where it goes (a
    unit sent nowhere is dropped)."""
    for i, axes in roles.items():
        for axis, (n, role) in axes.items():
            if n == name:
                total = plan.sum(0, keepdims=True) if role == "out" else plan.sum(1, keepdims=True)
                moved[i] = _moved(moved[i], axis, np.divide(plan, total, out=np.zeros_like(plan), where=total > 0))


def _rebuilt(treedef, moved: list, leaves: list, roles: dict) -> PyTree:
    """The tree of the moved leaves (cast back to the originals' dtypes) and the others as they were."""
    dtypes = [leaf_spec(x).dtype for x in leaves]
    return jax.tree.unflatten(treedef, [jnp.asarray(x).astype(d) if i in roles else leaf
                                        for i, (x, d, leaf) in enumerate(zip(moved, dtypes, leaves))])


def _resized(spec: PermutationSpec, model: PyTree, widths: Mapping[str, int]) -> PyTree:
    """``model`` with ``widths[name]`` units per permutation, picked evenly spaced (repeated, their
    outgoing weights split, when there are more units than the model's; the others' kept)."""
    _, leaves, treedef = flatten_with_keys(model)
    roles = _axis_roles(spec, model)
    moved = [np.asarray(x, np.float64) for x in leaves]
    for name, size in spec.bind(model).sizes.items():
        width = widths.get(name, size)
        if width < 1:
            raise JaxmergeError(f"widths[{name!r}] must be at least 1, got {width}")
        plan = np.zeros((size, width))
        plan[np.arange(width) * size // width, np.arange(width)] = 1.0
        _carry(moved, roles, name, plan)
    return _rebuilt(treedef, moved, leaves, roles)


def _weight_distance(moved: list, ref: list, outputs: list) -> np.ndarray:
    """``[i, j]``: squared distance between the model's unit ``i`` and the reference's unit ``j``
    over the leaves where the units are outputs."""
    a = np.concatenate([np.moveaxis(moved[i], axis, 0).reshape(moved[i].shape[axis], -1) for i, axis in outputs], 1)
    b = np.concatenate([np.moveaxis(ref[i], axis, 0).reshape(ref[i].shape[axis], -1) for i, axis in outputs], 1)
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def _check_other_axes(keys: list, roles: dict, ref_leaves: list, model_leaves: list) -> None:
    for i, (key, a, b) in enumerate(zip(keys, ref_leaves, model_leaves)):
        shape_a, shape_b = leaf_spec(a).shape, leaf_spec(b).shape
        named = roles.get(i, {})
        if len(shape_a) != len(shape_b) or any(x != y for axis, (x, y) in enumerate(zip(shape_a, shape_b))
                                               if axis not in named):
            raise JaxmergeError(f"{path_str(key)!r} has shape {shape_b} in model and {shape_a} in reference; only the "
                                "spec's named axes may differ")


def ot_fusion(spec: PermutationSpec, models: Sequence[PyTree], *, reference: int | PyTree = 0,
              weights: Sequence[float] | None = None, widths: Mapping[str, int] | None = None, rounds: int = 1,
              **kwargs) -> PyTree:
    """The weighted average of ``models``, each moved onto ``reference``'s units by transport.

    Args:
      spec: which axes of which leaves carry each set of units (see :func:`transport`).
      models: the models to fuse: one structure, any widths along the spec's named axes.
      reference: the index of the model whose units (and widths) the fused model has, or a
        tree of the widths wanted (e.g. one of the models pruned, or another trained model).
        A model that is the reference is used as it is.
      weights: each model's weight in the average (default: equal).
      widths: ``{name: units}``, a width of the fused model's own for some permutations:
        the reference is first resized to it, keeping evenly spaced units (each repeated,
        its outgoing weights split, when the width is larger).
      rounds: the times the models are moved onto the fused model and averaged again, each
        round's result the next one's reference (a free-support barycenter; more than one
        helps most after ``widths`` resized the reference).
      **kwargs: ``solver``, ``epsilon``, ``cost``, ``apply_fn`` and ``data``, passed to
        :func:`transport`.

    Returns:
      The fused model, with ``reference``'s structure and shapes (with ``widths``, those).

    Raises:
      JaxmergeError: no models, weights of another length or summing to 0, a width below 1,
        or what :func:`transport` raises.

    References:
      Singh & Jaggi, "Model Fusion via Optimal Transport", arXiv 1910.05653.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> spec = jaxmerge.PermutationSpec({"l0/kernel": (None, "h"), "l1/kernel": ("h", None)})
      >>> a = {"l0": {"kernel": jnp.asarray([[1.0, 2.0, 3.0]])}, "l1": {"kernel": jnp.asarray([[4.0], [5.0], [6.0]])}}
      >>> b = jaxmerge.apply_permutation(spec, {"h": [2, 0, 1]}, a)
      >>> ot_fusion(spec, [a, b])["l0"]["kernel"].tolist()  # the same units, found and averaged
      [[1.0, 2.0, 3.0]]
    """
    import jaxmerge

    if not models:
        raise JaxmergeError("ot_fusion needs at least one model")
    weights = [1.0] * len(models) if weights is None else list(weights)
    if len(weights) != len(models) or sum(weights) == 0:
        raise JaxmergeError(f"weights must have one entry per model ({len(models)}) and not sum to 0, got {weights}")
    target = models[reference] if isinstance(reference, int) else reference
    if widths:
        target = _resized(spec, target, widths)
    for _ in range(rounds):
        moved = [m if m is target else transport(spec, target, m, **kwargs) for m in models]
        target = jaxmerge.average(moved, weights)
    return target
