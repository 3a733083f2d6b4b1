"""The training loop that AdaMerging and DAM share: one compiled optax step per batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import optax
from tqdm import tqdm

from jaxmerge._tree import PyTree
from jaxmerge.errors import JaxmergeError


def minimise(loss: Callable[[PyTree, object], jax.Array], coefficients: PyTree, batches: Iterable,
             optimizer: optax.GradientTransformation, *, project: Callable[[PyTree], PyTree] = lambda c: c,
             desc: str, progress: bool, batch: str = "batch") -> tuple[PyTree, jax.Array]:
    """``optimizer`` steps on ``loss(coefficients, batch)``, one per batch, each followed by
    ``project`` (e.g. clipping); the final coefficients and the loss at each step.

    Raises:
      JaxmergeError: no batch (``f"{desc} needs at least one {batch}"``).
    """
    state = optimizer.init(coefficients)

    @jax.jit
    def step(c, state, batch):
        value, grads = jax.value_and_grad(loss)(c, batch)
        updates, state = optimizer.update(grads, state, c)
        return project(optax.apply_updates(c, updates)), state, value

    losses = []
    for inputs in tqdm(batches, desc=desc, disable=not progress):
        coefficients, state, value = step(coefficients, state, inputs)
        losses.append(value)
    if not losses:
        raise JaxmergeError(f"{desc} needs at least one {batch}")
    return coefficients, jax.numpy.stack(losses)
