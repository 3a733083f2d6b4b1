"""Merge analysis: interpolation curves and barriers, task-vector similarity, and plots.

The plots need matplotlib (``pip install jaxmerge[examples]``); nothing else does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge._scores import as_score
from jaxmerge._tree import PyTree, flatten_models, flatten_with_keys, path_str, state_key
from jaxmerge.errors import JaxmergeError
from jaxmerge.merging.linear import lerp


def interpolation_curve(a: PyTree, b: PyTree, evaluate: Callable, *, num: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate the models on the straight line between two models.

    For ``num`` evenly spaced ``t`` in ``[0, 1]``, scores the interpolated model
    ``theta(t) = (1 - t) a + t b`` (:func:`jaxmerge.lerp`, leaf by leaf, with ``a``'s
    dtypes): ``values[k] = evaluate(theta(ts[k]))``. A curve with no bump between its ends
    (for a loss; no dip, for an accuracy) means the two models are linearly mode
    connected; :func:`barrier` measures the bump, and :func:`plot_interpolation` draws it.

    Args:
      a: the model at ``t = 0``.
      b: the model at ``t = 1``, with ``a``'s structure and shapes.
      evaluate: ``params -> scalar`` (a loss or an accuracy; a jitted function is fine).
      num: the number of points, an int of at least 2.

    Returns:
      ``(ts, values)``, two float arrays of length ``num`` (``ts[0] = 0``, ``ts[-1] = 1``).

    Raises:
      JaxmergeError: ``num`` is not an int of at least 2, ``a`` and ``b`` differ in
        structure or shapes, or ``evaluate`` returns a non-scalar or non-finite value.

    References:
      Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
      arXiv 1912.05671.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"w": jnp.asarray([-1.0, 2.0])}, {"w": jnp.asarray([1.0, 2.0])}
      >>> ts, values = jaxmerge.interpolation_curve(a, b, lambda p: jnp.sum(p["w"] ** 2), num=3)
      >>> ts.tolist(), values.tolist()
      ([0.0, 0.5, 1.0], [5.0, 4.0, 5.0])
    """
    if not isinstance(num, int) or num < 2:
        raise JaxmergeError(f"num must be an int >= 2, got {num!r}")
    ts = np.linspace(0.0, 1.0, num)
    values = []
    for t in ts:
        values.append(as_score(evaluate(lerp(a, b, float(t))), f"t={t:g}"))
    return ts, np.asarray(values)


def barrier(ts: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False) -> float:
    """The barrier of an interpolation curve: how far it rises above the line between its ends.

    For a loss, ``max_t [L(t) - ((1 - t) L(0) + t L(1))]`` over the given points, with
    ``L(0) = values[0]`` and ``L(1) = values[-1]``: how far the curve rises above the
    straight line between its ends (0 for a convex or linear curve, since the ends
    themselves give 0). With ``higher_is_better`` (an accuracy),
    ``max_t [((1 - t) A(0) + t A(1)) - A(t)]``: how far it dips below instead. A barrier
    near 0 means the two models are linearly mode connected.

    Args:
      ts: the interpolation positions, from 0 to 1 (as :func:`interpolation_curve`
        returns them).
      values: the loss (or accuracy) at each of ``ts``.
      higher_is_better: whether ``values`` are scores to maximise (an accuracy) rather
        than a loss.

    Returns:
      The barrier, a Python float (at least 0 when ``ts`` starts at 0 and ends at 1).

    References:
      Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
      arXiv 1912.05671.

    Examples:
      >>> import jaxmerge
      >>> jaxmerge.barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0])  # 3 - (1 + 2) / 2
      1.5
      >>> jaxmerge.barrier([0.0, 0.5, 1.0], [1.0, 0.25, 0.5], higher_is_better=True)  # (1 + 0.5) / 2 - 0.25
      0.5
    """
    ts, values = np.asarray(ts, np.float64), np.asarray(values, np.float64)
    line = (1 - ts) * values[0] + ts * values[-1]
    gap = line - values if higher_is_better else values - line
    return float(np.max(gap))


