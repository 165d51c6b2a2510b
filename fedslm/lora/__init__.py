"""LoRA: PEFT wrapping and the adapter state that leaves a node."""

from fedslm.lora.adapter import (
    get_adapter_state,
    load_adapter,
    save_adapter,
    set_adapter_state,
    trainable_parameters,
    wrap,
)

__all__ = ["get_adapter_state", "load_adapter", "save_adapter", "set_adapter_state", "trainable_parameters", "wrap"]
