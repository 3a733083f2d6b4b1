"""Mixtures of experts from dense models (mergekit-moe's configs and layouts), routers from
prompts without PyTorch, and MergeME-style merging of the experts' shared tensors.

* :func:`load_moe_config` / :func:`build_moe` (``jaxmerge moe CONFIG OUTPUT_DIR``): a
  mergekit-moe config built into a Mixtral, Qwen2-MoE or Qwen3-MoE checkpoint.
* :func:`moe_from_dense`: the same in memory, from dicts of tensors.
* :func:`gate_vectors`, :class:`PromptTokenizer`, :func:`prompt_embedder`: router rows.
* :func:`merge_experts`: an existing mixture's experts merged into fewer.
* :mod:`jaxmerge.moe.transformer`: a JAX forward pass of these checkpoints.

References:
  Zhou et al., "MergeME: Model Merging Techniques for Homogeneous and Heterogeneous MoEs",
  arXiv 2502.00997.
"""

from jaxmerge.moe.build import ExpertScaling, Output, moe_from_dense, plan_moe
from jaxmerge.moe.config import Expert, MoeConfig, load_moe_config
from jaxmerge.moe.layouts import LAYOUTS, Layout, select_layout
from jaxmerge.moe.reduce import merge_experts
from jaxmerge.moe.routers import PromptTokenizer, gate_vectors, prompt_embedder
from jaxmerge.moe.write import build_moe

__all__ = ["LAYOUTS", "Expert", "ExpertScaling", "Layout", "MoeConfig", "Output", "PromptTokenizer", "build_moe",
           "gate_vectors", "load_moe_config", "merge_experts", "moe_from_dense", "plan_moe", "prompt_embedder", "select_layout"]
