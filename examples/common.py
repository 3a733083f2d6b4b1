"""Shared pieces of the examples: scikit-learn's bundled digits, a small Flax NNX MLP, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def digits(seed: int = 0):
    """Digits (8x8 images, 10 classes) scaled to [0, 1]: ``(x_train, y_train, x_test, y_test)``."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32), y.astype(np.int32), test_size=0.3, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


class MLP(nnx.Module):
    def __init__(self, sizes=(64, 128, 10), *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def init_mlp(seed: int, sizes=(64, 128, 10)):
    """``(graphdef, params)`` of a fresh MLP; ``nnx.merge(graphdef, params)`` rebuilds it."""
    return nnx.split(MLP(sizes, rngs=nnx.Rngs(seed)))


def logits_fn(graphdef):
    return lambda params, x: nnx.merge(graphdef, params)(x)


def train(graphdef, params, x, y, *, steps=300, batch_size=64, learning_rate=1e-2, seed=0,
          optimizer=None):
    """Train with Adam on random mini-batches; returns the new params."""
    apply = logits_fn(graphdef)
    tx = optimizer or optax.adam(learning_rate)

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()

    @jax.jit
    def step(p, opt_state, xb, yb):
        grads = jax.grad(loss)(p, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    rng = np.random.default_rng(seed)
    opt_state = tx.init(params)
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch_size)
        params, opt_state = step(params, opt_state, x[idx], y[idx])
    return params


def accuracy(graphdef, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(logits_fn(graphdef)(params, x), -1) == y))
