"""Running third-party JAX code under JAX's default promotion rules."""

from __future__ import annotations

import contextlib

import jax


def standard_promotion() -> contextlib.ExitStack:
    """A context with JAX's standard dtype and rank promotion, for libraries (evosax, ott-jax)
    whose code relies on them: a user's stricter settings
    (``jax_numpy_dtype_promotion='strict'``, ``jax_numpy_rank_promotion='raise'``) must not
    break them."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.numpy_dtype_promotion("standard"))
    stack.enter_context(jax.numpy_rank_promotion("allow"))
    return stack
