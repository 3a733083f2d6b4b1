"""Spherical interpolation of models, leaf by leaf: SLERP of two, NuSLERP, and Multi-SLERP of several."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import _hyper
from jaxmerge._hyper import Range
from jaxmerge._tree import PyTree, TreeSpec, acc_dtype, compute_dtype, exact_jit, norm, scaled, total
from jaxmerge.errors import JaxmergeError
from jaxmerge.merging.method import WEIGHTS, Param, merge_method


def _unit(x: jax.Array, epsilon: float) -> jax.Array:
    size = jnp.linalg.norm(x)
    return jnp.where(size > epsilon, x / jnp.where(size > epsilon, size, 1), x)


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
    Param("epsilon", "option", "norms at or below this are not normalised", kind=float, check=Range(0), config=None),
    Param("dot_threshold", "option", "|cos| above which lerp is used", kind=float, check=Range(0, 1), config=None)))
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


@exact_jit(("row_wise", "flatten"))
def nuslerp_kernel(base: jax.Array | None, a: jax.Array, b: jax.Array, t: jax.Array, u: jax.Array, *, row_wise: bool,
                   flatten: bool, exact: bool = False) -> jax.Array:
    """mergekit's NuSLERP of two leaves (of their task vectors when there is a base), at ``t``
    (``u = 1 - t``, as the plan computed it).

    The vectors interpolated are the whole leaves (``flatten``), or the slices along the
    first axis (``row_wise``) or along the last one; each is normalised (norms clamped below
    at 1e-7) for the angle, and where ``1 - cos^2 <= 1e-16`` lerp is used. Computed in
    float32, or ``exact``ly as mergekit does in the inputs' dtype.
    """
    dtype = compute_dtype(a.dtype, exact)
    acc = acc_dtype(dtype)
    v0, v1 = a.astype(dtype), b.astype(dtype)
    if base is not None:
        v0, v1 = v0 - base.astype(dtype), v1 - base.astype(dtype)
    axes = tuple(range(v0.ndim)) if flatten or v0.ndim == 0 else (0,) if row_wise else (v0.ndim - 1,)

    def unit(x):
        return x / jnp.maximum(norm(x, axes, keepdims=True), 1e-7)

    cos = jnp.clip(jnp.sum((unit(v0) * unit(v1)).astype(acc), axis=axes, keepdims=True).astype(dtype), -1, 1)
    colinear = (1 - jnp.square(cos)) <= 1e-16
    theta = jnp.arccos(jnp.where(colinear, 0, cos))
    sin_theta = jnp.where(colinear, 1, jnp.sin(theta))
    spherical = (jnp.sin(scaled(theta, u)) * v0 + jnp.sin(scaled(theta, t)) * v1) / sin_theta
    result = jnp.where(colinear, scaled(v0, u) + scaled(v1, t), spherical)
    return (result if base is None else result + base.astype(dtype)).astype((a if base is None else base).dtype)


def _relative_weight(w):
    """``t = w_1 / (w_0 + w_1)``, or 0.5 where the weights sum to about 0 (as mergekit, in float64
    for concrete weights)."""
    total = w[0] + w[1]
    if isinstance(w, np.ndarray):
        return 0.5 if abs(total) < 1e-6 else float(w[1] / total)
    small = jnp.abs(total) < 1e-6
    return jnp.where(small, 0.5, w[1] / jnp.where(small, 1, total))


def _nuslerp_plan(spec: TreeSpec, hp: dict):
    row_wise, flatten, exact = hp["nuslerp_row_wise"], hp["nuslerp_flatten"], hp["exact"]
    ts = [None if w is None else _relative_weight(w) for w in hp["weights"]]

    def leaf_fn(i, base, leaves):
        t, u = _hyper.scalar_arg(ts[i]), _hyper.scalar_arg(1 - ts[i])
        return nuslerp_kernel(base, *leaves, t, u, row_wise=row_wise, flatten=flatten, exact=exact)
    return leaf_fn


@merge_method("nuslerp", base="optional", min_models=2, max_models=2, plan=_nuslerp_plan, params=(
    WEIGHTS,
    Param("nuslerp_row_wise", "option", "interpolate each slice along the first axis (else along the last)",
          kind=bool),
    Param("nuslerp_flatten", "option", "interpolate the whole flattened leaf", kind=bool)))
def nuslerp(base: PyTree | None, models: Sequence[PyTree], weights=None, *, nuslerp_row_wise: bool = False,
            nuslerp_flatten: bool = True) -> PyTree:
    """NuSLERP, mergekit's ``nuslerp``: SLERP of two models (or task vectors) by relative weight.

    Interpolates ``models[0]`` and ``models[1]`` on the sphere at ``t = w_1 / (w_0 + w_1)``
    (0.5 where the weights sum to about 0), per leaf: the whole flattened leaf
    (``nuslerp_flatten``, the default), or each slice along the first axis
    (``nuslerp_row_wise``) or along the last one. With a base, the task vectors
    ``theta_i - base`` are interpolated and added to it. Nearly colinear vectors are
    interpolated linearly. Computed in float32.

    Args:
      base: an optional base model; the output has its structure and dtypes when given,
        else ``models[0]``'s.
      models: exactly two models.
      weights: one per-leaf weight per model (``None``: equal, ``t = 0.5``).
      nuslerp_row_wise: interpolate slices along the first axis (when not flattening).
      nuslerp_flatten: interpolate each leaf as one flat vector.

    Returns:
      A pytree shaped like the base (or ``models[0]``).

    Raises:
      JaxmergeError: not exactly two models, a structure or shape mismatch, or a
        non-finite weight.

    References:
      mergekit's ``nuslerp`` method (arcee-ai/mergekit); SLERP: Shoemake, "Animating
      rotation with quaternion curves", SIGGRAPH 1985.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"w": jnp.asarray([1.0, 0.0])}, {"w": jnp.asarray([0.0, 1.0])}
      >>> [round(x, 4) for x in jaxmerge.nuslerp(None, [a, b], [1.0, 1.0])["w"].tolist()]
      [0.7071, 0.7071]
    """


@exact_jit(("normalize",))
def multislerp_kernel(base: jax.Array | None, leaves: Sequence[jax.Array], weights: jax.Array,
                      epsilon: jax.Array, *, normalize: bool, exact: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(result, degenerate)``: mergekit's barycentric SLERP of the leaves (or task vectors).

    Each leaf, as one flat vector, is split into norm and direction; the directions are
    averaged with ``weights`` (divided by their sum when ``normalize``), projected to the
    tangent space at their normalised mean, mapped back to the sphere and scaled by the
    weighted mean norm. ``degenerate`` is True where the weighted mean direction has norm
    below ``epsilon`` (then two leaves are blended linearly, and more have no answer: NaN).
    Computed in float32, or ``exact``ly as mergekit does in the inputs' dtype.
    """
    dtype = compute_dtype(leaves[0].dtype, exact)
    acc = acc_dtype(dtype)
    xs = [leaf.astype(dtype) for leaf in leaves]
    if base is not None:
        xs = [x - base.astype(dtype) for x in xs]
    w = weights.astype(dtype)
    if normalize:
        w = w / total(list(w), dtype)
    eps = epsilon.astype(dtype)

    norms = [norm(x) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = total([w[i] * u for i, u in enumerate(units)], dtype)
    mean_norm = norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1, mean_norm)
    dots = [jnp.sum((u * mean).astype(acc)).astype(dtype) for u in units]
    tangent = total([w[i] * (u - dots[i] * mean) for i, u in enumerate(units)], dtype)
    size = norm(tangent) + eps
    result = mean * jnp.cos(size) + tangent * (jnp.sin(size) / size)
    result = result * total([norms[i] * w[i] for i in range(len(xs))], dtype)
    fallback = xs[0] * w[0] + xs[1] * w[1] if len(xs) == 2 else jnp.full_like(result, jnp.nan)
    result = jnp.where(degenerate, fallback, result)
    if base is not None:
        result = result + base.astype(dtype)
    return result.astype((leaves[0] if base is None else base).dtype), degenerate


