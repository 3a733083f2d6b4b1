"""SCE merging (FuseChat, Wan et al., arXiv 2408.07990): Select, Calculate, Erase."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import _blocks, _hyper
from jaxmerge._hyper import Range
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, compute_dtype, exact_jit, total
from jaxmerge.merging import sparsify
from jaxmerge.merging.method import Param, merge_method
from jaxmerge.merging.task_vectors import INT8_MASK, elect_sign


@exact_jit()
def sce_kernel(base: jax.Array, leaves: Sequence[jax.Array], select_topk: jax.Array, *,
               exact: bool = False) -> jax.Array:
    """One leaf of SCE, as mergekit's ``sce`` computes it.

    1. Select: keep the ``int(select_topk * m)`` entries of largest variance across the
       task vectors, ``m`` the number of entries with non-zero variance (all when
       ``select_topk >= 1``);
    2. Calculate: model weights ``w_i`` proportional to the mean square of each selected
       task vector (uniform if their sum is below 1e-6);
    3. Erase: per entry, drop task vectors whose sign disagrees with the sign of their sum;
       merge as ``base + sum_i w_i d_i / max(sum_i w_i, 1e-6)`` over the remaining ones.

    Computed in float32, or ``exact``ly as mergekit does in the base's dtype (reductions
    accumulated in float32 and rounded).
    """
    dtype = compute_dtype(base.dtype, exact)
    acc = acc_dtype(dtype)
    arrays, zero = (base, *leaves), jnp.zeros((), dtype)
    spread = _Variance(np.dtype(dtype))
    variance = sparsify.Elementwise(arrays, spread)  # made where it is read
    nonzero = _blocks.sums(lambda c: [spread(*c) != 0], arrays, jnp.int32)[0]
    k = jnp.floor(select_topk.astype(jnp.float32) * nonzero.astype(jnp.float32))
    selected = sparsify.top_k_mask(variance, k.astype(jnp.int32)) | (select_topk >= 1)

    def selected_deltas(c):  # c: the base, the models and the selection, whole or a block of each
        return [jnp.where(c[-1], leaf.astype(dtype) - c[0].astype(dtype), zero) for leaf in c[1:-1]]
    squares = _blocks.sums(lambda c: [jnp.square(d) for d in selected_deltas(c)], [*arrays, selected], acc)
    energy = jnp.stack([(s / base.size).astype(dtype) for s in squares])  # mean squares
    deltas = selected_deltas([*arrays, selected])
    energy_sum = jnp.sum(energy.astype(acc)).astype(dtype).astype(acc)
    negligible = jnp.abs(energy_sum) < 1e-6
    weights = jnp.where(negligible, jnp.full_like(energy, 1 / len(deltas)),
                        (energy.astype(acc) / jnp.where(negligible, 1, energy_sum)).astype(dtype))
    sign = elect_sign(deltas, "sum")
    kept = [jnp.where(jnp.sign(d) == sign, weights[i], zero) for i, d in enumerate(deltas)]
    merged = total([k_ * d for k_, d in zip(kept, deltas)], dtype)
    divisor = jnp.maximum(total(kept, dtype), 1e-6)
    return (base.astype(dtype) + merged / divisor).astype(base.dtype)


@dataclasses.dataclass(frozen=True)
class _Variance:
    """The population variance of the task vectors ``leaf - base`` (in ``dtype``), taken in
    its accumulation dtype and rounded to ``dtype``."""

    dtype: Any

    def __call__(self, base: jax.Array, *leaves: jax.Array) -> jax.Array:
        acc = acc_dtype(self.dtype)
        wide = [(leaf.astype(self.dtype) - base.astype(self.dtype)).astype(acc) for leaf in leaves]
        mean = total(wide, acc) / len(wide)
        return (total([jnp.square(d - mean) for d in wide], acc) / len(wide)).astype(self.dtype)


def _sce_plan(spec: TreeSpec, hp: dict):
    topk = hp["select_topk"]
    return lambda i, base, leaves: sce_kernel(base, leaves, _hyper.scalar_arg(topk[i]), exact=hp["exact"])


@merge_method("sce", base="required", plan=_sce_plan, references=("2408.07990",), params=(
    Param("select_topk", "leaf", "fraction of the entries with non-zero variance kept",
          check=Range(0, 1, lo_open=True)),
    INT8_MASK))
def sce(base: PyTree, models: Sequence[PyTree], *, select_topk=1.0) -> PyTree:
    """SCE merge, mergekit's ``sce``: select high-variance entries, calculate weights, erase.

    Select the entries whose variance across the task vectors is largest, calculate
    per-model weights from each selected task vector's energy (mean square), and erase
    entries whose sign disagrees with the elected sign before the weighted mean.

    Args:
      base: the pivot model; the output has its structure and dtypes.
      models: the models to fuse.
      select_topk: per-leaf fraction in (0, 1] of the entries with non-zero variance
        across models to keep.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base, a structure or shape mismatch, or ``select_topk`` out of
        range.

    References:
      Wan et al., "FuseChat: knowledge fusion of chat models", arXiv 2408.07990.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(2)}
      >>> tunes = [{"w": jnp.asarray([1.0, 1.0])}, {"w": jnp.asarray([1.0, 1.0])}]
      >>> jaxmerge.sce(base, tunes)["w"].tolist()
      [1.0, 1.0]
    """
