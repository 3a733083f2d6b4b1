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

The parameter names, defaults and numbers follow mergekit's. Python calls compute in
float32 (float64 for float64 leaves); ``exact`` kernels (what ``jaxmerge merge`` runs) compute
in the models' dtype, rounding where mergekit's torch code does.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from jaxmerge import _hyper
from jaxmerge._hyper import Range
from jaxmerge._tree import PyTree, TreeSpec, compute_dtype, exact_jit, scaled, total
from jaxmerge.merging import sparsify
from jaxmerge.merging.method import LAMBDA, WEIGHTS, Param, merge_method
from jaxmerge.merging.sparsify import Sparsifier

Rescale = Literal[False, True, "l1", "l2", "linf", "density"]
MajoritySign = Literal["sum", "count"]


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The random key of one leaf: ``key`` folded with a stable hash of the leaf's path.

    The same key gives the same draws for a leaf whatever order the leaves are processed
    in, which device holds them or how they are sharded.
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()))


def elect_sign(weighted: Sequence[jax.Array], method: str) -> jax.Array:
    """Per entry +1 or -1: the sign of ``sum(weighted)`` (``'sum'``) or of the sum of signs
    (``'count'``), summed in float32 and rounded to their dtype; zero counts as +1 (TIES, arXiv
    2306.01708)."""
    dtype = weighted[0].dtype
    summed = total(weighted if method == "sum" else [jnp.sign(w) for w in weighted], dtype)
    return jnp.where(summed >= 0, 1, -1).astype(dtype)


def _task_vector(leaf: jax.Array, base: jax.Array, exact: bool) -> sparsify.Elementwise:
    """``leaf - base`` in the dtype the merge computes in, made where it is read."""
    return sparsify.difference(leaf, base, compute_dtype(base.dtype, exact))


@exact_jit(("sparsifier", "rescale"))
def sparse_task_vector(base: jax.Array, leaf: jax.Array, params, key: jax.Array | None, made=None, *,
                       sparsifier: Sparsifier, rescale: str | None, exact: bool = False) -> jax.Array:
    """``leaf - base`` in float32 (``exact``: in the base's dtype, see
    :func:`~jaxmerge._tree.compute_dtype`), sparsified by ``sparsifier`` with this model's
    ``params`` (a NamedTuple of scalars, see
    :meth:`~jaxmerge.merging.sparsify.Sparsifier.leaf_params`) and rescaled; a density of 1
    leaves the task vector untouched, as in mergekit. ``made``: the sparsifier's ``(mask,
    keep probability)``, when made already (:meth:`~jaxmerge.merging.sparsify.Sparsifier.host_mask`)."""
    dtype = compute_dtype(base.dtype, exact)
    delta = _task_vector(leaf, base, exact)  # made where the sparsifier reads it
    mask, keep = sparsifier.mask(delta, params, key) if made is None else made
    keep_all = params.density >= 1
    if rescale == "density":
        keep = jnp.where(keep_all, jnp.ones((), dtype), jnp.asarray(keep, dtype))
    return sparsify.rescale(delta.whole(), mask | keep_all, rescale, keep)


@exact_jit(("consensus", "normalize", "subtract_base"))
def combine_task_vectors(base: jax.Array, leaves: Sequence[jax.Array], weights: jax.Array, lambda_: jax.Array, *,
                         consensus: str | None, normalize: bool, subtract_base: bool = False,
                         exact: bool = False) -> jax.Array:
    """Steps 2-4 of the module docstring: sign election, (disjoint) weighted sum, scaling.

    ``leaves`` are task vectors, or, with ``subtract_base``, the models themselves (then
    ``leaf - base`` is taken inside, fused with the rest, without materialising it).
    Computed in float32, or ``exact``ly as mergekit does in the base's dtype (the weights
    rounded to it, sums accumulated in float32 and rounded).
    """
    dtype = compute_dtype(base.dtype, exact)
    base_c = base.astype(dtype)
    w = weights.astype(dtype)
    weighted = [w[j] * ((leaf.astype(dtype) - base_c) if subtract_base else leaf.astype(dtype))
                for j, leaf in enumerate(leaves)]
    zero = jnp.zeros((), dtype)
    if consensus is None:
        mixed = total(weighted, dtype)
        divisor = total(list(w), dtype)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1, divisor)
    else:
        sign = elect_sign(weighted, consensus)
        taking_part = [jnp.sign(wd) == sign for wd in weighted]
        mixed = total([jnp.where(t, wd, zero) for t, wd in zip(taking_part, weighted)], dtype)
        divisor = total([jnp.where(t, w[j], zero) for j, t in enumerate(taking_part)], dtype)
        divisor = jnp.where(divisor == 0, 1, divisor)
    if normalize:
        mixed = mixed / divisor
    return (base_c + scaled(mixed, lambda_)).astype(base.dtype)


