"""RegMean and RegMean++ against averaging and Fisher merging, on two kinds of split of digits.

The same setup as fisher_merge.py: from one start, two models are fine-tuned on different
data (disjoint classes, or images as they are and shifted). Each model's statistics (input
Gram matrices of its linear layers, and its Fisher) come from its own training data.
Expect RuntimeWarnings: some digit pixels are always 0 and some hidden units never fire,
so the Grams are singular and RegMean adds its small ridge term, as it says.
"""

from common import accuracy, logits_fn, print_table, shared_start, train, two_sided_settings

import jaxmerge

(x_train, y_train, x_test, y_test), graphdef, start = shared_start()
apply = logits_fn(graphdef)


def apply_fn(params, batch):
    return apply(params, batch[0])


for setting, data in two_sided_settings(x_train, y_train, x_test, y_test).items():
    models = [train(graphdef, start, x, y, steps=300, learning_rate=3e-3, seed=seed)
              for seed, (x, y) in enumerate(data["train"])]
    own_data = [[(x, y)] for x, y in data["train"]]
    grams = [jaxmerge.input_grams(apply_fn, d, params=p) for p, d in zip(models, own_data)]
    fishers = [jaxmerge.diagonal_fisher(apply_fn, d, params=p, estimator="exact", microbatch=128)
               for p, d in zip(models, own_data)]
    candidates = {
        "fine-tune A": models[0],
        "fine-tune B": models[1],
        "average": jaxmerge.average(models),
        "fisher_merge": jaxmerge.fisher_merge(models, fishers),
        "regmean alpha=0.9": jaxmerge.regmean(models, grams, alpha=0.9),
        "regmean_plus_plus alpha=0.9": jaxmerge.regmean_plus_plus(apply_fn, models, own_data, alpha=0.9),
    }
    print_table(f"setting: {setting}", candidates, data["test"],
                lambda params, x, y: accuracy(graphdef, params, x, y))
