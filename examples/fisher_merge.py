"""Fisher-weighted merging against plain averaging, on two kinds of split of digits.

From one start (trained briefly on all digits), two models are fine-tuned with the full
10-way head on different data, and each model's diagonal Fisher is estimated on its own
training data. Two settings:

- classes: model A sees digits 0-4, model B digits 5-9;
- shift: model A sees the images as they are, model B the images shifted right by two
  pixels (a distribution shift).

The merges are scored (10-way accuracy) on the test examples of each side and overall.
"""

from common import accuracy, logits_fn, print_table, shared_start, train, two_sided_settings

import jaxmerge

(x_train, y_train, x_test, y_test), graphdef, start = shared_start()
apply = logits_fn(graphdef)

for setting, data in two_sided_settings(x_train, y_train, x_test, y_test).items():
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
    print_table(f"setting: {setting}", candidates, data["test"],
                lambda params, x, y: accuracy(graphdef, params, x, y))