def _multislerp_plan(spec: TreeSpec, hp: dict):
    weights, eps, normalize = hp["weights"], _hyper.scalar_arg(hp["eps"]), hp["normalize_weights"]
    if normalize:
        _hyper.check_nonzero_sums(weights, "weights", spec)

    def leaf_fn(i, base, leaves):
        if len(leaves) == 1:
            return leaves[0].astype((leaves[0] if base is None else base).dtype)
        result, degenerate = multislerp_kernel(base, leaves, weights[i], eps, normalize=normalize, exact=hp["exact"])
        if not isinstance(degenerate, jax.core.Tracer) and bool(degenerate) and len(leaves) > 2:
            raise JaxmergeError(f"multislerp: the weighted mean direction at {spec.paths[i]!r} is zero (opposite "
                                "vectors whose weights cancel); change the weights")
        return result
    return leaf_fn


@merge_method("multislerp", base="optional", plan=_multislerp_plan, params=(
    WEIGHTS,
    Param("normalize_weights", "option", "divide the weights by their sum", kind=bool),
    Param("eps", "option", "stabilising constant of the norms", kind=float, check=Range(0))))
def multislerp(base: PyTree | None, models: Sequence[PyTree], weights=None, *, normalize_weights: bool = True,
               eps: float = 1e-8) -> PyTree:
    """Multi-SLERP, mergekit's ``multislerp``: a weighted mean of several models on the sphere.

    Per leaf (flattened): each model (or task vector, with a base) is split into norm and
    direction; the weighted mean direction is normalised, the directions are projected to
    its tangent space, their weighted mean is mapped back to the sphere by the exponential
    map, and the result is scaled by the weighted mean norm. One model is returned as it
    is; two whose weighted directions cancel are blended linearly. Computed in float32.

    Args:
      base: an optional base model (then task vectors are interpolated and added to it);
        the output has its structure and dtypes when given, else ``models[0]``'s.
      models: one or more models.
      weights: one per-leaf weight per model (``None``: equal).
      normalize_weights: divide the weights by their sum.
      eps: added to the norms (and the step size) for stability.

    Returns:
      A pytree shaped like the base (or ``models[0]``).

    Raises:
      JaxmergeError: a structure or shape mismatch, weights summing to 0 with
        ``normalize_weights``, or (eagerly) three or more models whose weighted directions
        cancel at a leaf.

    References:
      mergekit's ``multislerp`` method (arcee-ai/mergekit; "Multi-SLERP", C. Goddard).

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> a, b = {"w": jnp.asarray([2.0, 0.0])}, {"w": jnp.asarray([0.0, 2.0])}
      >>> [round(x, 4) for x in jaxmerge.multislerp(None, [a, b])["w"].tolist()]
      [1.4142, 1.4142]
    """
