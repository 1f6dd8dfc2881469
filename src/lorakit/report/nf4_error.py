"""`lorakit report --quantize nf4`: the error NF4 makes on each weight it stores (QLoRA's base), per module.

    relative error = ||W - NF4⁻¹(NF4(W))||_F / ||W||_F

with lorakit's NF4 (blocks of 64, double quantisation of the block scales), for every linear `lorakit.load_model(...,
quantize="nf4")` stores in NF4 (all nn.Linear but the output head and a classification head). W is the
checkpoint's weight at the --dtype it is loaded in. One module at a time: one dequantised copy of one weight is
alive at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def nf4_relative_error(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> float | None:
    """||W - deq(q(W))||_F / ||W||_F for one weight (None for an all-zero weight, whose error is 0 of 0)."""
    from ..quant.nf4 import dequantize_nf4, quantize_nf4

    exact = weight.detach().float()
    norm = float(torch.linalg.vector_norm(exact, dtype=torch.float64))
    if norm == 0.0:
        return None
    back = dequantize_nf4(quantize_nf4(exact, blocksize, double_quant), torch.float32)
    return float(torch.linalg.vector_norm(exact - back, dtype=torch.float64)) / norm


def nf4_errors(model: nn.Module) -> dict[str, float | None]:
    """{module path: relative NF4 error} for each weight lorakit's NF4 loading would quantise (report/plan_model's
    quantizable_weights: the same rule), in module order."""
    from .plan_model import quantizable_weights

    names = quantizable_weights(model)
    return {path: nf4_relative_error(module.weight) for path, module in model.named_modules()
            if f"{path}.weight" in names}


def nf4_error_data(model_dir: str, dtype: str | None, task: str | None) -> dict[str, Any]:
    """{"modules": {path: error}, "heatmap": layers x module types grid, "mean", "max"} for the model in
    `model_dir`, loaded unquantised at `dtype`.

    Raises:
        ModelDirError: a bad model directory or ID.
    """
    from ..hf import load_model_dir
    from .grid import heatmap_grid

    model, _ = load_model_dir(model_dir, task=task, dtype=dtype, with_tokenizer=False)
    errors = nf4_errors(model)
    del model
    values = [v for v in errors.values() if v is not None]
    return {"modules": errors, "heatmap": heatmap_grid(errors),
            "mean": sum(values) / len(values) if values else None, "max": max(values, default=None)}
