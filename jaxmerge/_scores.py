"""Checking what a user's ``evaluate(params)`` returns."""

from __future__ import annotations

import math

import numpy as np

from jaxmerge.errors import JaxmergeError


def as_score(value, where: str) -> float:
    """``value`` as a float, after checking it is one finite number.

    Raises:
      ValueError: an array with more than one element, or NaN/infinity (naming ``where``).
    """
    if np.shape(value) not in ((), (1,)):
        raise JaxmergeError(f"evaluate must return a scalar, got an array of shape {np.shape(value)}")
    value = float(np.asarray(value).reshape(()))
    if not math.isfinite(value):
        raise JaxmergeError(f"evaluate returned {value} for {where}")
    return value
