"""MAP: the Pareto front of merge coefficients across tasks, from a quadratic model of each
task's loss in coefficient space (Li et al., arXiv 2406.07529).

Each task's loss (or any metric) is evaluated at a few coefficient vectors, ``(1 + n)(2 + n)
/ 2`` or more for ``n`` coefficients, one vmapped call per task, and a full quadratic is fitted
to them by least squares. The surrogates then cost nothing to evaluate, so the trade-offs of
thousands of coefficient vectors are compared, and the non-dominated ones kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.errors import JaxmergeError


class Quadratic(NamedTuple):
    """``f(c) = constant + linear @ c + c @ quadratic @ c`` (``quadratic`` symmetric).

    Examples:
      >>> import numpy as np
      >>> Quadratic(1.0, np.zeros(2), np.eye(2))(np.asarray([[1.0, 2.0]])).tolist()
      [6.0]
    """

    constant: float
    linear: np.ndarray
    quadratic: np.ndarray

    def __call__(self, c: np.ndarray) -> np.ndarray:
        """The values at the rows of ``c`` (``(count, n)``)."""
        c = np.asarray(c, np.float64)
        return self.constant + c @ self.linear + np.einsum("ki,ij,kj->k", c, self.quadratic, c)


def _features(c: np.ndarray) -> np.ndarray:
    """1, c_i, and c_i c_j (i <= j) per row."""
    pairs = list(itertools.combinations_with_replacement(range(c.shape[1]), 2))
    return np.concatenate([np.ones((len(c), 1)), c, np.stack([c[:, i] * c[:, j] for i, j in pairs], 1)], 1)


def fit_quadratic(c: np.ndarray, values: np.ndarray) -> Quadratic:
    """The least-squares quadratic through ``values`` at the rows of ``c``.

    Args:
      c: ``(count, n)`` coefficient vectors, ``count >= (n + 1)(n + 2) / 2``.
      values: ``(count,)``.

    Returns:
      The :class:`Quadratic`.

    Raises:
      JaxmergeError: too few points for a full quadratic.

    Examples:
      >>> import numpy as np
      >>> c = np.random.default_rng(0).uniform(size=(10, 2))
      >>> q = fit_quadratic(c, 1 + c[:, 0] - 2 * c[:, 0] * c[:, 1])
      >>> np.round(q.quadratic, 6).tolist()
      [[0.0, -1.0], [-1.0, 0.0]]
    """
    c, values = np.asarray(c, np.float64), np.asarray(values, np.float64)
    n = c.shape[1]
    if len(c) < (n + 1) * (n + 2) // 2:
        raise JaxmergeError(f"a quadratic in {n} coefficients needs at least {(n + 1) * (n + 2) // 2} points, "
                            f"got {len(c)}")
    solution = np.linalg.lstsq(_features(c), values, rcond=None)[0]
    quadratic = np.zeros((n, n))
    for w, (i, j) in zip(solution[1 + n:], itertools.combinations_with_replacement(range(n), 2)):
        quadratic[i, j] += w / 2
        quadratic[j, i] += w / 2
    return Quadratic(float(solution[0]), solution[1:1 + n], quadratic)


def quadratic_surrogates(losses: Sequence[Callable[[jax.Array], jax.Array]], dims: int, *, key: jax.Array,
                         points: int | None = None, bounds: tuple[float, float] = (0.0, 1.0)) -> list[Quadratic]:
    """A fitted quadratic of each task's loss as a function of the merge coefficients.

    Args:
      losses: per task, ``loss(c) -> scalar`` in JAX for a ``(dims,)`` coefficient vector
        (typically ``lambda c: task_loss(combine(vectors, c))``), vmapped over the points.
      dims: the number of coefficients.
      key: the random key of the points.
      points: how many coefficient vectors to evaluate (default: twice the quadratic's
        ``(dims + 1)(dims + 2) / 2`` terms), uniform in ``bounds``.
      bounds: the box the points are drawn from.

    Returns:
      One :class:`Quadratic` per task.

    References:
      Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
      Approximation", arXiv 2406.07529.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> (q,) = quadratic_surrogates([lambda c: jnp.sum((c - 0.25) ** 2)], 2, key=jax.random.key(0))
      >>> np.round(q.linear, 6).tolist()  # (c - 0.25)^2 = c^2 - 0.5 c + 0.0625 per coefficient
      [-0.5, -0.5]
    """
    count = points or (dims + 1) * (dims + 2)
    c = np.asarray(jax.random.uniform(key, (count, dims), minval=bounds[0], maxval=bounds[1]))
    return [fit_quadratic(c, np.asarray(jax.jit(jax.vmap(loss))(jnp.asarray(c, jnp.float32)))) for loss in losses]


def pareto_front(surrogates: Sequence[Quadratic], *, key: jax.Array, samples: int = 4096,
                 bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """The non-dominated coefficient vectors among ``samples`` uniform ones, by the surrogates
    (every task's loss minimised).

    Args:
      surrogates: one quadratic per task (:func:`quadratic_surrogates`).
      key: the random key of the samples.
      samples: how many coefficient vectors to compare.
      bounds: the box they are drawn from.

    Returns:
      ``(coefficients, losses)``: ``(front, dims)`` and ``(front, tasks)``, sorted by the first
      task's loss.

    Examples:
      >>> import jax, numpy as np
      >>> first = Quadratic(0.0, np.asarray([-2.0, 0.0]), np.eye(2))   # minimum at (1, 0)
      >>> second = Quadratic(0.0, np.asarray([0.0, -2.0]), np.eye(2))  # minimum at (0, 1)
      >>> c, losses = pareto_front([first, second], key=jax.random.key(0))
      >>> bool(np.all(np.abs(c.sum(1) - 1) < 0.15))  # near the segment between them (the true front)
      True
    """
    dims = len(surrogates[0].linear)
    c = np.asarray(jax.random.uniform(key, (samples, dims), minval=bounds[0], maxval=bounds[1]), np.float64)
    losses = np.stack([q(c) for q in surrogates], 1)
    kept = []
    for i in np.lexsort(losses.T[::-1]):  # by the first loss: only an earlier point can dominate
        if not kept or not np.any(np.all(losses[kept] <= losses[i], axis=1)):
            kept.append(i)
    kept = np.asarray(kept)
    return c[kept], losses[kept]


def plot_pareto_front(losses: np.ndarray, path: str | Path, *, labels: tuple[str, str] = ("task 1", "task 2"),
                      others: dict[str, np.ndarray] | None = None) -> Path:
    """Plot a two-task Pareto front (losses) and, optionally, named points to compare.

    Args:
      losses: ``(front, 2)`` from :func:`pareto_front`.
      path: the image file to write.
      labels: the axes' names.
      others: ``{name: (2,) losses}`` marked on the plot (e.g. task arithmetic's).

    Returns:
      The path.

    Raises:
      JaxmergeError: losses of more than two tasks.

    Examples:
      >>> import pathlib, tempfile, numpy as np
      >>> out = plot_pareto_front(np.asarray([[0.1, 0.9], [0.5, 0.4]]), pathlib.Path(tempfile.mkdtemp()) / "f.png")
      >>> out.exists()
      True
    """
    if losses.shape[1] != 2:
        raise JaxmergeError(f"plot_pareto_front draws two tasks, got {losses.shape[1]}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 4))
    axes.plot(losses[:, 0], losses[:, 1], ".-", label="Pareto front (surrogate)")
    for name, point in (others or {}).items():
        axes.plot(*point, "o", label=name)
    axes.set_xlabel(f"{labels[0]} loss")
    axes.set_ylabel(f"{labels[1]} loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
