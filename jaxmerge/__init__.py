"""jaxmerge: model merging and weight averaging for JAX, as pure functions over pytrees."""

from jaxmerge._hyper import layer_positions, per_model
from jaxmerge.averaging._wrapper import averaged_params
from jaxmerge.averaging.bema import bema
from jaxmerge.averaging.ema import ema, ema_warmup, scale_ema_decay
from jaxmerge.averaging.lawa import lawa
from jaxmerge.averaging.power_ema import post_hoc_ema, power_ema, power_ema_snapshot
from jaxmerge.averaging.swa import swa, update_batch_stats
from jaxmerge.averaging.wsm import checkpoint_merge_weights
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
    "averaged_params",
    "bema",
    "breadcrumbs",
    "breadcrumbs_ties",
    "checkpoint_merge_weights",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "diagonal_fisher",
    "ema",
    "ema_warmup",
    "fisher_merge",
    "input_grams",
    "karcher",
    "lawa",
    "layer_positions",
    "lerp",
    "magmax",
    "model_stock",
    "per_model",
    "post_hoc_ema",
    "power_ema",
    "power_ema_snapshot",
    "regmean",
    "regmean_plus_plus",
    "scale_ema_decay",
    "sce",
    "slerp",
    "sparsify",
    "swa",
    "task_arithmetic",
    "ties",
    "update_batch_stats",
]
