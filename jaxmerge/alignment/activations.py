"""Activation matching (Git Re-Basin): permutations of hidden units from the correlation of
the two models' activations on the same data.

The activations of permutation ``p``'s units are the inputs of a kernel whose contracted
(input) axis the spec names ``p``: they are captured by tracing the forward pass, as
:func:`jaxmerge.input_grams` does, so the model needs no changes. Each permutation is then
solved on its own, as the linear assignment that maximises the summed correlation of matched
units, ``corr(z_ref[:, i], z_model[:, pi(i)])``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np

from jaxmerge._tree import PyTree, flatten_models, flatten_with_keys, state_key
from jaxmerge.alignment._moments import Moments
from jaxmerge.alignment.spec import PermutationSpec, units
from jaxmerge.errors import JaxmergeError


class _Correlation:
    """Running sums for the correlation of two sets of units."""

    def __init__(self):
        self.a, self.b, self.ab = Moments(), Moments(), 0.0

    def add(self, za: np.ndarray, zb: np.ndarray) -> None:
        self.a.add(za)
        self.b.add(zb)
        self.ab = self.ab + za.T @ zb

    def squared_distance(self) -> np.ndarray:
        """``[i, j]``: the mean squared difference of unit ``i`` of ``a`` and unit ``j`` of ``b``."""
        return (self.a.second[:, None] + self.b.second[None, :] - 2 * self.ab) / self.a.rows

    def correlation(self) -> np.ndarray:
        covariance = self.ab / self.a.rows - np.outer(self.a.mean, self.b.mean)
        return covariance / (np.outer(self.a.std, self.b.std) + 1e-12)


def activation_matching(spec: PermutationSpec, apply_fn: Callable[[PyTree, object], object], reference: PyTree,
                        model: PyTree, data: Iterable) -> dict[str, np.ndarray]:
    """Permutations of ``model``'s units whose activations best correlate with ``reference``'s.

    Args:
      spec: which axes of which leaves each permutation acts on (e.g.
        :func:`~jaxmerge.mlp_permutation_spec`). Every permutation must name the input axis
        of some kernel that multiplies an activation (a ``dot_general`` with the kernel's
        contracted axes leading, as Flax's ``Dense`` and ``Linear`` are, or a convolution
        with a ``(spatial..., in, out)`` kernel, as Flax's ``Conv``, whose channels are
        counted at every position), which gives its units' activations.
      apply_fn: ``apply_fn(params, batch)``, the forward pass of both models.
      reference: the parameter tree to match (it is not changed).
      model: the parameter tree to permute, with ``reference``'s structure and shapes.
      data: batches, each run through both models.

    Returns:
      ``{name: index array}`` to pass to :func:`~jaxmerge.apply_permutation` (on ``model``).

    Raises:
      JaxmergeError: the trees differ, no batch, or a permutation whose activations were
        not captured (naming it).

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> def apply(p, x):
      ...     return jax.nn.relu(x @ p["l0"]["kernel"]) @ p["l1"]["kernel"]
      >>> reference = {"l0": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))},
      ...              "l1": {"kernel": jax.random.normal(jax.random.key(1), (3, 2))}}
      >>> spec = jaxmerge.mlp_permutation_spec(reference)
      >>> model = jaxmerge.apply_permutation(spec, {"hidden_0": [2, 0, 1]}, reference)
      >>> batches = [jax.random.normal(jax.random.key(2), (64, 4))]
      >>> activation_matching(spec, apply, reference, model, batches)["hidden_0"].tolist()
      [1, 2, 0]
    """
    import scipy.optimize  # imported here: it takes a while

    flatten_models([reference, model], names=["reference", "model"])
    moments = unit_correlations(spec, apply_fn, reference, model, data)
    return {name: scipy.optimize.linear_sum_assignment(m.correlation(), maximize=True)[1]
            for name, m in moments.items()}


def unit_correlations(spec: PermutationSpec, apply_fn: Callable, reference: PyTree, model: PyTree,
                      data: Iterable) -> dict[str, _Correlation]:
    """Per permutation, the running sums of ``reference``'s and ``model``'s activations of its
    units (``a`` and ``b``) and of their products, on the same batches. The two models may
    differ in their number of units."""
    from jaxmerge.statistics.gram import kernel_inputs

    sizes = [spec.bind(params).sizes for params in (reference, model)]
    keys = flatten_with_keys(reference)[0]
    sources: dict[str, list[int]] = {}  # permutation -> kernels whose input axis may carry it
    for index, key in enumerate(keys):
        axes = spec.axes.get(state_key(key))
        if axes and len(axes) >= 2:  # a kernel (biases and norms have one axis): dense (in, ...), conv (..., in, out)
            candidates = (units(axes[0])[0], units(axes[-2])[0])
            for name in dict.fromkeys(n for n in candidates if n is not None):
                sources.setdefault(name, []).append(index)
    moments = {name: _Correlation() for name in spec.names}
    batches = 0
    for batch in data:
        inputs = [jax.device_get(kernel_inputs(params, batch, apply_fn=apply_fn)) for params in (reference, model)]
        for name, indices in sources.items():
            seen = [i for i in indices if all(i in z and z[i].shape[1] == s[name] for z, s in zip(inputs, sizes))]
            if seen:  # the first kernel whose input has the units
                moments[name].add(np.asarray(inputs[0][seen[0]], np.float64), np.asarray(inputs[1][seen[0]], np.float64))
        batches += 1
    if not batches:
        raise JaxmergeError("matching activations needs at least one batch")
    for name, m in moments.items():
        if m.a.rows == 0:
            raise JaxmergeError(f"no activations of the units of permutation {name!r} were captured: no kernel "
                                "multiplying an activation has its input axis named so in the spec")
    return moments
