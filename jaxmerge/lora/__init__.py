"""LoRA adapters: PEFT's format in and out, merged with PEFT's combination types, KnOTS or
reversibly, applied to a base model, and extracted from a fine-tuned one."""

from jaxmerge.lora.adapter import Adapter, LoraLayer, delta_weight, load_adapter, lora_config, save_adapter
from jaxmerge.lora.apply import apply_adapter, merge_adapter
from jaxmerge.lora.combine import COMBINATION_TYPES, add_weighted_adapter
from jaxmerge.lora.extract import Extraction, extract_layer, extract_lora
from jaxmerge.lora.knots import knots
from jaxmerge.lora.reversible import ReversibleMerge, recover, reversible_merge

__all__ = [
           "COMBINATION_TYPES",
           "Adapter",
           "Extraction",
           "LoraLayer",
           "ReversibleMerge",
           "add_weighted_adapter",
           "apply_adapter",
           "delta_weight",
           "extract_layer",
           "extract_lora",
           "knots",
           "load_adapter",
           "lora_config",
           "merge_adapter",
           "recover",
           "reversible_merge",
           "save_adapter",
]
