"""Power-function EMA and post-hoc EMA reconstruction (Karras et al., EDM2, arXiv 2312.02696).

A power-function EMA with exponent ``gamma`` averages the parameters with weights
proportional to ``tau ** gamma`` over the training time ``tau in [0, t]``; its relative
width is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 (gamma + 3)))``. Keeping one or
two such EMAs during training and saving snapshots of them lets any other ``sigma_rel`` be
reconstructed afterwards, as the least-squares combination of the snapshots whose profile
best matches the wanted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmerge._tree import PyTree
from jaxmerge.averaging._wrapper import (
    averaging_states,
    blend,
    check,
    check_dtype,
    plain,
    registers_average,
    shadow,
    wrap,
)
from jaxmerge.errors import JaxmergeError
from jaxmerge.merging.linear import average

MAX_SIGMA_REL = float(np.sqrt(1 / 12))  # sigma_rel of gamma = 0, the widest profile


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function EMA of relative width ``sigma_rel``
    (the largest real root of ``g^3 + 7 g^2 + (16 - s) g + (12 - s)``, ``s = sigma_rel^-2``)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise JaxmergeError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel!r}")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


@registers_average(lambda state: state.emas[0])
class PowerEmaState(NamedTuple):
    """State of :func:`power_ema`: ``count`` updates seen, the exponents ``gammas`` and one
    EMA per exponent in ``emas`` (a tuple), and ``snapshot_due``: whether this update's EMAs
    are due to be saved as a snapshot (see :func:`power_ema_snapshot`)."""
    count: jax.Array
    snapshot_due: jax.Array
    gammas: jax.Array
    emas: tuple
    inner_state: optax.OptState


class PowerEmaSnapshot(NamedTuple):
    """The power-function EMAs at one step, to save and later pass to :func:`post_hoc_ema`:
    the step (updates done), each EMA's exponent ``gamma``, and the EMAs."""
    step: int
    gammas: tuple
    emas: tuple


