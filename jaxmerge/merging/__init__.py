"""Post-hoc merges: one method family per module, each a leaf kernel plus a registered public function.

Importing this package imports every method module, so :data:`method.REGISTRY` holds every method.
"""

from jaxmerge.merging import (  # noqa: F401  (registers the methods)
    arcee_fusion,
    fisher,
    karcher,
    linear,
    magmax,
    model_stock,
    nearswap,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_vectors,
)
from jaxmerge.merging.method import REGISTRY, MergePlan, Method, Param, method, plan


def methods() -> dict[str, Method]:
    """Every merge method's record, by mergekit name, in alphabetical order.

    The records hold each method's hyperparameters (defaults, ranges, per-model or
    global), base policy and references; ``jaxmerge methods`` prints them.

    Returns:
      ``{name: Method}``.

    Examples:
      >>> import jaxmerge
      >>> "ties" in jaxmerge.methods() and jaxmerge.methods()["linear"].function is jaxmerge.average
      True
    """
    return dict(sorted(REGISTRY.items()))


__all__ = ["MergePlan", "Method", "Param", "method", "methods", "plan"]
