"""Permutation alignment (Git Re-Basin): specs of which axes share a permutation, weight
matching, activation matching, straight-through estimator matching, applying permutations,
matched averaging of N models, optimal-transport fusion of
models of different widths, PLeaS, and REPAIR."""

from jaxmerge.alignment.activations import activation_matching
from jaxmerge.alignment.llama import llama_permutation_spec
from jaxmerge.alignment.matched_average import matched_average
from jaxmerge.alignment.matching import align, apply_permutation, weight_matching
from jaxmerge.alignment.pleas import pleas
from jaxmerge.alignment.repair import repair
from jaxmerge.alignment.spec import (
    PermutationSpec,
    cnn_permutation_spec,
    mlp_permutation_spec,
    random_permutation,
    transformer_block_permutation_spec,
)
from jaxmerge.alignment.ste import ste_matching
from jaxmerge.alignment.transport import ot_fusion, transport

__all__ = [
    "PermutationSpec",
    "activation_matching",
    "align",
    "apply_permutation",
    "cnn_permutation_spec",
    "llama_permutation_spec",
    "matched_average",
    "mlp_permutation_spec",
    "ot_fusion",
    "pleas",
    "random_permutation",
    "repair",
    "ste_matching",
    "transformer_block_permutation_spec",
    "transport",
    "weight_matching",
]
