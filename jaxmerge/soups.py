"""Model soups: averaging fine-tunes of one start, chosen with a held-out evaluation.

Every function takes ``evaluate(params) -> float`` (higher is better; a jitted function is
fine) and caches its scores by the set of ingredients, so no soup is evaluated twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from jaxmerge._scores import as_score
from jaxmerge._tree import PyTree
from jaxmerge.errors import JaxmergeError
from jaxmerge.merging.linear import average


class SoupResult(NamedTuple):
    """A soup: its ``params``, the ``indices`` of its ingredients (and ``weights``), its
    held-out ``score``, and the ``history`` of ``(description, score, accepted)`` tried."""
    params: PyTree
    indices: tuple[int, ...]
    weights: tuple[float, ...]
    score: float
    history: list


class _Scorer:
    """``evaluate`` with validation and a cache keyed by the soup's ingredients and weights."""

    def __init__(self, models: Sequence[PyTree], evaluate: Callable):
        if not isinstance(models, (list, tuple)) or not models:
            raise JaxmergeError("models must be a non-empty list of candidate parameters")
        if not callable(evaluate):
            raise TypeError("evaluate must be a function params -> float")
        self.models, self.evaluate, self.cache = list(models), evaluate, {}

    def soup(self, indices: Sequence[int], weights: Sequence[float] | None = None) -> PyTree:
        chosen = [self.models[i] for i in indices]
        return chosen[0] if len(chosen) == 1 else average(chosen, None if weights is None else list(weights))

    def score(self, indices: Sequence[int], weights: Sequence[float] | None = None) -> float:
        key = (tuple(indices), None if weights is None else tuple(round(w, 12) for w in weights))
        if key not in self.cache:
            soup = self.soup(indices, weights)
            self.cache[key] = as_score(self.evaluate(soup), f"the soup of models {list(indices)}")
        return self.cache[key]


def uniform_soup(models: Sequence[PyTree]) -> PyTree:
    """The uniform soup: the plain average of all models.

    ``theta = (1 / N) sum_i theta_i``, leaf by leaf (:func:`jaxmerge.average` with equal
    weights): float leaves are averaged (accumulated in float32, returned in
    ``models[0]``'s dtypes), other leaves are taken from ``models[0]``. Unlike
    :func:`greedy_soup` it needs no held-out evaluation, and it helps only when all the
    models sit in one basin (fine-tunes of one start).

    Args:
      models: the models to average, with the same structure and shapes.

    Returns:
      A pytree shaped like ``models[0]``, with its dtypes.

    Raises:
      JaxmergeError: no models, or models differing in structure, shapes or dtype kinds.

    References:
      Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
      improves accuracy without increasing inference time", arXiv 2203.05482.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> models = [{"w": jnp.asarray([0.0, 2.0])}, {"w": jnp.asarray([4.0, 6.0])}, {"w": jnp.asarray([2.0, 1.0])}]
      >>> jaxmerge.uniform_soup(models)["w"].tolist()
      [2.0, 3.0]
    """
    return average(list(models))


def greedy_soup(models: Sequence[PyTree], evaluate: Callable, *, keep_ties: bool = True) -> SoupResult:
    """The greedy soup: average the candidates that do not hurt a held-out score.

    Recipe 1 of the model soups paper. Candidates are sorted by their own held-out score
    (best first, ties in list order); the soup starts as the best one, and each next
    candidate is added if the uniform average with it scores at least as well as without
    it (strictly better with ``keep_ties=False``, as the authors' code does). The result
    never scores below the best single candidate on the data ``evaluate`` uses. With
    ``N`` candidates, ``evaluate`` runs ``2N - 1`` times: once per candidate and once per
    soup tried.

    Args:
      models: the candidates (e.g. fine-tunes of one start with different hyperparameters),
        a non-empty list or tuple of pytrees with the same structure and shapes.
      evaluate: ``params -> float`` on held-out data, higher is better.
      keep_ties: accept a candidate that leaves the score unchanged.

    Returns:
      A ``SoupResult``: ``params`` (the uniform average of the chosen candidates),
      ``indices`` (theirs, sorted), ``weights`` (``1 / len(indices)`` each), ``score``
      (the soup's held-out score) and ``history`` (``(description, score, accepted)`` of
      each step, in order).

    Raises:
      JaxmergeError: ``models`` is not a non-empty list or tuple, models differing in
        structure or shapes, or ``evaluate`` returning a non-scalar or a non-finite value.
      TypeError: ``evaluate`` is not callable.

    References:
      Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
      improves accuracy without increasing inference time", arXiv 2203.05482.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> models = [{"w": jnp.asarray(0.0)}, {"w": jnp.asarray(2.0)}, {"w": jnp.asarray(10.0)}]
      >>> soup = jaxmerge.greedy_soup(models, lambda p: 5.0 - jnp.abs(p["w"] - 1.0))  # best at w = 1
      >>> soup.indices, soup.params["w"].tolist(), soup.score
      ((0, 1), 1.0, 5.0)
      >>> [accepted for _, _, accepted in soup.history]  # model 0 (score 4), + model 1 (5), + model 2 (2)
      [True, True, False]
    """
    scorer = _Scorer(models, evaluate)
    singles = [scorer.score([i]) for i in range(len(models))]
    order = sorted(range(len(models)), key=lambda i: -singles[i])
    chosen, best = [order[0]], singles[order[0]]
    history = [(f"model {order[0]}", best, True)]
    for i in order[1:]:
        score = scorer.score(sorted(chosen + [i]))
        accepted = score >= best if keep_ties else score > best
        history.append((f"add model {i}", score, accepted))
        if accepted:
            chosen, best = chosen + [i], score
    indices = tuple(sorted(chosen))
    return SoupResult(scorer.soup(indices), indices, tuple([1 / len(indices)] * len(indices)), best, history)