def layerwise_barriers(a: PyTree, b: PyTree, evaluate: Callable, *, num: int = 11,
                       higher_is_better: bool = False, cumulative: bool = False) -> dict[str, float]:
    """Layer-wise linear mode connectivity: the barrier of interpolating one layer at a time.

    For each layer (the leaves that share a parent path, e.g. a dense layer's ``kernel`` and
    ``bias``), the curve from ``a`` to ``a`` with only that layer's leaves taken from ``b``
    (:func:`interpolation_curve`), and its :func:`barrier`. Layers whose own interpolation
    leaves no barrier are linearly connected on their own even when the whole models are
    not. With ``cumulative``, layer ``l``'s curve moves it and every layer before it (in
    the leaves' order), which shows where the whole models' barrier builds up.

    Args:
      a: the model at ``t = 0`` (and everywhere outside the layer being moved).
      b: the model whose layers are moved towards, with ``a``'s structure and shapes.
      evaluate: ``params -> scalar`` (a loss, or with ``higher_is_better`` an accuracy).
      num: points on each curve.
      higher_is_better: whether ``evaluate`` is a score to maximise.
      cumulative: move each layer together with all the layers before it.

    Returns:
      ``{layer path: barrier}``, in the order of the leaves.

    Raises:
      JaxmergeError: ``a`` and ``b`` differ, or what :func:`interpolation_curve` raises.

    References:
      Adilova et al., "Layer-wise Linear Mode Connectivity", arXiv 2307.06966.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a = {"l0": {"w": jnp.asarray(-1.0)}, "l1": {"w": jnp.asarray(2.0)}}
      >>> b = {"l0": {"w": jnp.asarray(1.0)}, "l1": {"w": jnp.asarray(3.0)}}
      >>> loss = lambda p: p["l1"]["w"] - p["l0"]["w"] ** 2  # linear in l1, a bump along l0's path
      >>> jaxmerge.layerwise_barriers(a, b, loss, num=3)
      {'l0': 1.0, 'l1': 0.0}
      >>> jaxmerge.layerwise_barriers(a, b, loss, num=3, cumulative=True)  # l1 moves with l0
      {'l0': 1.0, 'l1': 1.0}
    """
    flatten_models([a, b], names=["a", "b"])
    keys, leaves_a, treedef = flatten_with_keys(a)
    leaves_b = jax.tree.leaves(b)
    layers: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        layers.setdefault(path_str(state_key(key)[:-1]), []).append(i)
    out, before = {}, []
    for layer, indices in layers.items():
        before = [*before, *indices] if cumulative else indices
        moved = jax.tree.unflatten(treedef, [leaves_b[i] if i in before else x for i, x in enumerate(leaves_a)])
        out[layer] = barrier(*interpolation_curve(a, moved, evaluate, num=num), higher_is_better=higher_is_better)
    return out


def _task_vectors(base: PyTree, models: Sequence[PyTree]) -> list[jax.Array]:
    spec, base_leaves, leaves = flatten_models(models, base)
    floats = spec.float_indices()
    return [jnp.concatenate([(m[i].astype(jnp.float32) - base_leaves[i].astype(jnp.float32)).ravel() for i in floats])
            for m in leaves]


def task_vector_similarity(base: PyTree, models: Sequence[PyTree]) -> np.ndarray:
    """Pairwise cosine similarity of the models' task vectors.

    Each model's task vector ``tau_i = models[i] - base`` is its float leaves, minus
    ``base``'s, flattened into one float32 vector (integer and other non-float leaves are
    left out). Entry ``(i, j)`` is ``<tau_i, tau_j> / (|tau_i| |tau_j|)``, or 0 when
    either vector is all zeros; the diagonal is 1. Task vectors with similarity near 0
    interfere little when added up (task arithmetic, TIES).

    Args:
      base: the model the others were fine-tuned from.
      models: a list of ``N`` fine-tuned models, each with ``base``'s structure and shapes.

    Returns:
      An ``(N, N)`` symmetric NumPy float64 matrix.

    Raises:
      TypeError: ``models`` is not a list or tuple.
      JaxmergeError: no models, or a model whose leaves, shapes or dtype kinds differ
        from ``base``'s.

    References:
      Ilharco et al., "Editing models with task arithmetic", arXiv 2212.04089.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(2)}
      >>> models = [{"w": jnp.asarray([1.0, 0.0])}, {"w": jnp.asarray([0.0, 2.0])}, {"w": jnp.asarray([-3.0, 0.0])}]
      >>> jaxmerge.task_vector_similarity(base, models).tolist()
      [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]]
    """
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
    """Pairwise rate of sign conflicts between the models' task vectors.

    With task vectors ``tau_i = models[i] - base`` (float leaves only, flattened), entry
    ``(i, j)`` is ``#{k : tau_i[k] tau_j[k] < 0} / max(1, #{k : tau_i[k] != 0 and tau_j[k] != 0})``:
    the fraction of parameters where the two have opposite signs, among those where both
    are non-zero (the interference TIES elects signs against). The diagonal is 0.

    Args:
      base: the model the others were fine-tuned from.
      models: a list of ``N`` fine-tuned models, each with ``base``'s structure and shapes.

    Returns:
      An ``(N, N)`` symmetric NumPy float64 matrix of rates in ``[0, 1]``.

    Raises:
      TypeError: ``models`` is not a list or tuple.
      JaxmergeError: no models, or a model whose leaves, shapes or dtype kinds differ
        from ``base``'s.

    References:
      Yadav et al., "TIES-Merging: Resolving interference when merging models",
      arXiv 2306.01708.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(5)}
      >>> models = [{"w": jnp.asarray([1.0, -1.0, 2.0, 3.0, 0.0])}, {"w": jnp.asarray([-1.0, -1.0, 3.0, 1.0, 5.0])}]
      >>> jaxmerge.sign_conflict_rate(base, models).tolist()  # both non-zero in 4 places, opposite in 1
      [[0.0, 0.25], [0.25, 0.0]]
    """
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


