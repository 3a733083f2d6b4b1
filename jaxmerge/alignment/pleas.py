"""PLeaS: merging two models by permutations and least squares, at any width between the
fully merged and the concatenated model (Nasery et al., arXiv 2407.02447).

1. **Permutations, with partial merging.** For each permutation name of the spec (``n`` units
   in both models), the units are paired by the correlation of their activations on data (as
   :func:`~jaxmerge.activation_matching`), and the ``2n - w`` best-correlated pairs are merged
   into one unit each, for a chosen width ``n <= w <= 2n``; the other units of both models are
   kept side by side. (``w = n`` merges every unit; ``w = 2n`` keeps both models whole.)
2. **Zip.** A first merged model: each merged unit's incoming weights are the mean of its
   sources', its outgoing weights half the sum (the merge of two identical units computes
   the models' average); kept units carry their weights, outgoing halved.
3. **Least squares.** Dense layer by dense layer, in order, the merged kernel and bias solve
   ``min_{W, b} sum_x || X_merged W + b - Y ||^2``, where ``X_merged`` are the merged
   model's inputs to that layer (its earlier layers already solved) and ``Y[:, u]`` the mean
   over its source models of the source units' pre-activations ``x_i W_i + b_i`` (for the
   last layer: the mean of the models' outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge._tree import PyTree, flatten_models, flatten_with_keys, leaf_spec, state_key
from jaxmerge.alignment.spec import PermutationSpec
from jaxmerge.alignment.transport import _axis_roles, _moved, _order
from jaxmerge.errors import JaxmergeError


def _layouts(correlation: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each model's ``(n, width)`` 0/1 matrix sending its units to the merged units: the
    ``2n - width`` best-correlated pairs first, then the rest of model a's, then model b's."""
    import scipy.optimize

    n = len(correlation)
    rows, cols = scipy.optimize.linear_sum_assignment(correlation, maximize=True)
    merged = np.argsort(-correlation[rows, cols], kind="stable")[:2 * n - width]
    a_units = [*rows[merged], *sorted(set(range(n)) - set(rows[merged]))]
    b_units = [*cols[merged], *sorted(set(range(n)) - set(cols[merged]))]
    a, b = np.zeros((n, width)), np.zeros((n, width))
    a[a_units, np.arange(n)] = 1.0
    b[b_units, [*range(len(merged)), *range(n, width)]] = 1.0
    return a, b


def _widths(widths: float | Mapping[str, int], sizes: dict[str, int]) -> dict[str, int]:
    chosen = {p: round(widths * n) for p, n in sizes.items()} if isinstance(widths, int | float) else dict(widths)
    for p, n in sizes.items():
        if not n <= chosen.get(p, n) <= 2 * n:
            raise JaxmergeError(f"the merged width of {p!r} must be between {n} and {2 * n} units, got {chosen[p]}")
    return {p: chosen.get(p, n) for p, n in sizes.items()}


