"""Spherical linear interpolation (SLERP) of two models, leaf by leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmerge import _hyper
from jaxmerge._hyper import Range
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype
from jaxmerge.merging.method import Param, merge_method


def _unit(x: jax.Array, epsilon: float) -> jax.Array:
    norm = jnp.linalg.norm(x)
    return jnp.where(norm > epsilon, x / jnp.where(norm > epsilon, norm, 1), x)


@jax.jit
def slerp_kernel(a: jax.Array, b: jax.Array, t: jax.Array, epsilon: jax.Array,
                 dot_threshold: jax.Array) -> jax.Array:
    """SLERP between two leaves seen as flat vectors, in float32; lerp when nearly colinear.

    ``theta = arccos(<a/|a|, b/|b|>)`` and the result is
    ``sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b``. A vector whose norm is
    at most ``epsilon`` is used unnormalised; when ``|cos theta| > dot_threshold`` the
    result is ``(1-t) a + t b``.
    """
    dtype = acc_dtype(a.dtype)
    a32, b32 = a.astype(dtype), b.astype(dtype)
    t, epsilon, dot_threshold = (v.astype(dtype) for v in (t, epsilon, dot_threshold))
    dot = jnp.sum(_unit(a32, epsilon) * _unit(b32, epsilon))
    colinear = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.clip(dot, -1, 1))
    sin_theta = jnp.where(colinear, 1, jnp.sin(theta))
    ca = jnp.where(colinear, 1 - t, jnp.sin(theta - t * theta) / sin_theta)
    cb = jnp.where(colinear, t, jnp.sin(t * theta) / sin_theta)
    return (ca * a32 + cb * b32).astype(a.dtype)


def _slerp_plan(spec: TreeSpec, hp: dict):
    ts, consts = hp["t"], _hyper.vector([hp["epsilon"], hp["dot_threshold"]])
    return lambda i, _, leaves: slerp_kernel(*leaves, _hyper.scalar_arg(ts[i]), *consts)


@merge_method("slerp", base="pair", plan=_slerp_plan, params=(
    Param("t", "leaf", "interpolation position: 0 gives the base (first) model, 1 the other"),
    Param("epsilon", "option", "norms at or below this are not normalised", kind=float, check=Range(0)),
    Param("dot_threshold", "option", "|cos| above which lerp is used", kind=float, check=Range(0, 1))))
def slerp(a: PyTree, b: PyTree, t, *, epsilon: float = 1e-8, dot_threshold: float = 0.9995) -> PyTree:
    """Spherical linear interpolation of two models, per leaf (mergekit's ``slerp``).

    Each leaf is treated as one flat vector (Shoemake 1985; the model-merging use follows
    mergekit): the two are interpolated along the great circle between their directions,
    ``sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b``, with lerp as the
    fallback where the directions are nearly parallel (``|cos theta| > dot_threshold``).
    Computed in float32 and cast back to ``a``'s dtypes.

    Args:
      a, b: pytrees of the same structure; ``t = 0`` gives ``a`` and ``t = 1`` gives ``b``.
        In a merge config, ``a`` is the ``base_model``.
      t: a finite per-leaf hyperparameter (mergekit configs commonly pass a layer gradient
        list, and filter lists such as ``[{'filter': 'self_attn', 'value': [0, 0.5, 1]},
        {'value': 0.5}]``).
      epsilon: norms at or below this are not normalised.
      dot_threshold: colinearity threshold for the lerp fallback, in [0, 1].

    Returns:
      A pytree shaped like ``a``, with its dtypes.

    Raises:
      JaxmergeError: a structure or shape mismatch, a non-finite ``t``, or an out-of-range
        ``epsilon`` or ``dot_threshold``.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"w": jnp.asarray([1.0, 0.0])}, {"w": jnp.asarray([0.0, 1.0])}
      >>> [round(x, 4) for x in jaxmerge.slerp(a, b, 0.5)["w"].tolist()]
      [0.7071, 0.7071]
    """
