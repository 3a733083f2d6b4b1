"""Task-vector merges: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

They share one computation (mergekit calls it *generalized task arithmetic*). With task
vectors ``d_i = theta_i - base`` and weights ``w_i``:

1. **sparsify** each ``d_i`` (optional): magnitude top-k (TIES), random drop (DARE),
   outlier-and-small drop (breadcrumbs) or magnitude-ranked random drop (DELLA), then
   rescale the kept entries (see :func:`jaxmerge.merging.sparsify.rescale`);
2. **elect a sign** (optional, the ``*_ties`` variants): per entry, the sign of
   ``sum_i w_i d_i`` (``majority_sign='sum'``, a zero sum counts as positive) or of the
   sum of the signs (``'count'``); an entry of ``w_i d_i`` takes part only if its sign
   equals the elected one (zeros never do);
3. **combine**: ``m = sum_i w_i d_i`` over the taking-part entries, divided, when
   ``normalize``, by ``sum_i w_i`` over the same entries (a zero divisor counts as 1
   after sign election; without it, weights summing to 0 are refused);
4. result ``base + lambda_ * m``, cast to the base's dtype.

Everything is computed in float32 (mergekit computes in the models' dtype); otherwise the
numbers follow mergekit's, with the same parameter names and defaults. Two deliberate
differences: an entry count ``int(density * n)`` of 0 keeps nothing where mergekit
raises, and breadcrumbs with ``int(gamma * n) == 0`` drops no outliers where mergekit's
slicing drops everything.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import _hyper
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, apply_leafwise, flatten_models
from jaxmerge.merging import sparsify

SPARSIFIERS = (None, "magnitude", "random", "breadcrumbs", "della")
CONSENSUS = (None, "sum", "count")
_ELECTING = ("ties", "dare_ties", "breadcrumbs_ties", "della")  # the methods that elect signs


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The random key of one leaf: ``key`` folded with a stable hash of the leaf's path.

    The same key gives the same draws for a leaf whatever order the leaves are processed
    in, which device holds them or how they are sharded.
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()))


def elect_sign(weighted: Sequence[jax.Array], method: str) -> jax.Array:
    """Per entry +1 or -1: the sign of ``sum(weighted)`` (``'sum'``) or of the sum of signs
    (``'count'``); zero counts as +1 (TIES, arXiv 2306.01708)."""
    if method == "sum":
        total = sum(weighted[1:], weighted[0])
    else:
        total = sum((jnp.sign(w) for w in weighted[1:]), jnp.sign(weighted[0]))
    return jnp.where(total >= 0, 1, -1).astype(weighted[0].dtype)


@functools.partial(jax.jit, static_argnames=("method", "rescale"))
def sparse_task_vector(base: jax.Array, leaf: jax.Array, params: dict, *, method: str,
                       rescale: str | None) -> jax.Array:
    """``leaf - base`` in float32, sparsified by ``method`` and rescaled.

    ``params`` holds this model's ``density`` and, by method, ``k`` (entries to keep),
    ``top`` (outliers to drop), ``epsilon``, and its random ``key``.
    """
    dtype = acc_dtype(base.dtype)
    delta = leaf.astype(dtype) - base.astype(dtype)
    density = params["density"]
    if method == "magnitude":
        mask, keep = sparsify.top_k_mask(delta, params["k"]), density
    elif method == "breadcrumbs":
        mask = sparsify.band_mask(delta, params["top"], params["k"])
        keep = density
    elif method == "random":
        mask, keep = sparsify.random_mask(params["key"], delta, density), density
    else:
        mask, keep = sparsify.della_mask(params["key"], delta, density, params["epsilon"])
    keep_all = density >= 1  # density 1 leaves the task vector untouched, as in mergekit
    keep = jnp.where(keep_all, jnp.ones((), dtype), jnp.asarray(keep, dtype))
    return sparsify.rescale(delta, mask | keep_all, rescale, keep)


@functools.partial(jax.jit, static_argnames=("consensus", "normalize", "subtract_base"))
def combine_task_vectors(base: jax.Array, leaves: Sequence[jax.Array], weights: jax.Array, lambda_: jax.Array, *,
                         consensus: str | None, normalize: bool, subtract_base: bool = False) -> jax.Array:
    """Steps 2-4 of the module docstring: sign election, (disjoint) weighted sum, scaling.

    ``leaves`` are task vectors, or, with ``subtract_base``, the models themselves (then
    ``leaf - base`` is taken inside, fused with the rest, without materialising it).
    """
    dtype = acc_dtype(base.dtype)
    base32 = base.astype(dtype)
    w = weights.astype(dtype)
    weighted = [w[j] * ((leaf.astype(dtype) - base32) if subtract_base else leaf.astype(dtype))
                for j, leaf in enumerate(leaves)]
    zero = jnp.zeros((), dtype)
    if consensus is None:
        mixed = sum(weighted[1:], weighted[0])
        divisor = jnp.where(jnp.abs(w.sum()) < 1e-8, 1, w.sum())
    else:
        sign = elect_sign(weighted, consensus)
        taking_part = [jnp.sign(wd) == sign for wd in weighted]
        mixed = sum(jnp.where(t, wd, zero) for t, wd in zip(taking_part, weighted))
        divisor = sum(jnp.where(t, w[j], zero) for j, t in enumerate(taking_part))
        divisor = jnp.where(divisor == 0, 1, divisor)
    if normalize:
        mixed = mixed / divisor
    return (base32 + lambda_.astype(dtype) * mixed).astype(base.dtype)


def task_vector_kernel(base: jax.Array, leaves: Sequence[jax.Array], weights: jax.Array, lambda_: jax.Array,
                       params: dict, *, method: str | None, consensus: str | None, normalize: bool,
                       rescale: str | None) -> jax.Array:
    """One leaf of a generalized task-arithmetic merge (see the module docstring).

    Without sparsification this is one fused pass. With it, each model's task vector is
    sparsified by its own jitted call, so that only one model's selection temporaries are
    alive at a time (this bounds the memory of streamed merges of large tensors), then
    the sparse task vectors are combined.

    Args:
      base, leaves: the base's and the models' leaves.
      weights: float32 ``(N,)``. lambda_: float32 scalar.
      params: the sparsifier's per-model arrays (``(N,)`` each; see
        :func:`sparse_task_vector`) and one ``key`` for this leaf.
      method, consensus, normalize, rescale: static choices (:data:`SPARSIFIERS`,
        :data:`CONSENSUS`, bool, a norm of :func:`~jaxmerge.merging.sparsify.rescale`).
    """
    if method is None:
        return combine_task_vectors(base, leaves, weights, lambda_, consensus=consensus, normalize=normalize,
                                    subtract_base=True)
    deltas = []
    for j in range(len(leaves)):
        own = {name: value[j] for name, value in params.items() if name != "key"}
        if "key" in params:
            own["key"] = jax.random.fold_in(params["key"], j)
        deltas.append(sparse_task_vector(base, leaves[j], own, method=method, rescale=rescale))
        if isinstance(leaves, list):
            leaves[j] = None  # drop our reference: a streamed input is then freed once used
    return combine_task_vectors(base, deltas, weights, lambda_, consensus=consensus, normalize=normalize)


def _normalized_rescale(rescale) -> str | None:
    if rescale is True:
        return "l1"
    if rescale is False or rescale is None:
        return None
    if rescale not in sparsify.RESCALE_NORMS:
        raise ValueError(f"rescale must be True, False or one of {sparsify.RESCALE_NORMS[1:]}, got {rescale!r}")
    return rescale


def _check_together(spec: TreeSpec, rows_a: list, rows_b: list, bad, message: str) -> None:
    """Raise ``message.format(a=, b=, path=)`` where ``bad(a, b)`` for concrete per-model values."""
    for path, a, b in zip(spec.paths, rows_a, rows_b):
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            for x, y in zip(a.tolist(), b.tolist()):
                if bad(x, y):
                    raise ValueError(message.format(a=x, b=y, path=path))


def _counts(row, size: int):
    if isinstance(row, np.ndarray):
        return np.asarray([sparsify.num_kept(float(v), size) for v in row], np.int32)
    return sparsify.num_kept(row, size)


def task_vector_plan(spec: TreeSpec, weights=None, *, lambda_=1.0, normalize: bool = False,
                     method: str | None = None, consensus: str | None = None, density=1.0,
                     gamma=0.01, epsilon=0.15, rescale=False, key=None, name: str = "merge"):
    """Leaf function of a generalized task-arithmetic merge, after validating everything."""
    if not spec.has_base:
        raise ValueError(f"{name} needs a base model (base is None)")
    if consensus not in CONSENSUS or method not in SPARSIFIERS:
        raise ValueError(f"unknown consensus {consensus!r} or sparsifier {method!r}")
    rescale = _normalized_rescale(rescale)
    w = _hyper.resolve_models(weights, "weights", spec, default=1.0)
    if normalize and consensus is None:
        _hyper.check_nonzero_sums(w, "weights", spec)
    lam = _hyper.resolve(lambda_, "lambda_", spec)
    params: list = [{} for _ in spec.keys]
    if method is not None:
        dens = _hyper.resolve_shared(density, "density", spec, _hyper.in_range(0, 1, lo_open=True))
        for i in spec.float_indices():
            params[i]["density"] = dens[i]
            params[i]["k"] = _counts(dens[i], spec.size(i))
        if method in ("random", "della"):
            if key is None:
                raise ValueError(f"{name} is random: pass key=jax.random.key(seed)")
            for i in spec.float_indices():
                params[i]["key"] = leaf_key(key, spec.paths[i])
        if method == "breadcrumbs":
            gam = _hyper.resolve_shared(gamma, "gamma", spec, _hyper.in_range(0, 1, hi_open=True))
            _check_together(spec, gam, dens, lambda g, d: g + d > 1,
                            "gamma + density must be <= 1, got gamma={a:g} + density={b:g} at {path!r}")
            for i in spec.float_indices():
                params[i]["top"] = _counts(gam[i], spec.size(i))
        if method == "della":
            eps = _hyper.resolve_shared(epsilon, "epsilon", spec, _hyper.in_range(0, 1, hi_open=True))
            _check_together(spec, eps, dens, lambda e, d: d < 1 and (d - e <= 0 or d + e >= 1),
                            "epsilon must keep density +/- epsilon inside (0, 1), got epsilon={a:g} "
                            "and density={b:g} at {path!r}")
            for i in spec.float_indices():
                params[i]["epsilon"] = eps[i]

    def leaf_fn(i, base, leaves):
        return task_vector_kernel(base, leaves, w[i], _hyper.scalar_arg(lam[i]), params[i],
                                  method=method, consensus=consensus, normalize=normalize, rescale=rescale)
    return leaf_fn


def _merge(base, models, **plan_args) -> PyTree:
    if base is None:
        raise ValueError(f"{plan_args['name']} needs a base model (base is None)")
    if plan_args["name"] in _ELECTING and plan_args.get("consensus") not in ("sum", "count"):
        raise ValueError(f"majority_sign must be 'sum' or 'count', got {plan_args.get('consensus')!r}")
    spec, base_leaves, leaves = flatten_models(models, base)
    return apply_leafwise(spec, task_vector_plan(spec, **plan_args), base_leaves, leaves)


_COMMON_ARGS = """Args:
      base: the model the fine-tunes started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      weights: one per-leaf weight per model (``None``: 1.0 each).
      lambda_: per-leaf scale of the merged task vector."""


def task_arithmetic(base: PyTree, models: Sequence[PyTree], weights=None, *, lambda_=1.0,
                    normalize: bool = False) -> PyTree:
    """Task arithmetic (Ilharco et al., arXiv 2212.04089), mergekit's ``task_arithmetic``.

    ``base + lambda_ * sum_i w_i (theta_i - base)``, the sum divided by ``sum_i w_i``
    when ``normalize``. Negative weights subtract a task ("forgetting via negation").
    {args}
      normalize: divide by the sum of the weights.
    """
    return _merge(base, models, weights=weights, lambda_=lambda_, normalize=normalize, name="task_arithmetic")


def ties(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, lambda_=1.0,
         normalize: bool = True, majority_sign: str = "sum", rescale=False) -> PyTree:
    """TIES-Merging (Yadav et al., arXiv 2306.01708), mergekit's ``ties``.

    Trim each task vector to its ``int(density * n)`` largest-magnitude entries, elect a
    sign per entry, and average the entries that agree with it (disjoint mean).
    {args}
      density: fraction of each task vector to keep, in (0, 1]; shared, or
        :func:`jaxmerge.per_model`.
      normalize: divide by the summed weights of the agreeing models (the disjoint mean).
      majority_sign: ``'sum'`` (the paper's) or ``'count'``.
      rescale: ``False``; ``True``/``'l1'``, ``'l2'``, ``'linf'`` (match the trimmed vector's
        norm to the original's); or ``'density'`` (divide by ``density``).
    """
    return _merge(base, models, weights=weights, density=density, lambda_=lambda_, normalize=normalize,
                  consensus=majority_sign, rescale=rescale, method="magnitude", name="ties")


def dare_linear(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, key=None,
                lambda_=1.0, normalize: bool = False, rescale=True) -> PyTree:
    """DARE (Yu et al., arXiv 2311.03099) with a linear combination, mergekit's ``dare_linear``.

    Drop each task-vector entry with probability ``1 - density`` and rescale the rest,
    then sum with the weights.
    {args}
      density: keep probability in (0, 1]; shared, or :func:`jaxmerge.per_model`.
      key: a ``jax.random`` key (required); each leaf and model draws from it folded with
        the leaf's path and the model's index.
      rescale: ``True``/``'l1'`` (mergekit: match the L1 norm of the original), ``'l2'``,
        ``'linf'``, ``'density'`` (the paper: divide by ``density``) or ``False``.
    """
    return _merge(base, models, weights=weights, density=density, key=key, lambda_=lambda_,
                  normalize=normalize, rescale=rescale, method="random", name="dare_linear")


def dare_ties(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, key=None,
              lambda_=1.0, normalize: bool = False, rescale=True, majority_sign: str = "sum") -> PyTree:
    """DARE drop and rescale followed by TIES sign election, mergekit's ``dare_ties``.
    {args}
      density, key, rescale: as in :func:`dare_linear`.
      majority_sign: as in :func:`ties`.
    """
    return _merge(base, models, weights=weights, density=density, key=key, lambda_=lambda_,
                  normalize=normalize, rescale=rescale, consensus=majority_sign, method="random",
                  name="dare_ties")


def breadcrumbs(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, gamma=0.01,
                lambda_=1.0, normalize: bool = False, rescale=False) -> PyTree:
    """Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795), mergekit's ``breadcrumbs``.

    Drop the ``gamma`` fraction of largest-magnitude entries (outliers) and then the
    smallest, so that ``density`` of each task vector remains; sum with the weights.
    {args}
      density, gamma: fractions kept and dropped from the top; ``gamma + density <= 1``.
      rescale: as in :func:`ties`.
    """
    return _merge(base, models, weights=weights, density=density, gamma=gamma, lambda_=lambda_,
                  normalize=normalize, rescale=rescale, method="breadcrumbs", name="breadcrumbs")


def breadcrumbs_ties(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, gamma=0.01,
                     lambda_=1.0, normalize: bool = False, rescale=False, majority_sign: str = "sum") -> PyTree:
    """Model Breadcrumbs followed by TIES sign election, mergekit's ``breadcrumbs_ties``.
    {args}
      density, gamma, rescale: as in :func:`breadcrumbs`. majority_sign: as in :func:`ties`.
    """
    return _merge(base, models, weights=weights, density=density, gamma=gamma, lambda_=lambda_,
                  normalize=normalize, rescale=rescale, consensus=majority_sign, method="breadcrumbs",
                  name="breadcrumbs_ties")


def della(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, epsilon=0.15, key=None,
          lambda_=1.0, normalize: bool = True, rescale=True, majority_sign: str = "sum") -> PyTree:
    """DELLA-Merging (Deep et al., arXiv 2406.11617) with sign election, mergekit's ``della``.

    MagPrune: within each row, entries are kept with probabilities rising linearly with
    their magnitude rank from ``density - epsilon`` to ``density + epsilon``; then
    rescale, elect signs and combine as TIES does.
    {args}
      density, epsilon: mean keep probability and its spread (``density +/- epsilon``
        inside (0, 1) unless ``density == 1``).
      key: as in :func:`dare_linear`.
      rescale: ``True``/``'l1'`` (mergekit), ``'density'`` (the paper: divide each kept
        entry by its keep probability), ``'l2'``, ``'linf'`` or ``False``.
      majority_sign: as in :func:`ties`.
    """
    return _merge(base, models, weights=weights, density=density, epsilon=epsilon, key=key, lambda_=lambda_,
                  normalize=normalize, rescale=rescale, consensus=majority_sign, method="della", name="della")


def della_linear(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, epsilon=0.15, key=None,
                 lambda_=1.0, normalize: bool = False, rescale=True) -> PyTree:
    """DELLA's MagPrune drop with a linear combination, mergekit's ``della_linear``.
    {args}
      density, epsilon, key, rescale: as in :func:`della`.
    """
    return _merge(base, models, weights=weights, density=density, epsilon=epsilon, key=key, lambda_=lambda_,
                  normalize=normalize, rescale=rescale, method="della", name="della_linear")


for _fn in (task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear):
    _fn.__doc__ = _fn.__doc__.replace("{args}", _COMMON_ARGS)
