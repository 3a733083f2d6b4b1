"""Train three MLPs on digits from one start, average them with jaxmerge, compare accuracy."""

import numpy as np
from common import accuracy, digits, init_mlp, train

import jaxmerge

x_train, y_train, x_test, y_test = digits()
graphdef, start = init_mlp(seed=0)

# Three fine-tunes of the same start, each on its own half of the training set and data order.
models = []
for seed in range(3):
    idx = (np.arange(len(x_train) // 2) + seed * len(x_train) // 3) % len(x_train)
    models.append(train(graphdef, start, x_train[idx], y_train[idx], seed=seed, learning_rate=3e-3))

merged = jaxmerge.average(models)

print(f"{'model':<12}{'test accuracy':>14}")
for i, params in enumerate(models):
    print(f"{f'model {i}':<12}{accuracy(graphdef, params, x_test, y_test):>14.4f}")
print(f"{'average':<12}{accuracy(graphdef, merged, x_test, y_test):>14.4f}")
