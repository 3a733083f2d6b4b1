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
    """The uniform soup (Wortsman et al., arXiv 2203.05482): the plain average of all models."""
    return average(list(models))


def greedy_soup(models: Sequence[PyTree], evaluate: Callable, *, keep_ties: bool = True) -> SoupResult:
    """Greedy soup (Wortsman et al., arXiv 2203.05482, Recipe 1).

    Candidates are sorted by their own held-out score (best first); the soup starts as the
    best one, and each next candidate is added if the uniform average with it scores at
    least as well as without it (strictly better with ``keep_ties=False``, as the authors'
    code does). The result never scores below the best single candidate on the data
    ``evaluate`` uses.

    Args:
      models: the candidates (e.g. fine-tunes of one start with different hyperparameters).
      evaluate: ``params -> float`` on held-out data, higher is better.

    Raises:
      ValueError: no models, or ``evaluate`` returning a non-scalar or a non-finite value.
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
    """Soup of Category Experts (SoCE, Maiti et al., "Souper-Model", arXiv 2511.13254).

    1. Categories whose per-model scores correlate strongly (``rho >= threshold``, Pearson
       over the candidates) form a cluster; weakly or negatively correlated ones stay apart.
    2. Each cluster's expert is the candidate with the best mean score on its categories.
    3. The experts' mixing weights are searched on a grid (every combination of ``grid``
       values summing to 1, plus uniform weights) and the soup scoring best under
       ``evaluate`` is kept.

    Args:
      models: the candidates.
      category_scores: ``(num_models, num_categories)`` scores of each candidate per
        benchmark category (higher is better).
      evaluate: ``params -> float``, the aggregate held-out score to maximise.
      threshold: the correlation above which categories belong together. The paper does
        not give its value; 0.5 is this library's default.
      grid: candidate weights of each expert.
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
