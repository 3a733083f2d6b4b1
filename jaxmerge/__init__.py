"""jaxmerge: model merging and weight averaging for JAX, as pure functions over pytrees."""

from jaxmerge._hyper import layer_positions, per_model
from jaxmerge.merging import sparsify
from jaxmerge.merging.fisher import fisher_merge
from jaxmerge.merging.karcher import karcher
from jaxmerge.merging.linear import average, lerp
from jaxmerge.merging.magmax import magmax
from jaxmerge.merging.model_stock import model_stock
from jaxmerge.merging.regmean import regmean, regmean_plus_plus
from jaxmerge.merging.sce import sce
from jaxmerge.merging.slerp import slerp
from jaxmerge.merging.task_vectors import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    task_arithmetic,
    ties,
)
from jaxmerge.statistics.fisher import diagonal_fisher
from jaxmerge.statistics.gram import input_grams

__version__ = "0.1.0"

__all__ = [
    "average",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "diagonal_fisher",
    "fisher_merge",
    "input_grams",
    "karcher",
    "layer_positions",
    "lerp",
    "magmax",
    "model_stock",
    "per_model",
    "regmean",
    "regmean_plus_plus",
    "sce",
    "slerp",
    "sparsify",
    "task_arithmetic",
    "ties",
]
