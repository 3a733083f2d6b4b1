"""Merge analysis: interpolation curves and barriers, task-vector similarity, and plots.

The plots need matplotlib (``pip install jaxmerge[examples]``); nothing else does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge._scores import as_score
from jaxmerge._tree import PyTree, flatten_models
from jaxmerge.errors import JaxmergeError
from jaxmerge.merging.linear import lerp


def interpolation_curve(a: PyTree, b: PyTree, evaluate: Callable, *, num: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """``evaluate`` along the straight line ``(1 - t) a + t b`` at ``num`` evenly spaced ``t``.

    Returns:
      ``(ts, values)``, two arrays of length ``num`` (``ts[0] = 0``, ``ts[-1] = 1``).

    Raises:
      ValueError: ``num < 2``, or ``evaluate`` returning a non-scalar or non-finite value.
    """
    if not isinstance(num, int) or num < 2:
        raise JaxmergeError(f"num must be an int >= 2, got {num!r}")
    ts = np.linspace(0.0, 1.0, num)
    values = []
    for t in ts:
        values.append(as_score(evaluate(lerp(a, b, float(t))), f"t={t:g}"))
    return ts, np.asarray(values)


def barrier(ts: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False) -> float:
    """The barrier of an interpolation curve (Frankle et al., arXiv 1912.05671).

    For a loss, ``max_t [L(t) - ((1 - t) L(0) + t L(1))]``: how far the curve rises above
    the straight line between its ends (0 for a convex or linear curve). With
    ``higher_is_better`` (an accuracy), how far it dips below instead.
    """
    ts, values = np.asarray(ts, np.float64), np.asarray(values, np.float64)
    line = (1 - ts) * values[0] + ts * values[-1]
    gap = line - values if higher_is_better else values - line
    return float(np.max(gap))


def _task_vectors(base: PyTree, models: Sequence[PyTree]) -> list[jax.Array]:
    spec, base_leaves, leaves = flatten_models(models, base)
    floats = spec.float_indices()
    return [jnp.concatenate([(m[i].astype(jnp.float32) - base_leaves[i].astype(jnp.float32)).ravel() for i in floats])
            for m in leaves]


def task_vector_similarity(base: PyTree, models: Sequence[PyTree]) -> np.ndarray:
    """Pairwise cosine similarity of the task vectors ``models[i] - base`` (all float leaves
    flattened into one vector each): an ``(N, N)`` matrix."""
    vectors = _task_vectors(base, models)
    norms = [jnp.linalg.norm(v) for v in vectors]
    n = len(vectors)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            denominator = norms[i] * norms[j]
            cosine = jnp.where(denominator > 0, jnp.dot(vectors[i], vectors[j]) / denominator, 0.0)
            out[i, j] = out[j, i] = float(cosine)
    return out


def sign_conflict_rate(base: PyTree, models: Sequence[PyTree]) -> np.ndarray:
    """Pairwise fraction of parameters where two task vectors have opposite signs, among
    those where both are non-zero (the interference TIES elects signs against): ``(N, N)``."""
    signs = [jnp.sign(v) for v in _task_vectors(base, models)]
    n = len(signs)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            both = jnp.sum((signs[i] != 0) & (signs[j] != 0))
            opposite = jnp.sum(signs[i] * signs[j] < 0)
            out[i, j] = out[j, i] = float(opposite / jnp.maximum(both, 1))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_interpolation(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *,
                       ylabel: str = "loss", title: str | None = None) -> None:
    """Save a PNG of interpolation curves, e.g. ``{'naive': (ts, losses), 'aligned': ...}``."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, (ts, values) in curves.items():
        axes.plot(ts, values, marker="o", markersize=3, label=label)
    axes.set_xlabel("t  (model A -> model B)")
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_similarity(matrix, labels: Sequence[str], path, *, title: str = "task-vector cosine similarity") -> None:
    """Save a PNG heat map of a similarity (or sign-conflict) matrix with its values."""
    matrix = np.asarray(matrix)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(1.2 + 0.8 * len(labels), 1 + 0.7 * len(labels)), dpi=120)
    image = axes.imshow(matrix, cmap="viridis")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    for (i, j), value in np.ndenumerate(matrix):
        axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
