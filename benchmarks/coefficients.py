"""The cost of learning and searching merge coefficients, against the model's own cost, in one run.

With ``--models`` task vectors of an MLP (``--width``) and a batch of ``--batch`` inputs:

- one AdaMerging step (merge with per-tensor coefficients, forward, entropy, gradient with
  respect to the coefficients, Adam) against one forward and backward pass of the model with
  respect to its params (the baseline);
- one vmapped, jitted evaluation of a population of ``--population`` candidates (merge +
  accuracy) against a Python loop over them, each a jitted call (the baseline).

Usage: python benchmarks/coefficients.py [--models 4] [--width 512] [--batch 256] [--population 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import best_time, mlp, print_peak_rss

from jaxmerge import coefficients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--width", type=int, default=512, help="hidden width of the MLP")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    base, apply = mlp([64, args.width, args.width, 10])
    rng = np.random.default_rng(0)
    models = [jax.tree.map(lambda p: p + 0.01 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), base)
              for _ in range(args.models)]
    x = jnp.asarray(rng.standard_normal((args.batch, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
    vectors = coefficients.task_vectors(base, models)

    @jax.jit
    def model_step(params):
        return jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, (x, y)), y).mean())(params)

    optimizer = optax.adam(1e-3)
    c = coefficients.init_coefficients(vectors, "tensor")
    state = optimizer.init(c)

    @jax.jit
    def adamerging_step(c, state):
        grads = jax.grad(lambda c: coefficients.prediction_entropy(apply(coefficients.combine(vectors, c), (x, y))))(c)
        updates, state = optimizer.update(grads, state, c)
        return optax.apply_updates(c, updates), state

    def accuracy(lam):
        return jnp.mean(jnp.argmax(apply(coefficients.combine(vectors, lam), (x, y)), -1) == y)

    candidates = jnp.asarray(rng.uniform(0, 1, (args.population, args.models)), jnp.float32)
    one, population = jax.jit(accuracy), jax.jit(jax.vmap(accuracy))
    np.testing.assert_allclose(population(candidates), [one(c) for c in candidates], atol=1e-6)

    t_model = best_time(lambda: model_step(base), args.reps, warmup=True)
    t_ada = best_time(lambda: adamerging_step(c, state), args.reps, warmup=True)
    t_loop = best_time(lambda: [one(c) for c in candidates], args.reps, warmup=True)
    t_vmap = best_time(lambda: population(candidates), args.reps, warmup=True)
    count = sum(v.size for v in jax.tree.leaves(base))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; {args.models} task vectors "
          f"of an MLP of {count / 1e3:.0f}K parameters, batch {args.batch}")
    print(f"\n{'step':<52}{'seconds':>9}{'time / baseline':>17}")
    for name, t, baseline in (("forward + backward of the model (baseline)", t_model, t_model),
                              ("one AdaMerging step (per-tensor coefficients)", t_ada, t_model),
                              (f"loop over {args.population} candidates, jitted each (baseline)", t_loop, t_loop),
                              (f"vmapped population of {args.population}, one jitted call", t_vmap, t_loop)):
        print(f"{name:<52}{t:>9.4f}{t / baseline:>16.2f}x")


if __name__ == "__main__":
    main()
    print_peak_rss()