def task_vector_kernel(base: jax.Array, leaves: list, weights, lambda_, params, key, *,
                       sparsifier: Sparsifier | None, consensus: str | None, normalize: bool,
                       rescale: str | None, exact: bool = False) -> jax.Array:
    """One leaf of a generalized task-arithmetic merge (see the module docstring).

    Without sparsification this is one fused pass. With it, each model's task vector is
    sparsified by its own jitted call, so that only one model's selection temporaries are
    alive at a time (this bounds the memory of streamed merges of large tensors), and each
    model's leaf is dropped from ``leaves`` once used (a streamed input is then freed);
    then the sparse task vectors are combined. Outside ``jax.jit``, a sparsifier may make a
    large leaf's mask from the host first
    (:meth:`~jaxmerge.merging.sparsify.Sparsifier.host_mask`): DARE's and DELLA's, whose
    kernels then compile once for leaves of every shape. Each call is waited for before the
    next is made: JAX allocates a call's result when it dispatches it, so without the wait
    every sparse task vector would be allocated while every input is still held (a streamed
    TIES merge of two models peaked at six tensors of the largest shape, not four).

    Args:
      base, leaves: the base's and the models' leaves.
      weights: ``(N,)``. lambda_: a scalar.
      params: the sparsifier's per-leaf parameters, each field ``(N,)``.
      key: this leaf's random key (for a random sparsifier), folded with each model's index.
      sparsifier, consensus, normalize, rescale: static choices.
      exact: compute as mergekit does in the base's dtype (see :func:`~jaxmerge._tree.compute_dtype`).
    """
    if sparsifier is None:
        return combine_task_vectors(base, leaves, weights, lambda_, consensus=consensus, normalize=normalize,
                                    subtract_base=True, exact=exact)
    deltas = []
    for j in range(len(leaves)):
        own = type(params)(*(field[j] for field in params))
        model_key = None if key is None else jax.random.fold_in(key, j)
        made = sparsifier.host_mask(_task_vector(leaves[j], base, exact), own, model_key, exact=exact,
                                    with_keep=rescale == "density")
        deltas.append(sparse_task_vector(base, leaves[j], own, model_key, made, sparsifier=sparsifier, rescale=rescale,
                                         exact=exact))
        leaves[j] = made = None
        if not isinstance(deltas[-1], jax.core.Tracer):
            deltas[-1].block_until_ready()
    return combine_task_vectors(base, deltas, weights, lambda_, consensus=consensus, normalize=normalize, exact=exact)


_RESCALE_NORMS = {False: None, True: "l1", "l1": "l1", "l2": "l2", "linf": "linf", "density": "density"}


