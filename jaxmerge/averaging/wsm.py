"""Merge weights that turn constant-learning-rate checkpoints into a decayed model (WSM)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxmerge.errors import JaxmergeError

SCHEDULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: 1 - x,
    "cosine": lambda x: (1 + np.cos(np.pi * x)) / 2,
    "inverse_sqrt": lambda x: 1 - np.sqrt(x),
}


def checkpoint_merge_weights(schedule: str | Callable, num_checkpoints: int) -> list[float]:
    """Weights for merging the last checkpoints of a constant learning rate run as a decay (WSM).

    With checkpoints ``theta_0 .. theta_k`` (``k = num_checkpoints - 1``, oldest first) saved
    at equal intervals, the merge ``sum_j c_j theta_j`` equals ``theta_0`` plus the later
    updates scaled by ``w_i = sum_{j >= i} c_j``: a learning-rate decay over them. For a
    decay shape ``f`` on [0, 1] (``f(0) = 1``, non-increasing), ``w_i = f(i / (k + 1))`` and

        c_0 = 1 - w_1,   c_j = w_j - w_{j+1},   c_k = w_k.

    Uniform weights are the linear decay. Use them with :func:`jaxmerge.average`.

    Args:
      schedule: ``'linear'`` (``1 - x``), ``'cosine'`` (``(1 + cos(pi x)) / 2``),
        ``'inverse_sqrt'`` (``1 - sqrt(x)``, the "1-sqrt" cooldown), or a function
        ``fn(x) -> multiplier`` with values in [0, 1], non-increasing on [0, 1].
      num_checkpoints: how many checkpoints are merged (an int >= 1).

    Returns:
      ``num_checkpoints`` non-negative Python floats summing to 1, oldest checkpoint first
      (``[1.0]`` for one checkpoint).

    Raises:
      JaxmergeError: ``num_checkpoints`` is not an int >= 1, ``schedule`` is an unknown
        name, or the schedule's values at ``1 / (k + 1), ..., k / (k + 1)`` leave [0, 1]
        or increase.

    References:
      Tian et al., "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM
      Pre-training", arXiv 2507.17634.

    Examples:
      With 4 checkpoints, ``w = f(1/4), f(2/4), f(3/4)``; the linear decay gives
      ``w = 0.75, 0.5, 0.25`` and uniform weights, the cosine decay
      ``w = 0.8536, 0.5, 0.1464`` and weights ``1 - 0.8536``, ``0.8536 - 0.5``, ...:

      >>> import jaxmerge
      >>> jaxmerge.checkpoint_merge_weights("linear", 4)
      [0.25, 0.25, 0.25, 0.25]
      >>> [round(c, 4) for c in jaxmerge.checkpoint_merge_weights("cosine", 4)]
      [0.1464, 0.3536, 0.3536, 0.1464]
    """
    if not isinstance(num_checkpoints, int) or num_checkpoints < 1:
        raise JaxmergeError(f"num_checkpoints must be an int >= 1, got {num_checkpoints!r}")
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise JaxmergeError(f"schedule must be one of {tuple(SCHEDULES)} or a function, got {schedule!r}")
        schedule = SCHEDULES[schedule]
    k = num_checkpoints - 1
    decay = np.asarray([float(schedule(i / (k + 1))) for i in range(1, k + 1)])
    if np.any(decay < 0) or np.any(decay > 1) or np.any(np.diff(decay) > 0):
        raise JaxmergeError(f"the schedule must be non-increasing with values in [0, 1], got {decay.tolist()}")
    bounded = np.concatenate([[1.0], decay, [0.0]])
    return (bounded[:-1] - bounded[1:]).tolist()
