"""Model soups on digits: the best single fine-tune against the uniform and greedy soups.

One start (trained briefly) is fine-tuned eight times with different learning rates,
lengths, data orders and weight decay. The greedy soup is chosen on a validation split;
every model is reported on a separate test split (the model soups paper's comparison).
"""

import numpy as np
import optax
from common import accuracy, digits, init_mlp, train

import jaxmerge

x_train, y_train, x_rest, y_rest = digits()
half = len(x_rest) // 2
x_val, y_val, x_test, y_test = x_rest[:half], y_rest[:half], x_rest[half:], y_rest[half:]
graphdef, init = init_mlp(seed=0)
start = train(graphdef, init, x_train, y_train, steps=40, learning_rate=3e-3, seed=0)

HYPERPARAMETERS = [  # (learning rate, steps, weight decay)
    (1e-3, 300, 0.0), (3e-3, 300, 0.0), (1e-2, 300, 0.0), (3e-2, 300, 0.0),
    (1e-3, 600, 1e-4), (3e-3, 600, 1e-4), (1e-2, 150, 1e-3), (3e-2, 150, 1e-3),
]
candidates = [train(graphdef, start, x_train, y_train, steps=steps, seed=seed,
                    optimizer=optax.adamw(lr, weight_decay=decay))
              for seed, (lr, steps, decay) in enumerate(HYPERPARAMETERS, start=1)]

val = [accuracy(graphdef, p, x_val, y_val) for p in candidates]
best = int(np.argmax(val))
greedy = jaxmerge.greedy_soup(candidates, lambda p: accuracy(graphdef, p, x_val, y_val))
rows = {
    f"best single (#{best})": candidates[best],
    "uniform soup": jaxmerge.uniform_soup(candidates),
    f"greedy soup {list(greedy.indices)}": greedy.params,
}
print(f"{'model':<30}{'val':>8}{'test':>8}")
for label, params in rows.items():
    scores = [accuracy(graphdef, params, x, y) for x, y in ((x_val, y_val), (x_test, y_test))]
    print(f"{label:<30}" + "".join(f"{score:>8.4f}" for score in scores))
