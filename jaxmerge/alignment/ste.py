"""Straight-through estimator matching (Git Re-Basin, Ainsworth et al., arXiv 2209.04836): learn the
permutation of a model's units that minimises the loss of its interpolation with a reference.

A free copy ``theta`` of the reference's parameters is trained. Each step projects it onto the
permutations of ``model`` by weight matching (``pi(model)``, the permuted model closest to
``theta``), evaluates the loss at the interpolation ``(1 - t) reference + t pi(model)``, and
passes the gradient straight through the projection to ``theta``:
``pi(model) + theta - stop_gradient(theta)`` equals ``pi(model)`` in the forward pass and has
``theta``'s gradient. The permutation of the step with the lowest loss is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np
import optax

from jaxmerge._promotion import standard_promotion
from jaxmerge._tree import PyTree, flatten_models
from jaxmerge.alignment.matching import apply_permutation, weight_matching
from jaxmerge.alignment.spec import PermutationSpec
from jaxmerge.errors import JaxmergeError


def _step(loss_fn: Callable, optimizer: optax.GradientTransformation, t: float) -> Callable:
    def interpolated_loss(theta, projected, reference, batch):
        through = jax.tree.map(lambda x, p: p + (x - jax.lax.stop_gradient(x)), theta, projected)
        return loss_fn(jax.tree.map(lambda r, b: (1 - t) * r + t * b, reference, through), batch)

    @jax.jit
    def step(theta, opt_state, projected, reference, batch):
        loss, grads = jax.value_and_grad(interpolated_loss)(theta, projected, reference, batch)
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, loss

    return step


def ste_matching(spec: PermutationSpec, loss_fn: Callable[[PyTree, object], jax.Array], reference: PyTree,
                 model: PyTree, data: Iterable, *, epochs: int = 1, t: float = 0.5,
                 optimizer: optax.GradientTransformation | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Permutations of ``model``'s units that minimise the loss between it and ``reference``.

    Args:
      spec: which axes of which leaves each permutation acts on.
      loss_fn: ``loss_fn(params, batch)``, a scalar loss to minimise at the interpolation.
      reference: the parameter tree to match (it is not changed); ``theta`` starts here.
      model: the parameter tree to permute, with ``reference``'s structure and shapes.
      data: the training batches, run ``epochs`` times in order.
      epochs: passes over ``data``.
      t: where on the line from ``reference`` (0) to the permuted ``model`` (1) the loss is
        taken.
      optimizer: the optax optimizer of ``theta`` (default Adam, learning rate 0.001; it is
        traced under JAX's standard dtype promotion, which optax's Adam needs).
      seed: seed of :func:`~jaxmerge.weight_matching`'s order of permutations.

    Returns:
      ``{name: index array}`` to pass to :func:`~jaxmerge.apply_permutation` (on ``model``):
      the projection of the step whose batch loss was lowest.

    Raises:
      JaxmergeError: the trees differ, the spec does not match them, no batch, or a loss
        that was never finite.

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836 (section 3.3).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxmerge
      >>> def apply(p, x):
      ...     return jax.nn.relu(x @ p["l0"]["kernel"]) @ p["l1"]["kernel"]
      >>> reference = {"l0": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))},
      ...              "l1": {"kernel": jax.random.normal(jax.random.key(1), (3, 2))}}
      >>> spec = jaxmerge.mlp_permutation_spec(reference)
      >>> model = jaxmerge.apply_permutation(spec, {"hidden_0": [2, 0, 1]}, reference)
      >>> x = jax.random.normal(jax.random.key(2), (64, 4))
      >>> loss = lambda p, x: jnp.mean((apply(p, x) - apply(reference, x)) ** 2)
      >>> ste_matching(spec, loss, reference, model, [x])["hidden_0"].tolist()
      [1, 2, 0]
    """
    flatten_models([reference, model], names=["reference", "model"])
    batches = list(data)
    if not batches:
        raise JaxmergeError("ste_matching needs at least one batch")
    optimizer = optimizer if optimizer is not None else optax.adam(1e-3)
    step = _step(loss_fn, optimizer, t)
    theta, perm, best = reference, None, (np.inf, None)
    with standard_promotion():
        opt_state = optimizer.init(theta)
    for _ in range(epochs):
        for batch in batches:
            perm = weight_matching(spec, theta, model, seed=seed, init_perm=perm)
            with standard_promotion():
                theta, opt_state, loss = step(theta, opt_state, apply_permutation(spec, perm, model), reference, batch)
            if float(loss) < best[0]:
                best = (float(loss), perm)
    if best[1] is None:
        raise JaxmergeError("ste_matching: the loss was not finite at any step")
    return best[1]
