"""Matched averaging of N models: every model aligned to a shared set of units, then averaged
(as FedMA does for the models of federated clients, Wang et al., arXiv 2002.06440).

Starting from the first model, each round aligns every model to the current average by weight
matching (:func:`~jaxmerge.weight_matching`) and averages the aligned models; the rounds
stop when no model's permutations change, or after ``rounds``. The result lives in the first
model's unit order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmerge._tree import PyTree, flatten_models
from jaxmerge.alignment.matching import apply_permutation, weight_matching
from jaxmerge.alignment.spec import PermutationSpec
from jaxmerge.errors import JaxmergeError


def matched_average(spec: PermutationSpec, models: Sequence[PyTree], *, weights: Sequence[float] | None = None,
                    rounds: int = 5, seed: int = 0) -> tuple[PyTree, list[PyTree]]:
    """The average of ``models`` after aligning all of them to shared units.

    Args:
      spec: which axes of which leaves each permutation acts on.
      models: the models (same structure and shapes), e.g. trained from different
        initialisations or on different clients' data.
      weights: each model's weight in the average (default: equal).
      rounds: the most rounds of aligning to the average and averaging.
      seed: seed of :func:`~jaxmerge.weight_matching`'s order of permutations.

    Returns:
      ``(average, aligned)``: the weighted average of the aligned models, and each model
      aligned (it computes the same function as the model it came from).

    Raises:
      JaxmergeError: no models, models that differ, weights of another length or summing to
        0, or a spec that does not match them.

    References:
      Wang et al., "Federated Learning with Matched Averaging", arXiv 2002.06440; Ainsworth et
      al., "Git Re-Basin", arXiv 2209.04836.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> spec = jaxmerge.PermutationSpec({"l0/kernel": (None, "h"), "l1/kernel": ("h", None)})
      >>> model = {"l0": {"kernel": jnp.asarray([[1.0, 2.0, 3.0]])}, "l1": {"kernel": jnp.asarray([[4.0], [5.0], [6.0]])}}
      >>> shuffled = [jaxmerge.apply_permutation(spec, {"h": p}, model) for p in ([0, 1, 2], [2, 0, 1], [1, 2, 0])]
      >>> average, _ = matched_average(spec, shuffled)
      >>> average["l0"]["kernel"].tolist()  # the same units, found in every shuffled copy
      [[1.0, 2.0, 3.0]]
    """
    import jaxmerge

    if not models:
        raise JaxmergeError("matched_average needs at least one model")
    flatten_models(list(models))
    weights = [1.0] * len(models) if weights is None else list(weights)
    if len(weights) != len(models) or sum(weights) == 0:
        raise JaxmergeError(f"weights must have one entry per model ({len(models)}) and not sum to 0, got {weights}")
    aligned, previous, average = list(models), None, models[0]
    for _ in range(rounds):
        perms = [weight_matching(spec, average, m, seed=seed) for m in models]
        if previous is not None and all(np.array_equal(p[n], q[n]) for p, q in zip(perms, previous) for n in p):
            break
        aligned = [apply_permutation(spec, p, m) for p, m in zip(perms, models)]
        average, previous = jaxmerge.average(aligned, weights), perms
    return average, aligned
