"""`lorakit report`'s memory section: `lorakit plan`'s estimate for a run's own settings (its train_config.yaml)
next to the peak memory the run measured (memory.json, written by `lorakit train` and the demo:
lorakit.train.memory).

The measured figure is the growth of the process's resident set from before the model was loaded to its peak
(on a GPU: the peak of allocated CUDA memory), so it also holds what the plan does not model: the tokenizer and the
data, evaluation, saving, the allocator's slack and short-lived tensors. tests/report/test_plan.py bounds the plan
against a measured training step alone (0.78-0.96 of it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LorakitError

PLANNED_METHODS = ("lora", "dora", "lora_fa", "delta_lora", "full")  # rank-r factors on the targets, or every weight


def plan_rows(plan: Any, method: str) -> list[tuple[str, int]]:
    """(what, bytes) rows of a Plan for `method`: LoRA-style (base, adapter, gradients, AdamW, activations) or, for
    full fine-tuning, the plan's full_finetune figures; the last row is the total."""
    if method == "full":
        full = plan.full_finetune
        return [("weights (all trained)", full["weights"]), ("gradients", full["gradients"]),
                ("AdamW moments (fp32)", full["adamw"]), ("activations (estimate)", full["activations"]),
                ("total", full["total"])]
    base = "base weights (NF4)" if plan.quantize == "nf4" else f"base weights ({plan.dtype})"
    return [(base, plan.base), ("adapter (fp32)", plan.adapter), ("adapter gradients", plan.gradients),
            ("AdamW moments (fp32)", plan.adamw), ("activations (estimate)", plan.activations), ("total", plan.total)]


def measured_bytes(measured: dict[str, Any]) -> tuple[int | None, str]:
    """The figure to set against the plan, and what it is: peak CUDA memory on a GPU run, else the growth of the
    resident set (peak - resident size before loading)."""
    if isinstance(measured.get("peak_gpu_bytes"), int) and measured["peak_gpu_bytes"] > 0:
        return measured["peak_gpu_bytes"], "peak allocated GPU memory"
    growth = measured.get("peak_rss_growth_bytes")
    return (growth if isinstance(growth, int) else None), "peak resident memory growth (RAM) of the process"


def plan_vs_measured(run_dir: str | Path) -> dict[str, Any] | None:
    """{"measured", "measured_bytes", "measured_what", "rows", "plan_total", "ratio", "settings", "note"} for a run
    with memory.json; None for a run without it (an older run, or one stopped before the end). The plan is made
    from the run's train_config.yaml (model config only, nothing loaded); when it cannot be made (a method the plan
    does not model, a model no longer there) "rows" is empty and "note" says why."""
    from ..train.memory import read_memory_json

    run = Path(run_dir)
    measured = read_memory_json(run)
    if measured is None:
        return None
    value, what = measured_bytes(measured)
    found: dict[str, Any] = {"measured": measured, "measured_bytes": value, "measured_what": what, "rows": [],
                             "plan_total": None, "ratio": None, "settings": None, "note": ""}
    try:
        plan, method, settings = _plan_for(run)
    except (LorakitError, OSError) as err:
        found["note"] = f"no plan: {err}"
        return found
    found["settings"] = settings
    if plan is None:
        found["note"] = f"no plan: `lorakit plan` models LoRA-style factors and full fine-tuning, not {method!r}"
        return found
    found["rows"] = [[name, nbytes] for name, nbytes in plan_rows(plan, method)]
    found["plan_total"] = found["rows"][-1][1]
    if value:
        found["ratio"] = found["plan_total"] / value
    return found


def _plan_for(run: Path) -> tuple[Any, str, dict[str, Any]]:
    """(Plan or None, method, the settings used) for the run's train_config.yaml.

    Raises:
        ConfigError / ModelDirError / TargetError: no or a bad train_config.yaml, a model that is not there.
    """
    from ..errors import ConfigError
    from ..train.config import TrainConfig
    from .plan_model import plan_model

    path = run / "train_config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run} has no train_config.yaml")
    cfg = TrainConfig.from_sources(str(path), {})
    if cfg.model is None:
        raise ConfigError(f"{path} names no model")
    settings = {"model": cfg.model, "method": cfg.method, "r": cfg.r, "target_modules": cfg.target_modules,
                "dtype": cfg.dtype, "quantize": cfg.quantize, "batch": cfg.per_device_train_batch_size,
                "seq_len": cfg.max_length, "task": cfg.task}
    if cfg.method not in PLANNED_METHODS:
        return None, cfg.method, settings
    plan = plan_model(cfg.model, r=cfg.r, target_modules=cfg.target_modules, dtype=cfg.dtype or "auto",
                      quantize=cfg.quantize, batch=cfg.per_device_train_batch_size, seq_len=cfg.max_length,
                      task=cfg.task)
    return plan, cfg.method, settings
