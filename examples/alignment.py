"""Aligning models trained from different initialisations before merging them, on digits.

Two MLPs (64-512-512-10) and two small CNNs (two 3x3 convolutions, global average pooling, a
dense head) are trained from different random initialisations. Along the straight line
between two such models the test loss rises (a barrier). Each alignment method moves the
second model's units onto the first's before interpolating: weight matching, activation
matching and the straight-through estimator (Git Re-Basin; the last on the MLPs only),
optimal-transport fusion, REPAIR after weight matching, PLeaS, and the fusion of a narrower
MLP (64-256-256-10) into the first one's width. Prints one table per network (loss barrier
over 11 points of the line, and the test loss and accuracy of the merged model at t = 0.5) and
the layer-wise barriers, and writes the interpolation curves to alignment.png (or the path
given as the first argument).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import digits, init_mlp, logits_fn, train
from flax import nnx

import jaxmerge

x_train, y_train, x_test, y_test = digits()
batches = [x_train[i:i + 256] for i in range(0, len(x_train), 256)]
labelled = [(x_train[i:i + 128], y_train[i:i + 128]) for i in range(0, len(x_train), 128)]


def conv3x3(x, kernel, bias):
    """A 'SAME' 3x3 convolution as nine shifted slices and one matmul: the same numbers as
    ``nnx.Conv``'s, and XLA's CPU backend differentiates it about 10x faster."""
    _, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
    return patches @ kernel.reshape(9 * c, -1) + bias


class CNN(nnx.Module):
    def __init__(self, channels=(32, 64), *, rngs: nnx.Rngs):
        self.convs = nnx.List([nnx.Conv(i, o, (3, 3), rngs=rngs) for i, o in zip((1, *channels[:-1]), channels)])
        self.head = nnx.Linear(channels[-1], 10, rngs=rngs)

    def __call__(self, x, native=False):
        """``native``: with ``nnx.Conv`` itself (the same numbers), whose convolutions
        activation matching and REPAIR see."""
        x = x.reshape(-1, 8, 8, 1)
        for conv in self.convs:
            x = jax.nn.relu(conv(x) if native else conv3x3(x, conv.kernel[...], conv.bias[...]))
        return self.head(x.mean((1, 2)))


def scores(apply):
    """``(test loss, test accuracy, training-batch loss)`` functions of a network's params."""
    def loss(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

    jitted = jax.jit(loss)

    def test_loss(params):
        return float(jitted(params, (x_test, y_test)))

    def test_accuracy(params):
        return float(jnp.mean(jnp.argmax(apply(params, x_test), -1) == y_test))

    return test_loss, test_accuracy, loss


def report(title, reference, candidates, points, apply):
    """One row per aligned model (its interpolation with ``reference``) and per merged point."""
    test_loss, test_accuracy, _ = scores(apply)
    print(f"\n{title}\n{'method':<34}{'loss barrier':>13}{'loss t=0.5':>12}{'acc. t=0.5':>12}")
    curves = {}
    for label, other in candidates.items():
        ts, losses = jaxmerge.interpolation_curve(reference, other, test_loss, num=11)
        curves[label] = (ts, losses)
        midpoint = jaxmerge.lerp(reference, other, 0.5)
        print(f"{label:<34}{jaxmerge.barrier(ts, losses):>13.4f}{losses[5]:>12.4f}{test_accuracy(midpoint):>12.4f}")
    for label, merged in points.items():
        print(f"{label:<34}{'-':>13}{test_loss(merged):>12.4f}{test_accuracy(merged):>12.4f}")
    ends = curves["naive"][1]
    print(f"{'(endpoints)':<34}{'':>13}{f'{ends[0]:.4f} / {ends[-1]:.4f}':>24}")
    return curves


def mlp_section():
    sizes = (64, 512, 512, 10)
    graphdef, first = init_mlp(seed=0, sizes=sizes)
    models = [train(graphdef, p, x_train, y_train, steps=500, learning_rate=1e-3, seed=s)
              for s, p in enumerate((first, init_mlp(seed=1, sizes=sizes)[1]))]
    narrow_graph, narrow = init_mlp(seed=2, sizes=(64, 256, 256, 10))
    narrow = train(narrow_graph, narrow, x_train, y_train, steps=500, learning_rate=1e-3, seed=2)
    apply = logits_fn(graphdef)
    a, b = models
    spec = jaxmerge.mlp_permutation_spec(a)
    aligned = jaxmerge.align(spec, a, b)
    by_activations = jaxmerge.apply_permutation(spec, jaxmerge.activation_matching(spec, apply, a, b, batches), b)
    ste = jaxmerge.apply_permutation(spec, jaxmerge.ste_matching(spec, scores(apply)[2], a, b, labelled, epochs=3), b)
    candidates = {"naive": b, "weight matching": aligned, "activation matching": by_activations,
                  "straight-through estimator": ste, "OT fusion (weights, exact)": jaxmerge.transport(spec, a, b),
                  "OT fusion (activations, exact)": jaxmerge.transport(spec, a, b, cost="activations",
                                                                      apply_fn=apply, data=batches)}
    repaired = jaxmerge.repair(apply, jaxmerge.lerp(a, aligned, 0.5), [a, aligned], [0.5, 0.5], batches)
    points = {"weight matching + REPAIR": repaired,
              "PLeaS (width 512)": jaxmerge.pleas(spec, apply, a, b, batches),
              "PLeaS (width 640, partial)": jaxmerge.pleas(spec, apply, a, b, batches, widths=1.25),
              "OT fusion of 512 + 256 wide": jaxmerge.ot_fusion(spec, [a, narrow], cost="activations",
                                                                apply_fn=apply, data=batches)}
    test_loss = scores(apply)[0]
    curves = report("MLP 64-512-512-10", a, candidates, points, apply)
    layers = {f"{label}{', up to' if cumulative else ''}": jaxmerge.layerwise_barriers(
        a, other, test_loss, num=5, cumulative=cumulative)
        for cumulative in (False, True) for label, other in (("naive", b), ("matched", aligned))}
    print(f"\nlayer-wise loss barriers (the layer alone, or with every layer before it)\n{'layer':<12}"
          + "".join(f"{k:>18}" for k in layers))
    for layer in layers["naive"]:
        print(f"{layer:<12}" + "".join(f"{v[layer]:>18.4f}" for v in layers.values()))
    print(f"the weight-matched model computes the same function: "
          f"{np.allclose(apply(aligned, x_test), apply(b, x_test), atol=1e-4)}")
    return curves


def cnn_section():
    graphdef, first = nnx.split(CNN(rngs=nnx.Rngs(10)))
    second = nnx.split(CNN(rngs=nnx.Rngs(11)))[1]
    a, b = (train(graphdef, p, x_train, y_train, steps=400, learning_rate=3e-3, seed=s)
            for s, p in enumerate((first, second)))
    apply = logits_fn(graphdef)
    native = lambda params, x: nnx.merge(graphdef, params)(x, native=True)  # noqa: E731
    spec = jaxmerge.cnn_permutation_spec(a, convs=["convs/0", "convs/1"], dense=["head"])
    aligned = jaxmerge.align(spec, a, b)
    candidates = {"naive": b, "weight matching": aligned,
                  "activation matching": jaxmerge.apply_permutation(
                      spec, jaxmerge.activation_matching(spec, native, a, b, batches), b),
                  "OT fusion (weights, exact)": jaxmerge.transport(spec, a, b)}
    repaired = jaxmerge.repair(native, jaxmerge.lerp(a, aligned, 0.5), [a, aligned], [0.5, 0.5], batches)
    report("CNN conv32-conv64-pool-dense10", a, candidates, {"weight matching + REPAIR": repaired}, apply)


curves = mlp_section()
cnn_section()
out = sys.argv[1] if len(sys.argv) > 1 else "alignment.png"
jaxmerge.plot_interpolation(curves, out, ylabel="test loss", title="MLP on digits: A -> B")
print(f"wrote {out}")
