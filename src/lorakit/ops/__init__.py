"""Pure tensor functions: no nn.Module state. Layers and variants only arrange calls to these."""

from .lora import (
    init_lora_A,
    lora_delta_weight,
    lora_linear,
    lora_linear_add,
    lora_scaling,
)

__all__ = ["lora_linear", "init_lora_A", "lora_delta_weight", "lora_linear_add", "lora_scaling"]
