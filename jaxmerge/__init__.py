"""jaxmerge: model merging and weight averaging for JAX, as pure functions over pytrees.

Every public name is importable from here (``jaxmerge.ties``, ``jaxmerge.ema``,
``jaxmerge.checkpoints``); each is loaded on first use, so that ``import jaxmerge`` and the
``jaxmerge`` command start fast and load only what they need (no Orbax for an in-memory
merge, no SciPy without permutation alignment).
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"checkpoints": "jaxmerge.checkpoints", "coefficients": "jaxmerge.coefficients",
               "federated": "jaxmerge.federated",
               "lora": "jaxmerge.lora", "moe": "jaxmerge.moe",
               "sparsify": "jaxmerge.merging.sparsify"}
_MODULES = {  # the module that defines each public name
    "jaxmerge._hyper": ["layer_positions", "per_model"],
    "jaxmerge.alignment": [
        "PermutationSpec", "activation_matching", "align", "apply_permutation", "cnn_permutation_spec",
        "matched_average", "mlp_permutation_spec", "llama_permutation_spec", "ot_fusion", "pleas", "random_permutation", "repair", "ste_matching",
        "transformer_block_permutation_spec", "transport", "weight_matching",
    ],
    "jaxmerge.analysis": [
        "barrier", "interpolation_curve", "layerwise_barriers", "plot_interpolation", "plot_layer_barriers",
        "plot_similarity", "sign_conflict_rate", "task_vector_similarity",
    ],
    "jaxmerge.averaging._wrapper": ["averaged_params"],
    "jaxmerge.averaging.bema": ["bema"],
    "jaxmerge.averaging.ema": ["ema", "ema_warmup", "scale_ema_decay"],
    "jaxmerge.averaging.lawa": ["lawa"],
    "jaxmerge.averaging.power_ema": ["post_hoc_ema", "power_ema", "power_ema_snapshot"],
    "jaxmerge.averaging.swa": ["swa", "update_batch_stats"],
    "jaxmerge.averaging.wsm": ["checkpoint_merge_weights"],
    "jaxmerge.checks": ["checked"],
    "jaxmerge.errors": ["CheckpointError", "ConfigError", "JaxmergeError"],
    "jaxmerge.merging": ["MergePlan", "methods", "plan"],
    "jaxmerge.merging.arcee_fusion": ["arcee_fusion"],
    "jaxmerge.merging.fisher": ["fisher_merge"],
    "jaxmerge.merging.karcher": ["karcher"],
    "jaxmerge.merging.linear": ["average", "lerp"],
    "jaxmerge.merging.magmax": ["magmax"],
    "jaxmerge.merging.model_stock": ["model_stock"],
    "jaxmerge.merging.nearswap": ["nearswap"],
    "jaxmerge.merging.passthrough": ["passthrough"],
    "jaxmerge.merging.ram": ["ram", "ramplus_tl"],
    "jaxmerge.merging.regmean": ["regmean", "regmean_plus_plus"],
    "jaxmerge.merging.sce": ["sce"],
    "jaxmerge.merging.slerp": ["multislerp", "nuslerp", "slerp"],
    "jaxmerge.merging.task_vectors": [
        "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear", "task_arithmetic",
        "ties",
    ],
    "jaxmerge.soups": ["category_expert_soup", "greedy_soup", "uniform_soup"],
    "jaxmerge.statistics.fisher": ["diagonal_fisher"],
    "jaxmerge.statistics.gram": ["input_grams"],
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'jaxmerge' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
