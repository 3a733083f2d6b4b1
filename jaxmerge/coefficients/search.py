"""Merge hyperparameters and checkpoint coefficients found by search: grid, random or CMA-ES
(from evosax), each population of candidates merged and evaluated in one ``jax.vmap``-ed,
jitted call, so that the search needs no checkpoint on disk and no Python loop over candidates.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxmerge._promotion import standard_promotion
from jaxmerge._tree import PyTree
from jaxmerge.errors import JaxmergeError

Strategy = Literal["grid", "random", "cmaes"]


class SearchResult(NamedTuple):
    """The best candidate a search found, and every candidate it evaluated.

    Attributes:
      best: the best hyperparameters (``{name: float}``), or coefficients (an array).
      best_score: its score.
      candidates: every candidate evaluated, ``(count, dims)``, in the search's units.
      scores: their scores, ``(count,)``.

    Examples:
      >>> import numpy as np
      >>> SearchResult({"t": 0.5}, 1.0, np.zeros((1, 1)), np.ones(1)).best
      {'t': 0.5}
    """

    best: dict | jax.Array
    best_score: float
    candidates: np.ndarray
    scores: np.ndarray


def _batched(objective: Callable[[jax.Array], jax.Array]) -> Callable[[np.ndarray], np.ndarray]:
    run = jax.jit(jax.vmap(objective))
    return lambda points: np.asarray(run(jnp.asarray(points, jnp.float32)))


class _Fixed:
    """Rounds of candidates known up front (grid, random): ``population`` at a time."""

    def __init__(self, points: np.ndarray, population: int):
        self.points, self.population = points, population
        self.rounds = -(-len(points) // population)

    def start(self):
        return None

    def ask(self, r, state):
        return self.points[r * self.population:(r + 1) * self.population], None, state

    def tell(self, r, state, raw, values):
        return state


class _CmaEs:
    """evosax's CMA-ES (it minimises: told the negated scores), candidates mapped by ``transform``."""

    def __init__(self, mean: np.ndarray, std: float, population: int, generations: int, key: jax.Array,
                 transform=lambda x: x):
        try:
            from evosax.algorithms import CMA_ES
        except ImportError:
            raise JaxmergeError("strategy 'cmaes' needs evosax: pip install evosax") from None
        with standard_promotion():
            self.strategy = CMA_ES(population_size=population, solution=jnp.zeros(len(mean), jnp.float32))
            defaults = jax.jit(lambda: self.strategy.default_params)()  # one compiled kernel, not one per op
            self.params = defaults.replace(std_init=jnp.float32(std))
        self.key, self.init_key = jax.random.split(key)
        self.mean, self.rounds, self.transform = jnp.asarray(mean, jnp.float32), generations, transform

    def start(self):
        # strongly typed, as ``tell`` returns it: else ``ask`` and ``tell`` compile twice
        return jax.tree.map(lambda x: jnp.asarray(x, x.dtype), self.strategy.init(self.init_key, self.mean, self.params))

    def ask(self, r, state):
        raw, state = self.strategy.ask(jax.random.fold_in(jax.random.fold_in(self.key, r), 0), state, self.params)
        return np.asarray(self.transform(raw)), raw, state

    def tell(self, r, state, raw, values):
        key = jax.random.fold_in(jax.random.fold_in(self.key, r), 1)
        return self.strategy.tell(key, raw, -jnp.asarray(values), state, self.params)[0]


