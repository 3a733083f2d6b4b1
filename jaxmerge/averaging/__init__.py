"""Training-time weight averaging as optax wrappers, and the averaged parameters they keep."""