def task_vector_plan(sparsifier: Sparsifier | None, *, elects_sign: bool):
    """The plan of a generalized task-arithmetic method with this sparsifier, electing signs or not."""
    def plan(spec: TreeSpec, hp: dict):
        consensus = hp["majority_sign"] if elects_sign else None
        normalize, rescale = hp["normalize"], _RESCALE_NORMS[hp["rescale"]]
        weights, lam = hp["weights"], hp["lambda_"]
        if normalize and consensus is None:
            _hyper.check_nonzero_sums(weights, "weights", spec)
        params, keys = [None] * len(spec.keys), [None] * len(spec.keys)
        if sparsifier is not None:
            for i in spec.float_indices():
                values = {name: hp[name][i] for name in sparsifier.hyperparameters}
                params[i] = sparsifier.leaf_params(spec.size(i), f" at {spec.paths[i]!r}", **values)
                if sparsifier.random:
                    keys[i] = leaf_key(hp["key"], spec.paths[i])

        def leaf_fn(i, base, leaves):
            return task_vector_kernel(base, leaves, weights[i], _hyper.scalar_arg(lam[i]), params[i], keys[i],
                                      sparsifier=sparsifier, consensus=consensus, normalize=normalize, rescale=rescale,
                                      exact=hp["exact"])
        return leaf_fn
    return plan


def _normalize(default: bool) -> Param:
    return Param("normalize", "option", "divide by the summed weights" + (" of the agreeing models" if default else ""),
                 kind=bool)


DENSITY = Param("density", "model", "fraction of each task vector kept", check=Range(0, 1, lo_open=True))
GAMMA = Param("gamma", "model", "fraction of largest magnitudes dropped as outliers", check=Range(0, 1, hi_open=True))
EPSILON = Param("epsilon", "model", "spread of the keep probabilities: density +/- epsilon",
                check=Range(0, 1, hi_open=True))
MAJORITY_SIGN = Param("majority_sign", "option", "sign election by the sum of the weighted task vectors or by "
                      "the count of signs", choices=("sum", "count"), config=None)
RESCALE = Param("rescale", "option", "match the kept entries' norm to the original (True/'l1', 'l2', 'linf'), "
                "divide by the keep probability ('density'), or not (False)", choices=tuple(_RESCALE_NORMS),
                config_choices=(False, True))
KEY = Param("key", "option", "the jax.random key of the drops, e.g. jax.random.key(0) (configs: --random-seed)",
            config=None)
INT8_MASK = Param("int8_mask", "option", "accepted from mergekit configs and ignored: masks are boolean here",
                  kind=bool, default=False)


@merge_method("task_arithmetic", base="required", plan=task_vector_plan(None, elects_sign=False),
              references=("2212.04089",), params=(
                  WEIGHTS, LAMBDA, _normalize(False), INT8_MASK,
                  dataclasses.replace(DENSITY, doc="accepted from mergekit configs and ignored: nothing is dropped",
                                      default=1.0),
                  dataclasses.replace(RESCALE, doc="accepted from mergekit configs and ignored: nothing is dropped",
                                      default=False)))
def task_arithmetic(base: PyTree, models: Sequence[PyTree], weights=None, *, lambda_=1.0,
                    normalize: bool = False) -> PyTree:
    """Task arithmetic, mergekit's ``task_arithmetic``: add the weighted task vectors to the base.

    ``base + lambda_ * sum_i w_i (theta_i - base)``, the sum divided by ``sum_i w_i`` when
    ``normalize``. Negative weights subtract a task ("forgetting via negation").

    Args:
      base: the model the fine-tunes started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      weights: one per-leaf weight per model (``None``: 1.0 each).
      lambda_: per-leaf scale of the merged task vector.
      normalize: divide by the sum of the weights.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base, a structure or shape mismatch, non-finite hyperparameters, or
        weights summing to 0 with ``normalize``.

    References:
      Ilharco et al., "Editing models with task arithmetic", arXiv 2212.04089.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(2)}
      >>> tunes = [{"w": jnp.asarray([1.0, 0.0])}, {"w": jnp.asarray([0.0, 2.0])}]
      >>> jaxmerge.task_arithmetic(base, tunes, lambda_=0.5)["w"].tolist()
      [0.5, 1.0]
    """


@merge_method("ties", base="required", plan=task_vector_plan(sparsify.MAGNITUDE, elects_sign=True),
              references=("2306.01708",),
              params=(WEIGHTS, DENSITY, LAMBDA, _normalize(True), MAJORITY_SIGN, RESCALE, INT8_MASK))
