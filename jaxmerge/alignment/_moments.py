"""Running per-unit statistics of activations over batches (float64, on the host)."""

from __future__ import annotations

import numpy as np


class Moments:
    """Running sums of a set of units' activations, for their means and standard deviations.

    Examples:
      >>> m = Moments()
      >>> m.add(np.asarray([[1.0, 0.0], [3.0, 0.0]]))
      >>> m.mean.tolist(), m.std.tolist()
      ([2.0, 0.0], [1.0, 0.0])
    """

    def __init__(self):
        self.rows, self.first, self.second = 0, 0.0, 0.0

    def add(self, z: np.ndarray) -> None:
        """Count the rows of ``z`` (``(rows, units)``)."""
        z = np.asarray(z, np.float64)
        self.rows += len(z)
        self.first = self.first + z.sum(0)
        self.second = self.second + (z * z).sum(0)

    @property
    def mean(self) -> np.ndarray:
        return self.first / self.rows

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.second / self.rows - self.mean ** 2, 0.0))
