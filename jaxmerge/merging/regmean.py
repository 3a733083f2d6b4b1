"""RegMean (Jin et al., arXiv 2212.09849) and RegMean++ (Nguyen et al., arXiv 2508.03121).

For a linear layer ``y = x W`` fine-tuned into ``W_i`` on inputs ``X_i``, RegMean takes the
``W`` that minimises ``sum_i ||X_i W - X_i W_i||^2``:

    W* = (sum_i G_i)^-1 sum_i G_i W_i,    G_i = X_i^T X_i,

with each Gram's off-diagonal entries scaled by ``alpha``
(``G~ = alpha G + (1 - alpha) diag(G)``), solved by a Cholesky factorisation in float32.
Leaves that are not linear kernels (biases, norms, embeddings) are averaged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from jaxmerge import _hyper
from jaxmerge._hyper import Range
from jaxmerge._sharding import like, reshard
from jaxmerge._tree import PyTree, TreeSpec, flatten_models, leaf_spec
from jaxmerge.errors import JaxmergeError
from jaxmerge.merging.linear import average_kernel
from jaxmerge.merging.method import Param, merge_method
from jaxmerge.statistics import gram as gram_stats
from jaxmerge.statistics._data import is_nnx_module, model_function

LAYOUTS = ("in_out", "out_in")
Layout = Literal["in_out", "out_in"]


@jax.jit
def regmean_kernel(kernels: Sequence[jax.Array], grams: Sequence[jax.Array], alpha: jax.Array,
                   ridge: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(W*, used_ridge)`` for ``(d, m)`` kernels and their ``(d, d)`` Grams.

    Solves ``(sum_i G~_i) W* = sum_i G~_i W_i`` by Cholesky. If the summed Gram is not
    positive definite, ``ridge * mean(diag) * I`` (at least ``ridge``) is added to it first
    and ``used_ridge`` is True.
    """
    alpha = alpha.astype(jnp.float32)
    tilde = [alpha * g + (1 - alpha) * jnp.diag(jnp.diag(g)) for g in grams]
    lhs = sum(tilde[1:], tilde[0])
    rhs = sum(g @ w.astype(jnp.float32) for g, w in zip(tilde, kernels))
    factor = jnp.linalg.cholesky(lhs)
    singular = ~jnp.all(jnp.isfinite(factor))

    def regularised():
        shift = ridge.astype(jnp.float32) * jnp.maximum(jnp.mean(jnp.diag(lhs)), 1.0)
        return jnp.linalg.cholesky(lhs + shift * jnp.eye(lhs.shape[0], dtype=jnp.float32))

    factor = lax.cond(singular, regularised, lambda: factor)
    # the triangular solves run on the whole right-hand side; the result is sharded back
    # like the kernels (explicit meshes need this said; Auto meshes decide by themselves)
    solution = jax.scipy.linalg.cho_solve((factor, True), reshard(rhs, PartitionSpec(), kernels[0]))
    return like(solution, kernels[0]), singular


def _as_matrix(kernel_shape: tuple[int, ...], features: int, layout: str) -> tuple[Callable, Callable] | None:
    """Functions to and from the ``(features, m)`` matrix view of a kernel, or None if none fits."""
    dims = kernel_shape if layout == "in_out" else kernel_shape[::-1]
    for k in range(1, len(dims) + 1):
        if math.prod(dims[:k]) == features:
            break
    else:
        return None
    if layout == "in_out":
        return (lambda w: w.reshape(features, -1)), (lambda m: m.reshape(kernel_shape))
    return (lambda w: w.reshape(-1, features).T), (lambda m: m.T.reshape(kernel_shape))


def _gram_paths(store, j: int, known: set[str]) -> set[str]:
    """The layer paths that ``grams[j]`` has a Gram matrix for (its ``'<path>/gram'`` entries)."""
    paths = {name[:-len("/gram")] for name in store.names if name.endswith("/gram")}
    if not paths:
        raise JaxmergeError(f"grams[{j}] has no Gram matrices (entries named '<layer path>/gram', as "
                            "jaxmerge.input_grams makes them)")
    if extra := sorted(paths - known):
        raise JaxmergeError(f"grams[{j}] has statistics for {extra[0]!r}, which is not a leaf of the models")
    return paths