def _category_clusters(category_scores: np.ndarray, threshold: float) -> list[list[int]]:
    """Categories joined when their scores across models correlate with ``rho >= threshold``."""
    num = category_scores.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.nan_to_num(np.corrcoef(category_scores, rowvar=False).reshape(num, num))
    parent = list(range(num))

    def root(c):
        while parent[c] != c:
            c = parent[c]
        return c

    for a, b in itertools.combinations(range(num), 2):
        if correlation[a, b] >= threshold:
            parent[root(a)] = root(b)
    clusters: dict[int, list[int]] = {}
    for c in range(num):
        clusters.setdefault(root(c), []).append(c)
    return list(clusters.values())


def category_expert_soup(models: Sequence[PyTree], category_scores, evaluate: Callable, *,
                         threshold: float = 0.5, grid: Sequence[float] = tuple(np.round(np.arange(1, 10) / 10, 1))
                         ) -> SoupResult:
    """Soup of Category Experts (SoCE): a weighted soup of the best model per group of categories.

    1. Categories whose per-model scores correlate strongly (``rho >= threshold``, Pearson
       over the candidates) form a cluster; weakly or negatively correlated ones stay
       apart. Clusters are joined through chains of such pairs; a category whose scores
       do not vary correlates as 0.
    2. Each cluster's expert is the candidate with the best mean score on its categories
       (the first on ties); the experts are the distinct such candidates.
    3. The experts' mixing weights are searched on a grid: uniform weights first, then
       every combination of ``grid`` values (one per expert) summing to 1. Each soup is
       ``sum_e w_e theta_e / sum_e w_e``, and the first one scoring best under
       ``evaluate`` is kept.

    Args:
      models: the candidates, a non-empty list or tuple of pytrees with the same
        structure and shapes.
      category_scores: ``(num_models, num_categories)`` scores of each candidate per
        benchmark category (higher is better).
      evaluate: ``params -> float``, the aggregate held-out score to maximise.
      threshold: the correlation at or above which categories belong together. The paper
        does not give its value; 0.5 is this library's default.
      grid: candidate weights of each expert (of the ``len(grid) ** num_experts``
        combinations, those summing to 1 are tried).

    Returns:
      A ``SoupResult``: ``params`` (the best soup), ``indices`` (the experts, sorted),
      ``weights`` (theirs, in that order), ``score`` (the soup's held-out score) and
      ``history`` (``(description, score, improved)`` of each weighting tried, in order).

    Raises:
      JaxmergeError: ``models`` is not a non-empty list or tuple, ``category_scores`` does
        not have shape ``(num_models, num_categories)``, the experts differ in structure
        or shapes, or ``evaluate`` returns a non-scalar or non-finite value.
      TypeError: ``evaluate`` is not callable.

    References:
      Maiti et al., "Souper-Model", arXiv 2511.13254; Wortsman et al., "Model soups",
      arXiv 2203.05482.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> models = [{"w": jnp.asarray(0.0)}, {"w": jnp.asarray(1.0)}, {"w": jnp.asarray(0.5)}]
      >>> category_scores = [[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]]  # model 0 leads category 0, model 1 category 1
      >>> soup = jaxmerge.category_expert_soup(models, category_scores, lambda p: 1.0 - jnp.abs(p["w"] - 0.3))
      >>> soup.indices, [float(w) for w in soup.weights], round(soup.score, 6)
      ((0, 1), [0.7, 0.3], 1.0)
      >>> len(soup.history)  # uniform weights, then the 9 pairs of grid values summing to 1
      10
    """
    scorer = _Scorer(models, evaluate)
    scores = np.asarray(category_scores, np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(models):
        raise JaxmergeError(f"category_scores must have shape (num_models={len(models)}, num_categories), "
                         f"got {scores.shape}")
    clusters = _category_clusters(scores, threshold)
    experts = sorted({int(np.argmax(scores[:, cluster].mean(axis=1))) for cluster in clusters})
    candidates = [tuple([1 / len(experts)] * len(experts))]
    candidates += [w for w in itertools.product(grid, repeat=len(experts)) if abs(sum(w) - 1) < 1e-9]
    history, best = [], None
    for weights in candidates:
        score = scorer.score(experts, weights)
        improved = best is None or score > best[0]
        history.append((f"experts {experts} weights {tuple(round(w, 3) for w in weights)}", score, improved))
        if improved:
            best = (score, weights)
    score, weights = best
    return SoupResult(scorer.soup(experts, weights), tuple(experts), tuple(weights), score, history)