def _run(rounds, objective, population: int, dims: int, checkpoint: str | os.PathLike | None,
         progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Every round's candidates evaluated; after each round, with ``checkpoint``, the candidates,
    scores and strategy state saved with Orbax, and a later call resumes after the last round
    saved (drawing what the uninterrupted search would have drawn)."""
    with standard_promotion():
        state = rounds.start()
        leaves, treedef = jax.tree.flatten(state)
        size = rounds.rounds * population
        record = {"next": jnp.zeros((), jnp.int32), "candidates": jnp.full((size, dims), jnp.nan, jnp.float32),
                  "scores": jnp.full((size,), jnp.nan, jnp.float32), "state": leaves}
        if checkpoint is not None:
            record = _restore(Path(checkpoint), record)
        state = jax.tree.unflatten(treedef, record["state"])
        candidates, scores = np.array(record["candidates"]), np.array(record["scores"])
        for r in tqdm(range(int(record["next"]), rounds.rounds), desc=desc, disable=not progress):
            points, raw, state = rounds.ask(r, state)
            values = objective(points)
            state = rounds.tell(r, state, raw, values)
            candidates[r * population:r * population + len(points)] = points
            scores[r * population:r * population + len(points)] = values
            if checkpoint is not None:
                _save(Path(checkpoint), r + 1, {"next": jnp.asarray(r + 1, jnp.int32), "candidates": candidates,
                                                "scores": scores, "state": jax.tree.leaves(state)})
    done = ~np.isnan(scores) | ~np.isnan(candidates).any(1)
    return candidates[done], scores[done]


def _rounds_saved(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("round_*") if p.name[6:].isdigit()) if directory.is_dir() else []


def _restore(directory: Path, fresh: dict) -> dict:
    saved = _rounds_saved(directory)
    if not saved:
        return fresh
    from orbax.checkpoint import v1 as ocp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=device), fresh)
    try:
        return ocp.load(saved[-1], abstract)
    except (ValueError, TypeError) as error:
        raise JaxmergeError(f"{saved[-1]} is not a checkpoint of this search ({str(error).splitlines()[0]}); "
                            "use another directory") from None


def _save(directory: Path, round_: int, record: dict) -> None:
    from orbax.checkpoint import v1 as ocp

    older = _rounds_saved(directory)
    ocp.save(directory / f"round_{round_:06d}", jax.tree.map(jnp.asarray, record))
    for path in older:
        shutil.rmtree(path, ignore_errors=True)


def search(merge: Callable[..., PyTree], evaluate: Callable[[PyTree], jax.Array],
           space: Mapping[str, tuple[float, float]], *, strategy: Strategy = "cmaes", budget: int = 64,
           population: int = 16, key: jax.Array | None = None, checkpoint: str | os.PathLike | None = None,
           progress: bool = False) -> SearchResult:
    """The hyperparameters in ``space`` that maximise ``evaluate(merge(**hyperparameters))``.

    Candidates are evaluated ``population`` at a time in one jitted ``jax.vmap`` call, so
    ``merge`` must accept traced hyperparameters (every jaxmerge method does for its numbers:
    ``lambda_``, ``density``, ``t``, weights) and ``evaluate`` must be written in JAX.

    Args:
      merge: ``merge(**hyperparameters) -> params``, e.g.
        ``lambda lambda_, density: jaxmerge.ties(base, models, density=density, lambda_=lambda_)``.
      evaluate: ``evaluate(params) -> score`` (higher is better), e.g. validation accuracy.
      space: ``{name: (low, high)}``, the range of each hyperparameter.
      strategy: ``'grid'`` (``floor(budget ** (1/dims))`` points per dimension, ends
        included), ``'random'`` (uniform) or ``'cmaes'`` (evosax's CMA-ES on the unit cube
        mapped onto the ranges, candidates clipped to them; ``budget // population``
        generations from the middle of the space).
      budget: the number of candidates to evaluate (about).
      population: candidates per vmapped call (and CMA-ES's population size).
      key: the random key of ``'random'`` and ``'cmaes'``.
      checkpoint: a directory where the search is saved (Orbax) after each population; a search
        started again with the same arguments resumes after the last one saved, with the
        same result as an uninterrupted search.
      progress: show a progress bar.

    Returns:
      A :class:`SearchResult` (candidates in the hyperparameters' units, columns in sorted
      name order).

    Raises:
      JaxmergeError: an empty space or range, a budget below 1, an unknown strategy, or no key
        for a random strategy.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> base, models = jnp.zeros(2), [jnp.asarray([1.0, 0.0]), jnp.asarray([0.0, 1.0])]
      >>> target = jnp.asarray([0.6, 0.6])
      >>> result = search(lambda lambda_: jaxmerge.task_arithmetic(base, models, lambda_=lambda_),
      ...                 lambda merged: -jnp.sum((merged - target) ** 2), {"lambda_": (0.0, 1.0)},
      ...                 strategy="grid", budget=11)
      >>> round(result.best["lambda_"], 2)
      0.6
    """
    names = sorted(space)
    if not names or any(not high > low for low, high in (space[n] for n in names)):
        raise JaxmergeError(f"space must map each name to a range (low, high) with high > low, got {dict(space)}")
    if budget < 1 or population < 1:
        raise JaxmergeError(f"budget and population must be at least 1, got {budget} and {population}")
    low, high = (np.asarray([space[n][i] for n in names], np.float64) for i in (0, 1))
    objective = _batched(lambda x: evaluate(merge(**{n: x[i] for i, n in enumerate(names)})))
    if strategy == "grid":
        per_axis = max(2, math.floor(budget ** (1 / len(names)) + 1e-9))
        rounds = _Fixed(np.asarray(list(itertools.product(*[np.linspace(lo, hi, per_axis)
                                                            for lo, hi in zip(low, high)]))), population)
    elif strategy in ("random", "cmaes"):
        if key is None:
            raise JaxmergeError(f"strategy {strategy!r} needs a key")
        if strategy == "random":
            rounds = _Fixed(low + (high - low) * np.asarray(jax.random.uniform(key, (budget, len(names)))), population)
        else:
            rounds = _CmaEs(np.full(len(names), 0.5), 0.3, population, max(1, budget // population), key,
                            transform=lambda x: low + (high - low) * np.clip(np.asarray(x), 0, 1))
    else:
        raise JaxmergeError(f"strategy must be 'grid', 'random' or 'cmaes', got {strategy!r}")
    candidates, scores = _run(rounds, objective, population, len(names), checkpoint, progress, strategy)
    best = int(np.nanargmax(scores))
    return SearchResult({n: float(candidates[best, i]) for i, n in enumerate(names)}, float(scores[best]),
                        candidates, scores)


def lcsc(checkpoints: Sequence[PyTree], evaluate: Callable[[PyTree], jax.Array], *, key: jax.Array,
         generations: int = 20, population: int = 16, init: Sequence[float] | None = None, std: float = 0.1,
         checkpoint: str | os.PathLike | None = None, progress: bool = False) -> SearchResult:
    """Linear Combination of Saved Checkpoints: coefficients ``c`` maximising
    ``evaluate(sum_i c_i checkpoints[i])``, found by CMA-ES (evosax).

    Args:
      checkpoints: a training run's saved params (pytrees of the same structure).
      evaluate: ``evaluate(params) -> score`` in JAX (higher is better), vmapped over a
        population.
      key: the random key.
      generations: CMA-ES generations.
      population: candidates per generation, evaluated in one vmapped call.
      init: the starting coefficients (default: the uniform average, ``1/n`` each).
      std: CMA-ES's starting step size.
      checkpoint: a directory to save the search in after each generation, and resume from
        (as :func:`search`).
      progress: show a progress bar.

    Returns:
      A :class:`SearchResult` whose ``best`` is the coefficient vector; its params are
      ``sum_i best[i] checkpoints[i]``. The coefficients are not constrained (they may be
      negative, or not sum to 1).

    Raises:
      JaxmergeError: no checkpoints, or ``init`` of another length.

    References:
      Liu et al., "Linear Combination of Saved Checkpoints Makes Consistency and Diffusion
      Models Better", arXiv 2404.02241.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> runs = [jnp.asarray([1.0, 0.0]), jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 1.0])]
      >>> target = jnp.asarray([2.0, 0.5])
      >>> found = lcsc(runs, lambda p: -jnp.sum((p - target) ** 2), key=jax.random.key(0), generations=40)
      >>> found.best_score > -1e-3
      True
    """
    if not checkpoints:
        raise JaxmergeError("lcsc needs at least one checkpoint")
    init = np.full(len(checkpoints), 1 / len(checkpoints)) if init is None else np.asarray(init, np.float64)
    if init.shape != (len(checkpoints),):
        raise JaxmergeError(f"init must have one coefficient per checkpoint ({len(checkpoints)}), got {init.shape}")

    def combined(c):
        return jax.tree.map(lambda *leaves: sum(c[i] * leaf for i, leaf in enumerate(leaves)).astype(leaves[0].dtype),
                            *checkpoints)
    candidates, scores = _run(_CmaEs(init, std, population, generations, key),
                              _batched(lambda c: evaluate(combined(c))), population, len(init), checkpoint, progress,
                              "LCSC")
    best = int(np.nanargmax(scores))
    return SearchResult(jnp.asarray(candidates[best]), float(scores[best]), candidates, scores)