def ties(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, lambda_=1.0, normalize: bool = True,
         majority_sign: MajoritySign = "sum", rescale: Rescale = False) -> PyTree:
    """TIES-Merging, mergekit's ``ties``: trim, elect sign, disjoint merge.

    Trim each task vector to its ``max(1, int(density * n))`` largest-magnitude entries, elect a
    sign per entry, and average the entries that agree with it (disjoint mean).

    Args:
      base: the model the fine-tunes started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      weights: one per-leaf weight per model (``None``: 1.0 each).
      density: fraction of each task vector to keep, in (0, 1]; shared, or
        :func:`jaxmerge.per_model`.
      lambda_: per-leaf scale of the merged task vector.
      normalize: divide by the summed weights of the agreeing models (the disjoint mean).
      majority_sign: ``'sum'`` (the paper's: the sign of the summed weighted task vectors)
        or ``'count'`` (the sign of the sum of their signs).
      rescale: ``False``; ``True``/``'l1'``, ``'l2'``, ``'linf'`` (match the trimmed vector's
        norm to the original's); or ``'density'`` (divide by ``density``).

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base, a structure or shape mismatch, or a hyperparameter out of
        range (naming it, the model and the leaf path).

    References:
      Yadav et al., "TIES-Merging: Resolving interference when merging models",
      arXiv 2306.01708.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(3)}
      >>> tunes = [{"w": jnp.asarray([1.0, -2.0, 0.1])}, {"w": jnp.asarray([3.0, 1.0, 0.0])}]
      >>> jaxmerge.ties(base, tunes, density=2 / 3)["w"].tolist()
      [2.0, -2.0, 0.0]
    """


@merge_method("dare_linear", base="required", plan=task_vector_plan(sparsify.RANDOM, elects_sign=False),
              references=("2311.03099",), params=(WEIGHTS, DENSITY, KEY, LAMBDA, _normalize(False), RESCALE, INT8_MASK))
def dare_linear(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, key, lambda_=1.0,
                normalize: bool = False, rescale: Rescale = True) -> PyTree:
    """DARE with a linear combination, mergekit's ``dare_linear``: drop, rescale, add.

    Drop each task-vector entry with probability ``1 - density`` and rescale the rest,
    then sum with the weights and add to the base.

    Args:
      base: the model the fine-tunes started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      weights: one per-leaf weight per model (``None``: 1.0 each).
      density: keep probability in (0, 1]; shared, or :func:`jaxmerge.per_model`.
      key: a ``jax.random`` key (required); each leaf and model draws from it folded with
        the leaf's path and the model's index.
      lambda_: per-leaf scale of the merged task vector.
      normalize: divide by the sum of the weights.
      rescale: ``True``/``'l1'`` (mergekit: match the L1 norm of the original), ``'l2'``,
        ``'linf'``, ``'density'`` (the paper: divide by ``density``) or ``False``.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base or key, a structure or shape mismatch, or a hyperparameter out
        of range.

    References:
      Yu et al., "Language models are Super Mario: absorbing abilities from homologous
      models as a free lunch", arXiv 2311.03099.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(1000)}
      >>> tunes = [{"w": jnp.ones(1000)}]
      >>> merged = jaxmerge.dare_linear(base, tunes, density=0.5, key=jax.random.key(0), rescale="density")
      >>> sorted(set(merged["w"].tolist()))
      [0.0, 2.0]
    """


@merge_method("dare_ties", base="required", plan=task_vector_plan(sparsify.RANDOM, elects_sign=True),
              references=("2311.03099",),
              params=(WEIGHTS, DENSITY, KEY, LAMBDA, _normalize(False), RESCALE, MAJORITY_SIGN, INT8_MASK))