def _averaging(layouts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each model's layout divided by the number of models each merged unit comes from: the
    matrices that average the source units' values onto the merged ones."""
    counts = layouts[0].sum(0) + layouts[1].sum(0)
    return layouts[0] / counts, layouts[1] / counts


def _zipped(roles: dict, leaves: list, layouts: dict, averaging: dict) -> list:
    """The zip merge: every leaf moved onto the merged units (the spec'd ones) and averaged over
    the models."""
    merged = [(np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2 for a, b in zip(*leaves)]
    for index, axes in roles.items():
        total = 0.0
        for model in (0, 1):
            leaf = np.asarray(leaves[model][index], np.float64)
            for axis, (name, role) in axes.items():
                leaf = _moved(leaf, axis, averaging[name][model] if role == "out" else layouts[name][model] / 2)
            total = total + leaf
        merged[index] = total
    return merged


def pleas(spec: PermutationSpec, apply_fn: Callable[[PyTree, object], object], model_a: PyTree, model_b: PyTree,
          data: Iterable, *, widths: float | Mapping[str, int] = 1.0, ridge: float = 1e-6) -> PyTree:
    """Merge two models into one of a chosen width by permutations and least squares (PLeaS).

    Args:
      spec: the permutations of the models' hidden units (dense layers:
        :func:`~jaxmerge.mlp_permutation_spec`).
      apply_fn: ``apply_fn(params, batch)``, the forward pass; it must accept params of the
        merged widths (a function of the arrays' shapes, not of a fixed module width).
      model_a: the first model.
      model_b: the second, with ``model_a``'s structure and shapes (e.g. trained from another
        initialisation).
      data: the batches whose activations give the matching and the least-squares problems.
      widths: the merged model's number of units per permutation, between ``n`` (every unit
        merged) and ``2n`` (both models kept whole): a factor of ``n`` for every permutation
        (``1.0`` to ``2.0``) or ``{name: units}`` (names left out keep ``n``).
      ridge: the least-squares regulariser, relative to the mean diagonal of ``X^T X``.

    Returns:
      The merged params, with the spec's named axes at the chosen widths.

    Raises:
      JaxmergeError: models that differ, no batch, a width out of range, or a spec whose
        permutations cannot be seen in the activations (see
        :func:`~jaxmerge.activation_matching`).

    References:
      Nasery et al., "PLeaS -- Merging Models with Permutations and Least Squares",
      arXiv 2407.02447.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> def apply(p, x):
      ...     return jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"][None]) @ p["l1"]["kernel"] + p["l1"]["bias"][None]
      >>> def init(seed):
      ...     k0, k1 = jax.random.split(jax.random.key(seed))
      ...     return {"l0": {"kernel": jax.random.normal(k0, (4, 8)), "bias": jnp.zeros(8)},
      ...             "l1": {"kernel": jax.random.normal(k1, (8, 2)), "bias": jnp.zeros(2)}}
      >>> a, b = init(0), init(1)
      >>> spec = jaxmerge.mlp_permutation_spec(a)
      >>> x = [jax.random.normal(jax.random.key(2), (256, 4))]
      >>> merged = jaxmerge.pleas(spec, apply, a, b, x, widths=2.0)  # both models kept: their average, exactly
      >>> merged["l0"]["kernel"].shape
      (4, 16)
      >>> bool(jnp.allclose(apply(merged, x[0]), (apply(a, x[0]) + apply(b, x[0])) / 2, atol=1e-3))
      True
    """
    from jaxmerge.alignment.activations import unit_correlations
    from jaxmerge.statistics.gram import kernel_inputs, kernel_outputs

    flatten_models([model_a, model_b], names=["model_a", "model_b"])
    batches = list(data)
    correlations = unit_correlations(spec, apply_fn, model_a, model_b, batches)
    chosen = _widths(widths, spec.bind(model_a).sizes)
    layouts = {p: _layouts(c.correlation(), chosen[p]) for p, c in correlations.items()}
    averaging = {p: _averaging(layout) for p, layout in layouts.items()}
    keys, leaves_a, treedef = flatten_with_keys(model_a)
    leaves = [leaves_a, flatten_with_keys(model_b)[1]]
    roles = _axis_roles(spec, model_a)
    merged = _zipped(roles, leaves, layouts, averaging)
    targets = [[jax.device_get(kernel_outputs(m, x, apply_fn=apply_fn)) for x in batches] for m in (model_a, model_b)]
    for kernel, bias, out in _dense_layers(keys, leaves_a, roles):
        gram, moment = 0.0, 0.0
        params = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in merged])
        for i, x in enumerate(batches):
            inputs = np.asarray(jax.device_get(kernel_inputs(params, x, apply_fn=apply_fn))[kernel], np.float64)
            if bias is not None:
                inputs = np.concatenate([inputs, np.ones((len(inputs), 1))], 1)
            target = 0.0
            for model in (0, 1):
                y = np.asarray(targets[model][i][kernel], np.float64)
                y = y + np.asarray(leaves[model][bias], np.float64) if bias is not None else y
                target = target + (y @ averaging[out][model] if out is not None else y / 2)
            gram, moment = gram + inputs.T @ inputs, moment + inputs.T @ target
        solution = np.linalg.solve(gram + ridge * np.trace(gram) / len(gram) * np.eye(len(gram)), moment)
        merged[kernel] = solution[: len(solution) - (bias is not None)]
        if bias is not None:
            merged[bias] = solution[-1]
    dtypes = [leaf_spec(x).dtype for x in leaves_a]
    return jax.tree.unflatten(treedef, [jnp.asarray(x).astype(d) for x, d in zip(merged, dtypes)])


def _dense_layers(keys: list, leaves: list, roles: dict) -> list[tuple[int, int | None, str | None]]:
    """``(kernel, bias or None, output permutation or None)`` of every 2-d kernel the spec
    names, ordered so that each layer comes after the one producing its inputs."""
    position = {state_key(key): i for i, key in enumerate(keys)}
    names = _order(roles)
    layers = []
    for index, axes in roles.items():
        key = state_key(keys[index])
        if key[-1] != "kernel" or len(leaf_spec(leaves[index]).shape) != 2:
            continue
        into = next((n for n, role in axes.values() if role == "in"), None)
        out = next((n for n, role in axes.values() if role == "out"), None)
        layers.append((-1 if into is None else names.index(into), index, position.get(key[:-1] + ("bias",)), out))
    if not layers:
        raise JaxmergeError("pleas found no dense kernel named by the spec")
    return [(kernel, bias, out) for _, kernel, bias, out in sorted(layers)]
