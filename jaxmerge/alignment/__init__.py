"""Permutation alignment (Git Re-Basin): specs of which axes share a permutation, weight
matching, activation matching, straight-through estimator matching, applying permutations,
matched averaging of N models, and REPAIR."""

from jaxmerge.alignment.activations import activation_matching
from jaxmerge.alignment.matched_average import matched_average
from jaxmerge.alignment.matching import align, apply_permutation, weight_matching
from jaxmerge.alignment.repair import repair
from jaxmerge.alignment.ste import ste_matching
from jaxmerge.alignment.spec import (
    PermutationSpec,
    cnn_permutation_spec,
    mlp_permutation_spec,
    random_permutation,
    transformer_block_permutation_spec,
)

__all__ = [
    "PermutationSpec",
    "activation_matching",
    "align",
    "apply_permutation",
    "cnn_permutation_spec",
    "matched_average",
    "mlp_permutation_spec",
    "random_permutation",
    "repair",
    "ste_matching",
    "transformer_block_permutation_spec",
    "weight_matching",
]
