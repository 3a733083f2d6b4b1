"""LoRA adapters: PEFT's format in and out, merged with PEFT's combination types."""

from jaxmerge.lora.adapter import Adapter, LoraLayer, delta_weight, load_adapter, lora_config, save_adapter
from jaxmerge.lora.combine import COMBINATION_TYPES, add_weighted_adapter

__all__ = ["COMBINATION_TYPES", "Adapter", "LoraLayer", "add_weighted_adapter", "delta_weight", "load_adapter",
           "lora_config", "save_adapter"]
