"""RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572): shared entries averaged, unique ones kept whole."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmerge import _hyper
from jaxmerge._hyper import Range
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, compute_dtype, exact_jit, total
from jaxmerge.merging.method import Param, merge_method


@exact_jit(("plus",))
def ram_kernel(base: jax.Array, leaves: Sequence[jax.Array], epsilon: jax.Array, r: jax.Array, alpha: jax.Array, *,
               plus: bool, exact: bool = False) -> jax.Array:
    """One leaf of RAM (``plus=False``) or of RAM+ with tensor-local statistics, as mergekit computes it.

    An entry of task vector ``d_i`` contributes when ``|d_i| > epsilon``. Entries that only
    one model changes are kept whole, those that several change are averaged over them.
    RAM+ scales model ``i``'s unique entries by ``1 + r clip(rho_i, 0, alpha)``, ``rho_i``
    the ratio of its shared to its unique entries in the leaf (unique counts floored at
    ``epsilon``). Computed in float32, or ``exact``ly as mergekit does in the base's dtype
    (RAM+'s boosted entries then in float32, as torch promotes them).
    """
    dtype = compute_dtype(base.dtype, exact)
    acc = acc_dtype(dtype)
    base_c = base.astype(dtype)
    deltas = [leaf.astype(dtype) - base_c for leaf in leaves]
    active = [jnp.abs(d) > epsilon.astype(dtype) for d in deltas]
    count = sum(a.astype(jnp.int32) for a in active)
    unique, shared = count == 1, count > 1
    parts = []
    for d, a in zip(deltas, active):
        kept = jnp.where(a, d, 0)
        averaged = jnp.where(shared, kept / jnp.maximum(count, 1).astype(dtype), 0)
        if plus:
            rho = jnp.sum(a & shared).astype(acc) / jnp.maximum(jnp.sum(a & unique).astype(acc), epsilon.astype(acc))
            boost = 1 + r.astype(acc) * jnp.clip(rho, 0, alpha.astype(acc))
            parts.append(jnp.where(unique, kept, 0).astype(acc) * boost + averaged.astype(acc))
        else:
            parts.append(jnp.where(unique, kept, 0) + averaged)
    merged = total(parts, parts[0].dtype)
    return (base_c.astype(merged.dtype) + merged).astype(base.dtype)


def _ram_plan(plus: bool):
    def plan(spec: TreeSpec, hp: dict):
        eps = hp["epsilon"]
        r, alpha = (hp["r"], hp["alpha"]) if plus else ([0.0] * len(eps), [0.0] * len(eps))

        def leaf_fn(i, base, leaves):
            return ram_kernel(base, leaves, *(_hyper.scalar_arg(v[i]) for v in (eps, r, alpha)), plus=plus,
                              exact=hp["exact"])
        return leaf_fn
    return plan


EPSILON = Param("epsilon", "leaf", "task-vector entries above this magnitude count as changed", check=Range(0))


@merge_method("ram", base="required", plan=_ram_plan(False), references=("2601.13572",), params=(EPSILON,))
def ram(base: PyTree, models: Sequence[PyTree], *, epsilon=1e-5) -> PyTree:
    """RAM, mergekit's ``ram``: average the entries several models change, keep the others whole.

    With task vectors ``d_i = theta_i - base``, an entry counts as changed by model ``i``
    when ``|d_i| > epsilon``. Entries changed by one model take its value whole; entries
    changed by several take the mean of their changes; the rest keep the base.

    Args:
      base: the model the agents started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      epsilon: per-leaf threshold above which an entry counts as changed.

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base, a structure or shape mismatch, or a negative ``epsilon``.

    References:
      "Reinforced Agent Merging", arXiv 2601.13572.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(3)}
      >>> tunes = [{"w": jnp.asarray([1.0, 2.0, 0.0])}, {"w": jnp.asarray([3.0, 0.0, 0.0])}]
      >>> jaxmerge.ram(base, tunes)["w"].tolist()  # shared: mean; unique: whole
      [2.0, 2.0, 0.0]
    """


@merge_method("ramplus_tl", base="required", plan=_ram_plan(True), references=("2601.13572",), params=(
    Param("r", "leaf", "how much a model's unique entries grow with its share of shared ones"),
    Param("alpha", "leaf", "the cap on that share", check=Range(0)), EPSILON))
def ramplus_tl(base: PyTree, models: Sequence[PyTree], *, r=0.1, alpha=0.2, epsilon=1e-5) -> PyTree:
    """RAM+ with tensor-local statistics, mergekit's ``ramplus_tl``: RAM that boosts unique entries.

    As :func:`ram`, but model ``i``'s unique entries are scaled by
    ``1 + r clip(rho_i, 0, alpha)`` with ``rho_i`` the ratio, within the leaf, of the
    entries it shares with other models to those only it changes: a model whose changes
    overlap much with others' weighs its own changes more, to make up for what averaging
    takes away from it.

    Args:
      base: the model the agents started from; the output has its structure and dtypes.
      models: the fine-tuned models.
      r: per-leaf strength of the boost.
      alpha: per-leaf cap on ``rho_i``.
      epsilon: per-leaf threshold above which an entry counts as changed (also the floor
        of the unique count in ``rho_i``).

    Returns:
      A pytree shaped like ``base``.

    Raises:
      JaxmergeError: no base, a structure or shape mismatch, or a negative ``alpha`` or
        ``epsilon``.

    References:
      "Reinforced Agent Merging", arXiv 2601.13572.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> base = {"w": jnp.zeros(3)}
      >>> tunes = [{"w": jnp.asarray([1.0, 2.0, 0.0])}, {"w": jnp.asarray([3.0, 0.0, 0.0])}]
      >>> [round(x, 4) for x in jaxmerge.ramplus_tl(base, tunes, r=0.5)["w"].tolist()]  # 2 * (1 + 0.5 * 0.2)
      [2.0, 2.2, 0.0]
    """
