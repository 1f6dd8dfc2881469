"""Reports on LoRA runs and models (issue 19): `plan` (the memory and storage arithmetic before training)."""

from .plan import Architecture, ModelShapes, Plan, lora_params, make_plan, nf4_bytes, savings_ratio

__all__ = ["Architecture", "ModelShapes", "Plan", "lora_params", "make_plan", "nf4_bytes", "savings_ratio"]
