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

    At step ``t = update index + 1``, each EMA with exponent ``gamma`` is updated as
    ``ema = beta ema + (1 - beta) theta_t`` with ``beta = (1 - 1 / t) ** (gamma + 1)``,
    which weights the past in proportion to ``tau ** gamma``.

    Every ``snapshot_every`` steps the state's ``snapshot_due`` is True: save
    ``jaxmerge.power_ema_snapshot(opt_state)`` then (with Orbax, for instance), and
    reconstruct an EMA of any width afterwards with :func:`post_hoc_ema`.
    :func:`jaxmerge.averaged_params` returns the EMA of the first ``sigma_rel``.

    Args:
      inner: the optimizer to run.
      sigma_rels: relative widths of the EMAs to keep, each in (0, 0.2887); EDM2 keeps
        0.05 and 0.10.
      snapshot_every: steps between snapshots (EDM2: every 8 Mi images).
      dtype: dtype of the EMA copies of float parameters.

    References:
      Karras et al., arXiv 2312.02696, Sec. 3 and App. C.
    """
    gammas = tuple(sigma_rel_to_gamma(s) for s in sigma_rels)
    if not gammas:
        raise JaxmergeError("sigma_rels is empty")
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
    """A snapshot of the power-function EMAs of the :func:`power_ema` in ``opt_state``, with
    its step and exponents, ready to save (a NamedTuple of arrays and numbers)."""
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

    Args:
      snapshots: :func:`power_ema_snapshot` results saved during training (every EMA of
        every snapshot with ``0 < snapshot step <= step`` takes part).
      sigma_rel: the wanted relative width, in (0, 0.2887).
      step: where the reconstructed EMA ends (default: the last snapshot's step).

    Returns:
      The parameters, ``sum_i x_i ema_i`` (computed by :func:`jaxmerge.average`).

    Raises:
      ValueError: no usable snapshot, or snapshots whose parameter structure differs
        (naming the snapshot and the leaf path).
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