def _regmean_plan(spec: TreeSpec, hp: dict, grams: Sequence):
    """Leaf function for :func:`regmean` (validates the statistics against the kernels)."""
    layout, ridge, alphas, linear = hp["layout"], hp["ridge"], hp["alpha"], hp["linear"]
    covered = [_gram_paths(store, j, set(spec.paths)) for j, store in enumerate(grams)]
    views: dict[int, tuple] = {}
    for i in spec.float_indices():
        path, shape = spec.paths[i], leaf_spec(spec.leaves[i]).shape
        present = [path in paths for paths in covered]
        if not (any(present) if linear is None else bool(linear(path, spec.leaves[i]))):
            continue
        if not all(present):
            raise JaxmergeError(f"grams[{present.index(False)}] has no statistics for the linear layer {path!r}")
        shapes = [tuple(store.shape_dtype(f"{path}/gram")[0]) for store in grams]
        for j, gram_shape in enumerate(shapes):
            if len(gram_shape) != 2 or gram_shape[0] != gram_shape[1] or gram_shape != shapes[0]:
                raise JaxmergeError(f"grams[{j}] at {path!r} has shape {gram_shape}, expected a square Gram like "
                                    f"grams[0]'s {shapes[0]}")
        views[i] = _as_matrix(shape, shapes[0][0], layout)
        if views[i] is None:
            side = "leading" if layout == "in_out" else "trailing"
            raise JaxmergeError(f"the Gram at {path!r} has {shapes[0][0]} input features, which do not match the "
                                f"{side} axes of the kernel of shape {shape}")
    equal = np.ones(spec.num_models)

    def leaf_fn(i, _, leaves):
        if i not in views:
            return average_kernel(leaves, equal, normalize=True)
        path = spec.paths[i]
        return _solve(path, views[i], leaves, [store.read(f"{path}/gram") for store in grams], alphas[i], ridge,
                      stacklevel=6)
    return leaf_fn


def _solve(path: str, views: tuple[Callable, Callable], kernels: Sequence[jax.Array], grams: Sequence[jax.Array],
           alpha, ridge: float, stacklevel: int) -> jax.Array:
    """One merged kernel, warning (outside jit) when the ridge had to be added; ``stacklevel``
    points the warning at the user's call."""
    to_matrix, from_matrix = views
    for j, gram in enumerate(grams):
        if not isinstance(gram, jax.core.Tracer):
            values = np.asarray(gram, np.float32)
            if not np.isfinite(values).all():
                raise JaxmergeError(f"grams[{j}] has NaN or infinite values at {path!r}")
            if (np.diagonal(values) < 0).any():
                raise JaxmergeError(f"grams[{j}] has a negative diagonal entry at {path!r}; a Gram X^T X has none")
    solution, singular = regmean_kernel([to_matrix(w) for w in kernels], list(grams), _hyper.scalar_arg(alpha),
                                        _hyper.scalar_arg(ridge))
    if not isinstance(singular, jax.core.Tracer) and bool(singular):
        warnings.warn(f"regmean: the summed Gram at {path!r} is singular; added a ridge of {ridge:g} x its mean "
                      "diagonal before solving", RuntimeWarning, stacklevel=stacklevel)
    return from_matrix(solution).astype(kernels[0].dtype)


@merge_method("regmean", base="none", plan=_regmean_plan, statistics="grams", references=("2212.09849",), params=(
    Param("alpha", "leaf", "scale of the Grams' off-diagonal entries", check=Range(0, 1)),
    Param("layout", "option", "kernel layout: Flax 'in_out' or PyTorch 'out_in'", choices=LAYOUTS),
    Param("ridge", "option", "ridge added to a singular summed Gram, times its mean diagonal", kind=float,
          check=Range(0)),
    Param("linear", "option", "fn(path, leaf) -> bool choosing the leaves merged by RegMean", config=None)))
def regmean(models: Sequence[PyTree], grams: Sequence[PyTree], *, alpha=0.9, layout: Layout = "in_out",
            ridge: float = 1e-5, linear: Callable | None = None) -> PyTree:
    """RegMean merge: per linear layer, the kernel that best reproduces every model's outputs.

    For a linear layer with kernels ``W_i`` and input Grams ``G_i = X_i^T X_i``, the merged
    kernel is ``W* = (sum_i G~_i)^-1 sum_i G~_i W_i`` with ``G~ = alpha G + (1 - alpha)
    diag(G)``, the minimiser of ``sum_i ||X_i W - X_i W_i||^2``, solved by Cholesky in
    float32. Leaves without statistics (biases, norms, embeddings) are averaged. In a merge
    config (``merge_method: regmean``) each model's ``statistics`` parameter names its Gram
    checkpoint.

    Args:
      models: the models; the output has ``models[0]``'s structure and dtypes.
      grams: one statistics tree per model, from :func:`jaxmerge.input_grams` (on each
        model's own data), or any nested dicts keyed like the params with
        ``{'gram': (d, d)}`` where a kernel is.
      alpha: per-leaf scale of the Grams' off-diagonal entries, in [0, 1] (0: a per-input
        weighted average; 1: the exact least-squares solution).
      layout: ``'in_out'`` for Flax kernels (the Gram covers the leading axes) or
        ``'out_in'`` for PyTorch-style ``(out, in)`` weights (the trailing axes).
      ridge: if a summed Gram is singular, ``ridge`` times its mean diagonal is added to
        its diagonal (with a ``RuntimeWarning`` naming the layer).
      linear: optional ``fn(path, leaf) -> bool`` choosing the leaves merged by RegMean
        (they then must have statistics); by default every leaf with statistics is, and
        every other leaf is averaged.

    Returns:
      A pytree shaped like ``models[0]``.

    Raises:
      JaxmergeError: a statistics tree with no Gram matrices or with one for a path that is
        not a leaf, statistics missing for a layer in some model, a Gram whose size does
        not match the kernel's input features, a bad ``alpha`` or ``layout``.

    References:
      Jin et al., "Dataless knowledge fusion by merging weights of language models",
      arXiv 2212.09849.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"k": jnp.asarray([[1.0], [0.0]])}, {"k": jnp.asarray([[0.0], [1.0]])}
      >>> ga = {"k": {"gram": jnp.asarray([[1.0, 0.0], [0.0, 0.0]])}}
      >>> gb = {"k": {"gram": jnp.asarray([[0.0, 0.0], [0.0, 1.0]])}}
      >>> jaxmerge.regmean([a, b], [ga, gb], alpha=1.0)["k"].tolist()  # each model owns one input
      [[1.0], [1.0]]
    """