def _save_with_legend(plt, figure, axes, path, ylabel: str, title: str | None) -> None:
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_interpolation(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *,
                       ylabel: str = "loss", title: str | None = None) -> None:
    """Save a plot of interpolation curves, e.g. ``{'naive': (ts, losses), 'aligned': ...}``.

    Draws each curve (as :func:`interpolation_curve` returns it) against ``t``, with point
    markers and a legend of the labels, and saves the figure (5 x 3.5 inches, 120 dpi).
    Sets matplotlib's backend to the non-interactive ``Agg``.

    Args:
      curves: ``{label: (ts, values)}``, one curve per entry.
      path: where to save the figure: a file name or file object, as matplotlib's
        ``savefig`` takes (PNG unless the name's extension says otherwise).
      ylabel: the y-axis label.
      title: the figure's title; none when ``None`` or empty.

    Returns:
      None.

    Raises:
      ImportError: matplotlib is not installed (``pip install jaxmerge[examples]``).

    References:
      Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
      arXiv 1912.05671.

    Examples:
      >>> import os, tempfile, jaxmerge
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "curves.png")
      ...     jaxmerge.plot_interpolation({"naive": ([0.0, 0.5, 1.0], [0.1, 0.9, 0.2])}, path)
      ...     os.path.getsize(path) > 0
      True
    """
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, (ts, values) in curves.items():
        axes.plot(ts, values, marker="o", markersize=3, label=label)
    axes.set_xlabel("t  (model A -> model B)")
    _save_with_legend(plt, figure, axes, path, ylabel, title)


def plot_similarity(matrix, labels: Sequence[str], path, *, title: str = "task-vector cosine similarity") -> None:
    """Save a heat map of a similarity (or sign-conflict) matrix, with its values written in.

    Draws ``matrix`` as an image (viridis colours, with a colour bar), each cell labelled
    with its value to two decimals and the rows and columns with ``labels``, and saves it
    (size growing with the number of labels, 120 dpi). Sets matplotlib's backend to the
    non-interactive ``Agg``.

    Args:
      matrix: an ``(N, N)`` array, e.g. from :func:`task_vector_similarity` or
        :func:`sign_conflict_rate`.
      labels: ``N`` names, one per row (and column).
      path: where to save the figure: a file name or file object, as matplotlib's
        ``savefig`` takes (PNG unless the name's extension says otherwise).
      title: the figure's title.

    Returns:
      None.

    Raises:
      ImportError: matplotlib is not installed (``pip install jaxmerge[examples]``).

    References:
      Ilharco et al., "Editing models with task arithmetic", arXiv 2212.04089.

    Examples:
      >>> import os, tempfile, jaxmerge
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "similarity.png")
      ...     jaxmerge.plot_similarity([[1.0, 0.2], [0.2, 1.0]], ["task A", "task B"], path)
      ...     os.path.getsize(path) > 0
      True
    """
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


def plot_layer_barriers(barriers: Mapping[str, Mapping[str, float]], path, *, ylabel: str = "loss barrier",
                        title: str | None = None) -> None:
    """Save a bar chart of layer-wise barriers, e.g. ``{'naive': layerwise_barriers(a, b, f), ...}``.

    One group of bars per layer, one bar per label (the layers of the first entry, in its
    order), saved like :func:`plot_interpolation`.

    Args:
      barriers: ``{label: {layer: barrier}}``, as :func:`layerwise_barriers` returns.
      path: where to save the figure (a file name or file object).
      ylabel: the y-axis label.
      title: the figure's title; none when ``None`` or empty.

    Returns:
      None.

    Raises:
      ImportError: matplotlib is not installed (``pip install jaxmerge[examples]``).

    References:
      Adilova et al., "Layer-wise Linear Mode Connectivity", arXiv 2307.06966.

    Examples:
      >>> import os, tempfile, jaxmerge
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "layers.png")
      ...     jaxmerge.plot_layer_barriers({"naive": {"l0": 0.4, "l1": 0.1}, "aligned": {"l0": 0.0, "l1": 0.02}}, path)
      ...     os.path.getsize(path) > 0
      True
    """
    plt = _pyplot()
    layers = list(next(iter(barriers.values())))
    width = 0.8 / len(barriers)
    figure, axes = plt.subplots(figsize=(1.5 + 0.9 * len(layers), 3.5), dpi=120)
    for k, (label, values) in enumerate(barriers.items()):
        axes.bar(np.arange(len(layers)) + k * width, [values.get(layer, np.nan) for layer in layers], width,
                 label=label)
    axes.set_xticks(np.arange(len(layers)) + width * (len(barriers) - 1) / 2, layers, rotation=30, ha="right")
    _save_with_legend(plt, figure, axes, path, ylabel, title)
