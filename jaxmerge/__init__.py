"""jaxmerge: model merging and weight averaging for JAX, as pure functions over pytrees."""

from jaxmerge import checkpoints
from jaxmerge._hyper import layer_positions, per_model
from jaxmerge.alignment import (
    PermutationSpec,
    align,
    apply_permutation,
    cnn_permutation_spec,
    mlp_permutation_spec,
    random_permutation,
    transformer_block_permutation_spec,
    weight_matching,
)
from jaxmerge.analysis import (
    barrier,
    interpolation_curve,
    plot_interpolation,
    plot_similarity,
    sign_conflict_rate,
    task_vector_similarity,
)
from jaxmerge.averaging._wrapper import averaged_params
from jaxmerge.averaging.bema import bema
from jaxmerge.averaging.ema import ema, ema_warmup, scale_ema_decay
from jaxmerge.averaging.lawa import lawa
from jaxmerge.averaging.power_ema import post_hoc_ema, power_ema, power_ema_snapshot
from jaxmerge.averaging.swa import swa, update_batch_stats
from jaxmerge.averaging.wsm import checkpoint_merge_weights
from jaxmerge.errors import CheckpointError, ConfigError, JaxmergeError
from jaxmerge.merging import MergePlan, methods, plan, sparsify
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
from jaxmerge.soups import category_expert_soup, greedy_soup, uniform_soup
from jaxmerge.statistics.fisher import diagonal_fisher
from jaxmerge.statistics.gram import input_grams

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "JaxmergeError",
    "MergePlan",
    "PermutationSpec",
    "align",
    "apply_permutation",
    "average",
    "averaged_params",
    "barrier",
    "bema",
    "breadcrumbs",
    "breadcrumbs_ties",
    "category_expert_soup",
    "checkpoint_merge_weights",
    "checkpoints",
    "cnn_permutation_spec",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "diagonal_fisher",
    "ema",
    "ema_warmup",
    "fisher_merge",
    "greedy_soup",
    "input_grams",
    "interpolation_curve",
    "karcher",
    "lawa",
    "layer_positions",
    "lerp",
    "magmax",
    "methods",
    "mlp_permutation_spec",
    "model_stock",
    "per_model",
    "plan",
    "plot_interpolation",
    "plot_similarity",
    "post_hoc_ema",
    "power_ema",
    "power_ema_snapshot",
    "random_permutation",
    "regmean",
    "regmean_plus_plus",
    "scale_ema_decay",
    "sce",
    "sign_conflict_rate",
    "slerp",
    "sparsify",
    "swa",
    "task_arithmetic",
    "task_vector_similarity",
    "ties",
    "transformer_block_permutation_spec",
    "uniform_soup",
    "update_batch_stats",
    "weight_matching",
]
