"""Merge task vectors of two digit tasks with task arithmetic, TIES and DARE.

A shared start is trained briefly on all ten digits, then fine-tuned separately on task A
(digits 0-4) and task B (digits 5-9). Each merge adds the task vectors (fine-tune minus
start) back to the start; the table reports per-task accuracy (argmax over the task's own
five classes) of every model and merge on the held-out test split.
"""

import jax
import numpy as np
from common import logits_fn, shared_start, train

import jaxmerge

(x_train, y_train, x_test, y_test), graphdef, start = shared_start()

TASKS = {"A: 0-4": np.arange(5), "B: 5-9": np.arange(5, 10)}
finetuned = {}
for t, (name, classes) in enumerate(TASKS.items()):
    mask = np.isin(y_train, classes)
    finetuned[name] = train(graphdef, start, x_train[mask], y_train[mask], steps=400, learning_rate=3e-3, seed=1 + t)


def task_accuracy(params, classes) -> float:
    mask = np.isin(y_test, classes)
    logits = np.asarray(logits_fn(graphdef)(params, x_test[mask]))[:, classes]
    return float(np.mean(classes[np.argmax(logits, -1)] == y_test[mask]))


models = list(finetuned.values())
key = jax.random.key(0)
candidates = {
    "start": start,
    **{f"fine-tune {name}": params for name, params in finetuned.items()},
    "average": jaxmerge.average(models),
    "task_arithmetic lambda=1": jaxmerge.task_arithmetic(start, models, lambda_=1.0),
    "ties density=0.2": jaxmerge.ties(start, models, density=0.2, lambda_=1.0),
    "dare_ties density=0.3": jaxmerge.dare_ties(start, models, density=0.3, key=key),
    "dare_linear density=0.3": jaxmerge.dare_linear(start, models, density=0.3, key=key),
    "breadcrumbs_ties": jaxmerge.breadcrumbs_ties(start, models, density=0.3, gamma=0.02),
    "magmax": jaxmerge.magmax(start, models),
}

names = list(TASKS)
print(f"{'model':<28}" + "".join(f"{n:>10}" for n in names) + f"{'mean':>10}")
for label, params in candidates.items():
    scores = [task_accuracy(params, TASKS[n]) for n in names]
    print(f"{label:<28}" + "".join(f"{s:>10.4f}" for s in scores) + f"{np.mean(scores):>10.4f}")
