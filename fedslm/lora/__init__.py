"""LoRA: PEFT wrapping and the adapter state that leaves a node."""

from fedslm.lora.adapter import (
    adapter_meta,
    get_adapter_state,
    load_adapter,
    read_adapter_meta,
    save_adapter,
    set_adapter_state,
    trainable_parameters,
    wrap,
)

__all__ = ["adapter_meta", "get_adapter_state", "load_adapter", "read_adapter_meta", "save_adapter",
           "set_adapter_state", "trainable_parameters", "wrap"]
