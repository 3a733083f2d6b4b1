"""Fisher-weighted merging against plain averaging, on two kinds of split of digits.

From one start (trained briefly on all digits), two models are fine-tuned with the full
10-way head on different data, and each model's diagonal Fisher is estimated on its own
training data. Two settings:

- classes: model A sees digits 0-4, model B digits 5-9;
- shift: model A sees the images as they are, model B the images shifted right by two
  pixels (a distribution shift).

The merges are scored (10-way accuracy) on the test examples of each side and overall.
"""

import numpy as np

import jaxmerge
from common import accuracy, digits, init_mlp, logits_fn, train


def shifted(x: np.ndarray) -> np.ndarray:
    images = x.reshape(-1, 8, 8)
    moved = np.zeros_like(images)
    moved[:, :, 2:] = images[:, :, :-2]
    return moved.reshape(-1, 64)


x_train, y_train, x_test, y_test = digits()
graphdef, init = init_mlp(seed=0)
start = train(graphdef, init, x_train, y_train, steps=15, learning_rate=3e-3, seed=0)
apply = logits_fn(graphdef)

classes_a, classes_b = np.isin(y_train, range(5)), np.isin(y_train, range(5, 10))
test_a, test_b = np.isin(y_test, range(5)), np.isin(y_test, range(5, 10))
SETTINGS = {
    "classes": {"train": [(x_train[classes_a], y_train[classes_a]), (x_train[classes_b], y_train[classes_b])],
                "test": {"0-4": (x_test[test_a], y_test[test_a]), "5-9": (x_test[test_b], y_test[test_b])}},
    "shift": {"train": [(x_train, y_train), (shifted(x_train), y_train)],
              "test": {"as is": (x_test, y_test), "shifted": (shifted(x_test), y_test)}},
}

for setting, data in SETTINGS.items():
    models, fishers = [], {"exact": [], "empirical": []}
    for seed, (x, y) in enumerate(data["train"]):
        models.append(train(graphdef, start, x, y, steps=300, learning_rate=3e-3, seed=seed))
        for estimator in fishers:
            fishers[estimator].append(jaxmerge.diagonal_fisher(
                lambda p, batch: apply(p, batch[0]), [(x, y)], params=models[-1], estimator=estimator,
                microbatch=128))
    candidates = {
        "fine-tune A": models[0],
        "fine-tune B": models[1],
        "average": jaxmerge.average(models),
        "fisher_merge (model Fisher)": jaxmerge.fisher_merge(models, fishers["exact"]),
        "fisher_merge (empirical)": jaxmerge.fisher_merge(models, fishers["empirical"]),
        "fisher_merge (normalized)": jaxmerge.fisher_merge(models, fishers["exact"], normalize_fishers=True),
    }
    sides = data["test"]
    print(f"\nsetting: {setting}")
    print(f"{'model':<30}" + "".join(f"{name:>10}" for name in sides) + f"{'mean':>10}")
    for label, params in candidates.items():
        scores = [accuracy(graphdef, params, x, y) for x, y in sides.values()]
        print(f"{label:<30}" + "".join(f"{s:>10.4f}" for s in scores) + f"{np.mean(scores):>10.4f}")
