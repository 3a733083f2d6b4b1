"""jaxmerge: model merging and weight averaging for JAX, as pure functions over pytrees."""

from jaxmerge._hyper import layer_positions
from jaxmerge.merging.linear import average, lerp, task_arithmetic
from jaxmerge.merging.slerp import slerp

__version__ = "0.1.0"

__all__ = [
    "average",
    "layer_positions",
    "lerp",
    "slerp",
    "task_arithmetic",
]