def dare_ties(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, key, lambda_=1.0,
              normalize: bool = False, rescale: Rescale = True, majority_sign: MajoritySign = "sum") -> PyTree:
    """DARE drop and rescale followed by TIES sign election, mergekit's ``dare_ties``.

    Args:
      base: the model the fine-tunes started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      weights: one per-leaf weight per model (``None``: 1.0 each).
      density: keep probability in (0, 1]; shared, or :func:`jaxmerge.per_model`.
      key: a ``jax.random`` key (required), as in :func:`dare_linear`.
      lambda_: per-leaf scale of the merged task vector.
      normalize: divide by the summed weights of the agreeing models.
      rescale: as in :func:`dare_linear`.
      majority_sign: as in :func:`ties`.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base or key, a structure or shape mismatch, or a hyperparameter out
        of range.

    References:
      Yu et al., arXiv 2311.03099; Yadav et al., arXiv 2306.01708.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(4)}
      >>> tunes = [{"w": jnp.asarray([1.0, -1.0, 1.0, -1.0])}, {"w": jnp.asarray([1.0, 1.0, 1.0, 1.0])}]
      >>> merged = jaxmerge.dare_ties(base, tunes, key=jax.random.key(0))
      >>> merged["w"].tolist()
      [2.0, 1.0, 2.0, 1.0]
    """


@merge_method("breadcrumbs", base="required", plan=task_vector_plan(sparsify.BREADCRUMBS, elects_sign=False),
              references=("2312.06795",),
              params=(WEIGHTS, DENSITY, GAMMA, LAMBDA, _normalize(False), RESCALE, INT8_MASK))
def breadcrumbs(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, gamma=0.01, lambda_=1.0,
                normalize: bool = False, rescale: Rescale = False) -> PyTree:
    """Model Breadcrumbs, mergekit's ``breadcrumbs``: drop outliers and small entries, add.

    Drop the ``gamma`` fraction of largest-magnitude entries (outliers) and then the
    smallest, so that ``density`` of each task vector remains; sum with the weights.

    Args:
      base: the model the fine-tunes started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      weights: one per-leaf weight per model (``None``: 1.0 each).
      density: fraction kept, in (0, 1]; shared, or :func:`jaxmerge.per_model`.
      gamma: fraction dropped from the top, in [0, 1); ``gamma + density <= 1``.
      lambda_: per-leaf scale of the merged task vector.
      normalize: divide by the sum of the weights.
      rescale: as in :func:`ties`.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base, a structure or shape mismatch, or a hyperparameter out of
        range (``gamma + density > 1`` included).

    References:
      Davari & Belilovsky, "Model Breadcrumbs: scaling multi-task model merging with sparse
      masks", arXiv 2312.06795.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(4)}
      >>> tunes = [{"w": jnp.asarray([0.1, -3.0, 2.0, 0.5])}]
      >>> jaxmerge.breadcrumbs(base, tunes, density=0.5, gamma=0.25)["w"].tolist()
      [0.0, 0.0, 2.0, 0.5]
    """


@merge_method("breadcrumbs_ties", base="required", plan=task_vector_plan(sparsify.BREADCRUMBS, elects_sign=True),
              references=("2312.06795",),
              params=(WEIGHTS, DENSITY, GAMMA, LAMBDA, _normalize(False), RESCALE, MAJORITY_SIGN, INT8_MASK))
def breadcrumbs_ties(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, gamma=0.01, lambda_=1.0,
                     normalize: bool = False, rescale: Rescale = False,
                     majority_sign: MajoritySign = "sum") -> PyTree:
    """Model Breadcrumbs followed by TIES sign election, mergekit's ``breadcrumbs_ties``.

    Args:
      base: the model the fine-tunes started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      weights: one per-leaf weight per model (``None``: 1.0 each).
      density: fraction kept, in (0, 1]; shared, or :func:`jaxmerge.per_model`.
      gamma: fraction dropped from the top, in [0, 1); ``gamma + density <= 1``.
      lambda_: per-leaf scale of the merged task vector.
      normalize: divide by the summed weights of the agreeing models.
      rescale: as in :func:`ties`.
      majority_sign: as in :func:`ties`.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base, a structure or shape mismatch, or a hyperparameter out of
        range.

    References:
      Davari & Belilovsky, arXiv 2312.06795; Yadav et al., arXiv 2306.01708.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(4)}
      >>> tunes = [{"w": jnp.asarray([0.1, -3.0, 2.0, 0.5])}, {"w": jnp.asarray([0.1, 1.0, -1.0, 0.5])}]
      >>> jaxmerge.breadcrumbs_ties(base, tunes, density=0.5, gamma=0.25)["w"].tolist()
      [0.0, 0.0, 2.0, 1.0]
    """