def regmean_plus_plus(model, models: Sequence[PyTree], data: Sequence[Iterable], *, alpha=0.9, ridge: float = 1e-5,
                      num_examples: int | None = None) -> PyTree:
    """RegMean++: RegMean with each layer's statistics taken from the model merged so far.

    Linear layers are merged one at a time in forward order. For layer ``l``, each
    model's Gram is taken from the inputs that layer receives when model ``i``'s data
    runs through a network whose earlier parameters (in order of first use) are already
    merged and whose later ones are still model ``i``'s, so the statistics reflect both
    the merged layers before it (cross-layer) and, within a block, the merged sub-layers
    before it (intra-layer). Non-kernel leaves are averaged.

    Cost: one pass over every model's data per linear layer, ``L x N`` forward passes in
    all, instead of RegMean's ``N``.

    Args:
      model: ``apply_fn(params, batch)`` or a Flax NNX module (whose graph, not its
        parameters, is used).
      models: the models' params (``nnx.State`` for an NNX module, as from
        ``nnx.state(module, nnx.Param)``).
      data: one re-iterable (e.g. a list of batches) per model, its own data.
      alpha, ridge: as in :func:`regmean` (Flax ``(in, out)`` layout).
      num_examples: examples of each model's data to use.

    Returns:
      The merged params, shaped like ``models[0]``.

    Raises:
      JaxmergeError: ``data`` without one re-iterable per model, an empty first one, no
        linear layer in the model, a structure mismatch, or a bad ``alpha`` or ``ridge``.

    References:
      Nguyen et al., "RegMean++: enhancing effectiveness and generalization of regression
      mean for model merging", arXiv 2508.03121; Jin et al., arXiv 2212.09849.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> apply_fn = lambda params, batch: batch[0] @ params["w"]
      >>> a, b = {"w": jnp.asarray([[1.0], [0.0]])}, {"w": jnp.asarray([[0.0], [1.0]])}
      >>> data = [[(jnp.asarray([[1.0, 0.0]]),)], [(jnp.asarray([[0.0, 1.0]]),)]]  # each model its own input
      >>> jaxmerge.regmean_plus_plus(apply_fn, [a, b], data, alpha=1.0)["w"].tolist()
      [[1.0], [1.0]]
    """
    spec, _, model_leaves = flatten_models(models)
    if not isinstance(data, (list, tuple)) or len(data) != spec.num_models:
        raise JaxmergeError(f"data must be a list with one re-iterable of batches per model ({spec.num_models})")
    alphas = _hyper.resolve(alpha, "alpha", spec, Range(0, 1))
    ridge = _hyper.checked(ridge, "ridge", Range(0))
    apply_fn, _ = model_function(model, None if is_nnx_module(model) else models[0])
    first_batch = next(iter(data[0]), None)
    if first_batch is None:
        raise JaxmergeError("data[0] yielded no batches")
    first_use, kernel_order = _order_of_use(apply_fn, models[0], first_batch)
    if not kernel_order:
        raise JaxmergeError("found no linear layer in the model")
    equal = np.ones(spec.num_models)
    merged = [average_kernel([m[i] for m in model_leaves], equal, normalize=True) if spec.is_float(i)
              else spec.leaves[i] for i in range(len(spec.keys))]
    for k in kernel_order:
        grams = []
        for leaves, model_data in zip(model_leaves, data):
            hybrid = [merged[j] if first_use.get(j, len(first_use)) < first_use[k] else leaves[j]
                      for j in range(len(leaves))]
            params = jax.tree.unflatten(spec.treedef, hybrid)
            stats = gram_stats.accumulate_grams(apply_fn, params, model_data, num_examples=num_examples,
                                                only=frozenset({k}))
            grams.append(stats[k][0])
        views = _as_matrix(spec.leaves[k].shape, grams[0].shape[0], "in_out")
        merged[k] = _solve(spec.paths[k], views, [leaves[k] for leaves in model_leaves], grams, alphas[k], ridge,
                           stacklevel=3)
    return jax.tree.unflatten(spec.treedef, merged)


def _order_of_use(apply_fn: Callable, params: PyTree, batch) -> tuple[dict[int, int], list[int]]:
    """When each param leaf is first used in the forward pass, and the kernels in forward order."""
    return gram_stats.traced(apply_fn, params, batch, lambda recorder: (recorder.first_use, recorder.kernel_order),
                             only=frozenset())
