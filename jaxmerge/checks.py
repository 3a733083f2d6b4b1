"""Run-time checks of traced hyperparameters.

Outside ``jax.jit`` every hyperparameter is checked before any work (``density must be in (0,
1], got 1.5``). Inside ``jax.jit`` a hyperparameter that is a traced array has no value yet: its
shape is checked when traced, and its value (finite, in range; weights not summing to zero when
they are normalised) only when the merge runs under :func:`checked`, which turns the failed
check into an error. Without it the checks cost nothing and a bad value gives NaN or an
unchecked result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from jax.experimental import checkify


def checked(fn: Callable) -> Callable:
    """``fn`` with the run-time checks of its traced hyperparameters turned on.

    Args:
      fn: any function that calls jaxmerge merges, jitted or not (e.g. a jitted function of
        the merge weights).

    Returns:
      A function with ``fn``'s arguments and result that raises
      ``jax.experimental.checkify.JaxRuntimeError`` naming the hyperparameter and its value when
      one is invalid. Call it outside ``jax.jit`` (it raises on the host); to jit, jit ``fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> merge = jax.jit(lambda t: jaxmerge.lerp(jnp.zeros(2), jnp.ones(2), t))
      >>> merge(jnp.float32(jnp.nan)).tolist()  # unchecked: NaN out
      [nan, nan]
      >>> try:
      ...     jaxmerge.checked(merge)(jnp.float32(jnp.nan))
      ... except Exception as error:
      ...     print(str(error).splitlines()[0])
      t must be a finite number, got nan (`check` failed)
    """
    checkified = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        error, out = checkified(*args, **kwargs)
        error.throw()
        return out
    return run