@merge_method("della", base="required", plan=task_vector_plan(sparsify.RANKED, elects_sign=True),
              references=("2406.11617",),
              params=(WEIGHTS, DENSITY, EPSILON, KEY, LAMBDA, _normalize(True), RESCALE, MAJORITY_SIGN, INT8_MASK))
def della(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, epsilon=0.15, key, lambda_=1.0,
          normalize: bool = True, rescale: Rescale = True, majority_sign: MajoritySign = "sum") -> PyTree:
    """DELLA-Merging with sign election, mergekit's ``della``: MagPrune, elect, disjoint merge.

    MagPrune: within each row, entries are kept with probabilities rising linearly with
    their magnitude rank from ``density - epsilon`` to ``density + epsilon``; then
    rescale, elect signs and combine as TIES does.

    Args:
      base: the model the fine-tunes started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      weights: one per-leaf weight per model (``None``: 1.0 each).
      density: mean keep probability, in (0, 1]; shared, or :func:`jaxmerge.per_model`.
      epsilon: the spread, in [0, 1): ``density +/- epsilon`` must lie inside (0, 1) unless
        ``density == 1``.
      key: a ``jax.random`` key (required), as in :func:`dare_linear`.
      lambda_: per-leaf scale of the merged task vector.
      normalize: divide by the summed weights of the agreeing models.
      rescale: ``True``/``'l1'`` (mergekit), ``'density'`` (the paper: divide each kept
        entry by its keep probability), ``'l2'``, ``'linf'`` or ``False``.
      majority_sign: as in :func:`ties`.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base or key, a structure or shape mismatch, or a hyperparameter out
        of range.

    References:
      Deep et al., "DELLA-Merging: reducing interference in model merging through
      magnitude-based sampling", arXiv 2406.11617.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros((2, 3))}
      >>> tunes = [{"w": jnp.ones((2, 3))}]
      >>> jaxmerge.della(base, tunes, key=jax.random.key(0))["w"].shape
      (2, 3)
    """


@merge_method("della_linear", base="required", plan=task_vector_plan(sparsify.RANKED, elects_sign=False),
              references=("2406.11617",),
              params=(WEIGHTS, DENSITY, EPSILON, KEY, LAMBDA, _normalize(False), RESCALE, INT8_MASK))
def della_linear(base: PyTree, models: Sequence[PyTree], weights=None, *, density=1.0, epsilon=0.15, key,
                 lambda_=1.0, normalize: bool = False, rescale: Rescale = True) -> PyTree:
    """DELLA's MagPrune drop with a linear combination, mergekit's ``della_linear``.

    Args:
      base: the model the fine-tunes started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      weights: one per-leaf weight per model (``None``: 1.0 each).
      density: mean keep probability, in (0, 1]; shared, or :func:`jaxmerge.per_model`.
      epsilon: the spread, as in :func:`della`.
      key: a ``jax.random`` key (required), as in :func:`dare_linear`.
      lambda_: per-leaf scale of the merged task vector.
      normalize: divide by the sum of the weights.
      rescale: as in :func:`della`.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base or key, a structure or shape mismatch, or a hyperparameter out
        of range.

    References:
      Deep et al., arXiv 2406.11617.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros((2, 3))}
      >>> tunes = [{"w": jnp.ones((2, 3))}]
      >>> jaxmerge.della_linear(base, tunes, density=1.0, key=jax.random.key(0))["w"].tolist()
      [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
