"""Merge coefficients tuned, learned and searched, on three digit tasks; LCSC on a training run.

A shared start is trained briefly on all ten digits, then fine-tuned on three tasks (digits
0-3, 4-6 and 7-9). The held-out split is halved: a labeled validation half for tuning, and a
test half, whose inputs AdaMerging also sees without labels (as in the paper); DAM distils
each fine-tune on its own training inputs, unlabeled. Accuracy is
per task (argmax over the task's own classes). Then one run trained on all digits saves ten
checkpoints; LCSC searches their combination on the validation loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import logits_fn, shared_start, train

import jaxmerge
from jaxmerge import coefficients

(x_train, y_train, x_held, y_held), graphdef, start = shared_start()
half = len(x_held) // 2
x_val, y_val, x_test, y_test = x_held[:half], y_held[:half], x_held[half:], y_held[half:]
apply = logits_fn(graphdef)
TASKS = [np.arange(0, 4), np.arange(4, 7), np.arange(7, 10)]
models = [train(graphdef, start, x_train[np.isin(y_train, c)], y_train[np.isin(y_train, c)], steps=300,
                learning_rate=3e-3, seed=1 + t) for t, c in enumerate(TASKS)]


def task_split(x, y):
    """Per task: its inputs, and its labels as indices into its classes."""
    return [(jnp.asarray(x[np.isin(y, c)]), jnp.asarray(np.searchsorted(c, y[np.isin(y, c)]))) for c in TASKS]


VAL, TEST = task_split(x_val, y_val), task_split(x_test, y_test)


@jax.jit
def accuracies(params, split):
    return jnp.stack([jnp.mean(jnp.argmax(apply(params, x)[:, c], -1) == y) for c, (x, y) in zip(TASKS, split)])


def mean_validation_accuracy(params):
    return accuracies(params, VAL).mean()


vectors = coefficients.task_vectors(start, models)
ties_vectors = coefficients.task_vectors(start, models, density=0.2, elect_sign=True)
key = jax.random.key(0)
tuned = coefficients.search(lambda lambda_: jaxmerge.task_arithmetic(start, models, lambda_=lambda_),
                            mean_validation_accuracy, {"lambda_": (0.0, 1.5)}, strategy="grid", budget=16)
tuned_ties = coefficients.search(lambda lambda_: jaxmerge.ties(start, models, density=0.2, lambda_=lambda_),
                                 mean_validation_accuracy, {"lambda_": (0.0, 1.5)}, strategy="grid", budget=16)
searched = coefficients.search(lambda a, b, c: coefficients.combine(vectors, jnp.stack([a, b, c])),
                               mean_validation_accuracy, {n: (0.0, 1.5) for n in "abc"}, strategy="cmaes",
                               budget=64, population=16, key=key)
unlabeled = [tuple(x for x, _ in TEST)] * 50  # every task's test inputs, 50 steps


def task_logits(params, inputs):
    return [apply(params, x)[:, c] for c, x in zip(TASKS, inputs)]


with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes Python floats with its int32 step count
    learned = {name: coefficients.adamerging(task_logits, v, unlabeled, granularity=granularity,
                                             optimizer=optax.adam(0.02))
               for name, granularity, v in (("task-wise", "model", vectors), ("layer-wise", "tensor", vectors),
                                            ("++", "tensor", ties_vectors))}
    own_data = [[jnp.asarray(x_train[np.isin(y_train, c)][i:i + 64]) for i in range(0, 64 * 5, 64)] * 10 for c in TASKS]
    distilled = coefficients.dam([lambda p, x, c=c: apply(p, x)[:, c] for c in TASKS], models, own_data,
                                 optimizer=optax.adam(0.01))

rows = {
    "start": start,
    **{f"fine-tune {t}": m for t, m in enumerate(models)},
    "task arithmetic, lambda 1": jaxmerge.task_arithmetic(start, models),
    f"task arithmetic, tuned lambda {tuned.best['lambda_']:.2f}":
        jaxmerge.task_arithmetic(start, models, lambda_=tuned.best["lambda_"]),
    f"TIES 0.2, tuned lambda {tuned_ties.best['lambda_']:.2f}":
        jaxmerge.ties(start, models, density=0.2, lambda_=tuned_ties.best["lambda_"]),
    "CMA-ES, one lambda per task": coefficients.combine(vectors, jnp.asarray([searched.best[n] for n in "abc"])),
    "AdaMerging, task-wise": learned["task-wise"].params,
    "AdaMerging, layer-wise": learned["layer-wise"].params,
    "AdaMerging++, layer-wise": learned["++"].params,
    "DAM (distilled on each task's data)": distilled.params,
}
print(f"{'merge':<36}{'0-3':>8}{'4-6':>8}{'7-9':>8}{'mean':>8}")
for label, params in rows.items():
    scores = np.asarray(accuracies(params, TEST))
    print(f"{label:<36}" + "".join(f"{s:>8.4f}" for s in scores) + f"{scores.mean():>8.4f}")

# LCSC: ten checkpoints of one SGD run on all digits, 20 steps apart, combined


@jax.jit
def sgd_segment(params, batches):
    def step(p, idx):
        grads = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(apply(q, x_all[idx]),
                                                                                   y_all[idx]).mean())(p)
        return jax.tree.map(lambda a, g: a - 0.05 * g, p, grads), None
    return jax.lax.scan(step, params, batches)[0]


x_all, y_all = jnp.asarray(x_train), jnp.asarray(y_train)
run, params = [], start
for segment in np.random.default_rng(100).integers(0, len(x_train), (10, 20, 64)):
    params = sgd_segment(params, segment)
    run.append(params)


def validation_loss(params):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, jnp.asarray(x_val)), jnp.asarray(y_val)).mean()


ema = run[0]
for checkpoint in run[1:]:
    ema = jaxmerge.lerp(ema, checkpoint, 0.5)  # EMA over the checkpoints, decay 0.5
found = coefficients.lcsc(run, lambda p: -validation_loss(p), key=key, generations=12, population=16,
                          init=[0.0] * 9 + [1.0])
lcsc_params = jax.tree.map(lambda *leaves: sum(c * leaf for c, leaf in zip(found.best, leaves)), *run)
print(f"\n{'training run':<36}{'test loss':>10}{'test acc.':>10}")
for label, params in (("last checkpoint", run[-1]), ("EMA of checkpoints (0.5)", ema), ("LCSC", lcsc_params)):
    logits = apply(params, jnp.asarray(x_test))
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y_test)).mean())
    print(f"{label:<36}{loss:>10.4f}{float(jnp.mean(jnp.argmax(logits, -1) == y_test)):>10.4f}")
