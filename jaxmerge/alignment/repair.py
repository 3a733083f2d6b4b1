"""REPAIR: renormalise a merged network's units so that their pre-activation statistics are
those of the endpoints, interpolated (Jordan et al., arXiv 2211.08403).

Interpolating two aligned networks shrinks the variance of their hidden units (the "variance
collapse" that leaves a loss barrier). For each dense or convolutional layer, in order, REPAIR
measures the mean and standard deviation of every output unit's (channel's) pre-activation
``x @ W + b`` on data, in
each endpoint and in the merged network, and rescales the merged layer's columns and shifts
its bias so that the merged statistics become ``sum_i w_i mean_i`` and ``sum_i w_i std_i``:

    W'[:, u] = W[:, u] s_u,   b'[u] = (b[u] - mean_merged[u]) s_u + mean_target[u],
    s_u = std_target[u] / std_merged[u]

Later layers are measured after the earlier ones are repaired. The kernels are found by
tracing the forward pass (as :func:`jaxmerge.input_grams` does): ``x @ W`` products of a
kernel ``(in, out)``, or convolutions with a kernel ``(spatial..., in, out)``, with a ``bias`` of
the output size next to it (the last such layer, the output, is left as it is).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge._tree import PyTree, flatten_models, flatten_with_keys, state_key
from jaxmerge.alignment._moments import Moments
from jaxmerge.errors import JaxmergeError


def _statistics(apply_fn: Callable, params: PyTree, batches: list, kernels: list[int]) -> dict[int, tuple]:
    """Per kernel, the mean and standard deviation of each output unit's ``x @ W`` on the data."""
    from jaxmerge.statistics.gram import kernel_outputs

    moments = {k: Moments() for k in kernels}
    for batch in batches:
        outputs = jax.device_get(kernel_outputs(params, batch, apply_fn=apply_fn))
        for k in kernels:
            moments[k].add(outputs[k])
    return {k: (m.mean, m.std) for k, m in moments.items()}


def repair(apply_fn: Callable[[PyTree, object], object], merged: PyTree, endpoints: Sequence[PyTree],
           weights: Sequence[float], data: Iterable, *, eps: float = 1e-5) -> PyTree:
    """``merged`` with each dense or convolutional layer's units renormalised to the endpoints'
    statistics.

    Args:
      apply_fn: ``apply_fn(params, batch)``, the forward pass of all the networks.
      merged: the merged params (e.g. ``jaxmerge.lerp(a, aligned_b, t)``).
      endpoints: the models merged (aligned), with ``merged``'s structure.
      weights: each endpoint's weight in the target statistics (``[1 - t, t]`` for an
        interpolation at ``t``).
      data: the batches the statistics are measured on.
      eps: added to the merged standard deviation before dividing.

    Returns:
      The repaired params: ``merged`` with the kernels and biases of every dense or
      convolutional layer but the last (the output) rescaled and shifted (a convolution's
      channels measured over every example and position).

    Raises:
      JaxmergeError: the trees differ, weights of another length, no batch, or no dense or
        convolutional layer with a bias was found.

    References:
      Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair",
      arXiv 2211.08403.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> dense = lambda layer, x: x @ layer["kernel"] + layer["bias"][None]
      >>> apply = lambda p, x: dense(p["l1"], jax.nn.relu(dense(p["l0"], x)))
      >>> a = {"l0": {"kernel": jnp.asarray([[2.0, -1.0]]), "bias": jnp.asarray([1.0, 0.0])},
      ...      "l1": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros(1)}}
      >>> b = {"l0": {"kernel": jnp.asarray([[-2.0, 3.0]]), "bias": jnp.asarray([1.0, 2.0])},
      ...      "l1": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros(1)}}
      >>> x = [jnp.linspace(-1.0, 1.0, 64)[:, None]]
      >>> midpoint = jaxmerge.lerp(a, b, 0.5)  # unit 0's weight averages to 0: its variance collapses
      >>> repaired = repair(apply, midpoint, [a, b], [0.5, 0.5], x)
      >>> midpoint["l0"]["kernel"].tolist(), repaired["l0"]["kernel"].round(2).tolist()  # unit 1 kept
      ([[0.0, 1.0]], [[0.0, 2.0]])
    """
    flatten_models([*endpoints, merged], names=[*(f"endpoints[{i}]" for i in range(len(endpoints))), "merged"])
    if len(weights) != len(endpoints):
        raise JaxmergeError(f"weights has {len(weights)} entries, endpoints {len(endpoints)}")
    batches = list(data)
    if not batches:
        raise JaxmergeError("repair needs at least one batch")
    keys, _, treedef = flatten_with_keys(merged)
    keys = [state_key(key) for key in keys]
    position = {key: i for i, key in enumerate(keys)}
    from jaxmerge.statistics.gram import traced

    order = traced(apply_fn, merged, batches[0], lambda recorder: list(recorder.outputs), keep_activations=True)
    shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(merged)]
    biased = [(k, position.get(keys[k][:-1] + ("bias",))) for k in order if keys[k][-1] == "kernel"]
    layers = [(k, b) for k, b in biased if b is not None and shapes[b] == shapes[k][-1:]][:-1]  # outputs last
    if not layers:
        raise JaxmergeError("repair found no dense or convolutional layer with a bias before the last: nothing "
                            "to renormalise")
    kernels = [k for k, _ in layers]
    targets = [_statistics(apply_fn, e, batches, kernels) for e in endpoints]
    leaves = list(jax.tree.leaves(merged))
    endpoint_leaves = [jax.tree.leaves(e) for e in endpoints]
    for k, b in layers:
        mean_z, std_z = _statistics(apply_fn, jax.tree.unflatten(treedef, leaves), batches, [k])[k]
        mean_t = sum(w * (t[k][0] + np.asarray(e[b], np.float64)) for w, t, e in zip(weights, targets, endpoint_leaves))
        scale = sum(w * t[k][1] for w, t in zip(weights, targets)) / (std_z + eps)
        # (x W + b - mean) * scale + mean_t = x (W scale) + (mean_t - mean_z scale), the mean being mean_z + b
        columns = jnp.asarray(scale, jnp.float32).reshape((1,) * (leaves[k].ndim - 1) + (-1,))  # output units last
        leaves[k] = (leaves[k] * columns).astype(leaves[k].dtype)
        leaves[b] = jnp.asarray(mean_t - mean_z * scale, jnp.float32).astype(leaves[b].dtype)
    return jax.tree.unflatten(treedef, leaves)
