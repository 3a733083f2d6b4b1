"""Passthrough: one model's tensors as they are, optionally scaled (mergekit's frankenmerges)."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxmerge._tree import PyTree, TreeSpec, acc_dtype
from jaxmerge.merging.method import Param, merge_method


@jax.jit
def scale_kernel(leaf: jax.Array, scale: jax.Array) -> jax.Array:
    """``leaf * scale`` computed in float32, cast back."""
    return (leaf.astype(acc_dtype(leaf.dtype)) * scale.astype(acc_dtype(leaf.dtype))).astype(leaf.dtype)


def _passthrough_plan(spec: TreeSpec, hp: dict):
    scales = hp["scale"]
    return lambda i, _, leaves: leaves[0] if scales[i][0] == 1 else scale_kernel(leaves[0], scales[i][0])


@merge_method("passthrough", base="none", max_models=1, plan=_passthrough_plan, params=(
    Param("scale", "model", "a factor to multiply the model's tensors by", default=1.0),))
def passthrough(models: Sequence[PyTree], *, scale=None) -> PyTree:
    """Passthrough, mergekit's ``passthrough``: one model's tensors, unchanged or scaled.

    With merge configs' ``slices`` it assembles layers of several models into one
    (frankenmerges: layers stacked, repeated or dropped); on its own it copies a model,
    multiplying the tensors a per-leaf ``scale`` names (e.g. ``[{'filter': 'o_proj',
    'value': 0.5}, {'value': 1.0}]``).

    Args:
      models: exactly one model, in a list.
      scale: a per-leaf factor (``None``: 1, the tensors as they are).

    Returns:
      A pytree shaped like ``models[0]``.

    Raises:
      JaxmergeError: more than one model, or a non-finite ``scale``.

    References:
      mergekit's ``passthrough`` method (arcee-ai/mergekit).

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> model = {"attn": jnp.asarray([1.0, 2.0]), "mlp": jnp.asarray([3.0])}
      >>> out = jaxmerge.passthrough([model], scale=[{"filter": "attn", "value": 0.5}])
      >>> out["attn"].tolist(), out["mlp"].tolist()
      ([0.5, 1.0], [3.0])
    """
