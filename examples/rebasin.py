"""Git Re-Basin on digits: the loss barrier between two independently trained MLPs, before
and after permuting one to match the other (weight matching).

Two MLPs (64-512-512-10) are trained from different random initialisations. Along the
straight line between them the test loss rises (a barrier); after aligning the second
model's hidden units to the first's, by their weights or by the correlation of their
activations on the training inputs, the line stays much lower. Writes rebasin.png.
"""

import sys

import jax.numpy as jnp
import numpy as np
import optax
from common import digits, init_mlp, logits_fn, train

import jaxmerge

SIZES = (64, 512, 512, 10)
x_train, y_train, x_test, y_test = digits()
graphdef, first = init_mlp(seed=0, sizes=SIZES)
_, second = init_mlp(seed=1, sizes=SIZES)
models = [train(graphdef, params, x_train, y_train, steps=500, learning_rate=1e-3, seed=seed)
          for seed, params in enumerate((first, second))]
apply = logits_fn(graphdef)


def test_loss(params):
    return float(optax.softmax_cross_entropy_with_integer_labels(apply(params, x_test), y_test).mean())


def test_accuracy(params):
    return float(jnp.mean(jnp.argmax(apply(params, x_test), -1) == y_test))


spec = jaxmerge.mlp_permutation_spec(models[0])
aligned = jaxmerge.align(spec, models[0], models[1])
batches = [x_train[i:i + 256] for i in range(0, len(x_train), 256)]
by_activations = jaxmerge.apply_permutation(spec, jaxmerge.activation_matching(spec, apply, models[0], models[1],
                                                                               batches), models[1])
curves = {"naive": models[1], "weight matching": aligned, "activation matching": by_activations}


def repaired_loss(t):
    """Test loss at t on the line to the weight-matched model, after REPAIR."""
    merged = jaxmerge.lerp(models[0], aligned, t)
    return test_loss(jaxmerge.repair(apply, merged, [models[0], aligned], [1 - t, t], batches))


print(f"{'interpolation':<23}{'loss barrier':>14}{'loss at t=0.5':>15}{'acc. at t=0.5':>15}")
loss_curves = {}
for label, other in curves.items():
    ts, losses = jaxmerge.interpolation_curve(models[0], other, test_loss, num=11)
    loss_curves[label] = (ts, losses)
    midpoint = jaxmerge.lerp(models[0], other, 0.5)
    print(f"{label:<23}{jaxmerge.barrier(ts, losses):>14.4f}{losses[5]:>15.4f}{test_accuracy(midpoint):>15.4f}")
ts = np.linspace(0.0, 1.0, 11)
repaired = [repaired_loss(float(t)) for t in ts]
loss_curves["weight matching + REPAIR"] = (ts, repaired)
middle = jaxmerge.repair(apply, jaxmerge.lerp(models[0], aligned, 0.5), [models[0], aligned], [0.5, 0.5], batches)
print(f"{'weight matching+REPAIR':<23}{jaxmerge.barrier(ts, repaired):>14.4f}{repaired[5]:>15.4f}"
      f"{test_accuracy(middle):>15.4f}")
print(f"{'(endpoints)':<23}{'':>14}{f'{losses[0]:.4f} / {losses[-1]:.4f}':>15}")

out = sys.argv[1] if len(sys.argv) > 1 else "rebasin.png"
jaxmerge.plot_interpolation(loss_curves, out, ylabel="test loss", title="MLP on digits: A -> B")
print(f"wrote {out}; the aligned model computes the same function: "
      f"{np.allclose(apply(aligned, x_test), apply(models[1], x_test), atol=1e-4)}")