def power_ema(inner: optax.GradientTransformation, *, sigma_rels: Sequence[float] = (0.05, 0.10),
              snapshot_every: int = 4096, dtype=None) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` and keep power-function EMAs of the parameters (EDM2).

    Each relative width ``sigma_rel`` gives an exponent ``gamma``, the root of
    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 (gamma + 3)))``. At step
    ``t = update index + 1``, with ``theta_t = params + updates``, each EMA is updated as
    ``ema = beta ema + (1 - beta) theta_t`` with ``beta = (1 - 1 / t) ** (gamma + 1)``
    (so step 1 copies ``theta_1``), which weights the past in proportion to ``tau ** gamma``.

    After every ``snapshot_every``-th step the state's ``snapshot_due`` is True: save
    ``jaxmerge.power_ema_snapshot(opt_state)`` then (with Orbax, for instance), and
    reconstruct an EMA of any width afterwards with :func:`post_hoc_ema`.
    :func:`jaxmerge.averaged_params` returns the EMA of the first ``sigma_rel``; the updates
    of ``inner`` are returned unchanged. Memory: one copy of the parameters per EMA.

    Args:
      inner: the optimizer to run.
      sigma_rels: relative widths of the EMAs to keep, each in (0, 0.2887) (the upper end
        is ``sqrt(1 / 12)``, ``gamma = 0``); EDM2 keeps 0.05 and 0.10.
      snapshot_every: steps between snapshots (>= 1; EDM2: every 8 Mi images).
      dtype: dtype of the EMA copies of float parameters (None: each parameter's own
        dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

    Raises:
      TypeError: ``inner`` is not an ``optax.GradientTransformation``.
      JaxmergeError: ``sigma_rels`` is empty or holds a width outside (0, 0.2887),
        ``snapshot_every < 1``; from ``update``, when it is called without ``params``.

    References:
      Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
      arXiv 2312.02696, Sec. 3 and App. C.

    Examples:
      ``sigma_rel = sqrt(1 / 18)`` is ``gamma = 1``. SGD moves ``w`` from ``[0, 4]`` to
      ``[-1, 6]`` and ``[-2, 8]``; step 1 copies, step 2 has ``beta = (1 / 2) ** 2``, so the
      EMA is ``0.25 * [-1, 6] + 0.75 * [-2, 8] = [-1.75, 7.5]``:

      >>> import jax, jax.numpy as jnp, optax, jaxmerge
      >>> params = {"w": jnp.asarray([0.0, 4.0])}
      >>> grads = {"w": jnp.asarray([2.0, -4.0])}
      >>> tx = jaxmerge.power_ema(optax.sgd(0.5), sigma_rels=[(1 / 18) ** 0.5])
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(2):
      ...     updates, state = update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> [round(x, 4) for x in jaxmerge.averaged_params(state)["w"].tolist()]
      [-1.75, 7.5]
    """
    gammas = tuple(sigma_rel_to_gamma(s) for s in sigma_rels)
    if not gammas:
        raise JaxmergeError("sigma_rels is empty")
    check_dtype(dtype)
    check(snapshot_every, "snapshot_every", lambda v: v >= 1, "must be >= 1")

    def init_average(params, inner_state):
        return PowerEmaState(jnp.zeros([], jnp.int32), jnp.zeros([], bool), jnp.asarray(gammas, jnp.float32),
                             tuple(shadow(params, dtype) for _ in gammas), inner_state)

    def update_average(state, inner_state, new_params):
        step = (state.count + 1).astype(jnp.float32)
        emas = tuple(blend(e, new_params, (1 - 1 / step) ** (g + 1)) for e, g in zip(state.emas, gammas))
        due = (state.count + 1) % snapshot_every == 0
        return PowerEmaState(optax.safe_increment(state.count), due, state.gammas, emas, inner_state)

    return wrap("power_ema", inner, init_average, update_average)


def power_ema_snapshot(opt_state) -> PowerEmaSnapshot:
    """A snapshot of the power-function EMAs of the :func:`power_ema` in ``opt_state``.

    Reads the first (outermost) :func:`power_ema` state found in ``opt_state`` (through
    ``optax.chain`` and the other wrappers, as :func:`jaxmerge.averaged_params` does) and
    returns its step count, exponents and EMAs, ready to save, typically when the state's
    ``snapshot_due`` is True. Call it outside ``jax.jit``: the step and exponents become
    Python numbers. The EMAs are the state's own arrays, not copies: save them before a
    training step that donates the optimizer state.

    Args:
      opt_state: an optimizer state that holds a :func:`power_ema` state.

    Returns:
      A ``PowerEmaSnapshot`` NamedTuple: ``step`` (updates done, an int), ``gammas`` (a
      tuple of floats, one per EMA) and ``emas`` (a tuple of parameter pytrees), to pass
      to :func:`post_hoc_ema`.

    Raises:
      JaxmergeError: ``opt_state`` holds no :func:`power_ema` state.

    References:
      Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
      arXiv 2312.02696, Sec. 3.

    Examples:
      Two EMAs, ``gamma = 1`` (``sigma_rel = sqrt(1 / 18)``) and ``gamma = 2``
      (``sqrt(3 / 80)``). SGD moves ``w`` from ``[0, 4]`` to ``[-1, 6]`` and ``[-2, 8]``; at
      step 2 the ``gamma = 2`` EMA is ``(1 / 2) ** 3 * [-1, 6] + (7 / 8) * [-2, 8]``:

      >>> import jax, jax.numpy as jnp, optax, jaxmerge
      >>> params = {"w": jnp.asarray([0.0, 4.0])}
      >>> grads = {"w": jnp.asarray([2.0, -4.0])}
      >>> tx = jaxmerge.power_ema(optax.sgd(0.5), sigma_rels=[(1 / 18) ** 0.5, (3 / 80) ** 0.5], snapshot_every=2)
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(2):
      ...     updates, state = update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(state.snapshot_due)
      True
      >>> snapshot = jaxmerge.power_ema_snapshot(state)
      >>> snapshot.step, [round(g, 4) for g in snapshot.gammas]
      (2, [1.0, 2.0])
      >>> [round(x, 4) for x in snapshot.emas[1]["w"].tolist()]
      [-1.875, 7.75]
    """
    states = [s for s in averaging_states(opt_state) if isinstance(s, PowerEmaState)]
    if not states:
        raise JaxmergeError("opt_state holds no power_ema state")
    state = plain(states[0])
    return PowerEmaSnapshot(int(state.count), tuple(float(g) for g in state.gammas), tuple(state.emas))


def _p_dot_p(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """Inner product of two power-function EMA profiles ending at ``t_a`` and ``t_b``."""
    exponent = gamma_b if t_a < t_b else -gamma_a
    return ((gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent
            / ((gamma_a + gamma_b + 1) * max(t_a, t_b)))


def post_hoc_ema_weights(snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float], step: float,
                         gamma: float) -> np.ndarray:
    """Least-squares weights of snapshot profiles that best match the profile ``(step, gamma)``.

    Solves ``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>`` in float64,
    then normalises ``x`` to sum to 1 (as EDM2's reference code does).
    """
    n = len(snapshot_steps)
    gram = np.array([[_p_dot_p(snapshot_steps[i], snapshot_gammas[i], snapshot_steps[j], snapshot_gammas[j])
                      for j in range(n)] for i in range(n)])
    target = np.array([_p_dot_p(snapshot_steps[i], snapshot_gammas[i], step, gamma) for i in range(n)])
    weights = np.linalg.lstsq(gram, target, rcond=None)[0]
    return weights / weights.sum()


def post_hoc_ema(snapshots: Sequence[PowerEmaSnapshot], sigma_rel: float, *, step: int | None = None) -> PyTree:
    """Reconstruct the power-function EMA of width ``sigma_rel`` at ``step`` from snapshots.

    Each EMA in the snapshots has a weight profile over training time,
    proportional to ``tau ** gamma`` on ``[0, snapshot step]``; the target is the profile of
    ``gamma = gamma(sigma_rel)`` on ``[0, step]``. The weights ``x`` solve the least-squares
    system ``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>`` (in float64),
    normalised to sum to 1 as EDM2's reference code does, and the result is
    ``sum_i x_i ema_i``. A target that is one of the snapshots' own profiles is recovered
    exactly (up to rounding).

    Args:
      snapshots: :func:`power_ema_snapshot` results saved during training, or restored
        objects with the same ``step``, ``gammas`` and ``emas`` (every EMA of every snapshot
        with ``0 < snapshot step <= step`` takes part).
      sigma_rel: the wanted relative width, in (0, 0.2887).
      step: where the reconstructed EMA ends (default: the last snapshot's step).

    Returns:
      The parameters, ``sum_i x_i ema_i`` (computed by :func:`jaxmerge.average`), shaped
      like the first EMA taking part, with its dtypes.

    Raises:
      JaxmergeError: ``snapshots`` is empty, ``sigma_rel`` is outside (0, 0.2887), no
        snapshot has a step in ``(0, step]``, or snapshots whose parameter structure or
        shapes differ (naming ``snapshots[j].emas[k]`` and the leaf path).

    References:
      Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
      arXiv 2312.02696, Sec. 3 and App. C.

    Examples:
      A snapshot at step 2 of two EMAs, ``gamma = 1`` (``[-1.75, 7.5]``) and ``gamma = 2``
      (``[-1.875, 7.75]``), of the SGD iterates ``[-1, 6]`` and ``[-2, 8]``; asking for the
      width of the ``gamma = 2`` one gives the weights ``[0, 1]``, so that EMA back:

      >>> import jax, jax.numpy as jnp, optax, jaxmerge
      >>> params = {"w": jnp.asarray([0.0, 4.0])}
      >>> grads = {"w": jnp.asarray([2.0, -4.0])}
      >>> tx = jaxmerge.power_ema(optax.sgd(0.5), sigma_rels=[(1 / 18) ** 0.5, (3 / 80) ** 0.5], snapshot_every=2)
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(2):
      ...     updates, state = update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> snapshots = [jaxmerge.power_ema_snapshot(state)]
      >>> [round(x, 4) for x in jaxmerge.post_hoc_ema(snapshots, (3 / 80) ** 0.5)["w"].tolist()]
      [-1.875, 7.75]
    """
    if not snapshots:
        raise JaxmergeError("snapshots is empty")
    step = max(s.step for s in snapshots) if step is None else step
    gamma = sigma_rel_to_gamma(sigma_rel)
    used = [(f"snapshots[{j}].emas[{k}]", s.step, g, e) for j, s in enumerate(snapshots) if 0 < s.step <= step
            for k, (g, e) in enumerate(zip(s.gammas, s.emas))]
    if not used:
        raise JaxmergeError(f"no snapshot was taken at a step in (0, {step}]")
    names, steps, gammas, emas = zip(*used)
    weights = post_hoc_ema_weights(steps, gammas, step, gamma)
    return average.method.merge(list(emas), names=names, weights=[float(w) for w in weights], normalize=False)
