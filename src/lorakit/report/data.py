"""The data of `lorakit report`'s page, as plain JSON-able dicts (page.py draws them).

From a run directory (`lorakit train --out`): the curves of metrics.jsonl (loss, learning rate, eval metrics and
the diagnostics over steps, with each layer's ||sBA||_F / ||W0||_F at the diagnostics steps), and the final adapter.
From an adapter directory alone (any PEFT LoRA adapter): per module the singular values of ΔW = s B A from the
factors (analysis.lowrank_singular_values: QR of B and Aᵀ, never the d x k matrix), effective rank, energy in the
top k, and the rank slider's table. For the truncation of ΔW to its top k singular directions (ΔW_k):

    energy kept       e_k = Σ_{i<=k} σ_i² / Σ_i σ_i²
    relative error    ||ΔW - ΔW_k||_F / ||ΔW||_F = sqrt(Σ_{i>k} σ_i² / Σ_i σ_i²) = sqrt(1 - e_k)
    Eckart-Young      min over rank-k M of ||ΔW - M||_F² = Σ_{i>k} σ_i²: the truncation attains the bound, so
                      the bound (relative) is the same number as the error.

With a base model (--model): ||W0||_F per module, the ratio ||sBA||_F / ||W0||_F (the heatmap over layers x
module types), and for a run the ratio at each checkpoint (W0 read once, the checkpoints' factors alone).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import AdapterFileError, ConfigError
from .grid import heatmap_grid, layer_and_type

CONFIG_NAME = "adapter_config.json"
RUN_MARKERS = ("metrics.jsonl", "adapter", "checkpoints", "train_config.yaml")


# -- pure math -------------------------------------------------------------------------------------------
def rank_k_table(singular_values: list[float]) -> list[dict[str, float | int | None]]:
    """Per k = 1..len(σ): energy kept Σ_{i<=k} σ_i² / Σ σ_i², the relative error of the rank-k truncation
    sqrt(Σ_{i>k} σ_i² / Σ σ_i²) and the Eckart-Young bound (the same number; see the module docstring).
    σ is sorted descending first. For an all-zero update every value is None (nothing to keep or lose)."""
    energy = sorted((float(s) ** 2 for s in singular_values), reverse=True)
    total = math.fsum(energy)
    rows: list[dict[str, float | int | None]] = []
    for k in range(1, len(energy) + 1):
        if total <= 0.0:
            rows.append({"k": k, "energy_kept": None, "rel_error": None, "bound": None})
            continue
        tail = math.fsum(energy[k:]) / total
        rows.append({"k": k, "energy_kept": math.fsum(energy[:k]) / total, "rel_error": math.sqrt(tail),
                     "bound": math.sqrt(tail)})
    return rows


# -- metrics.jsonl ---------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (a torn last line, from a killed run, is skipped).

    Raises:
        ConfigError: a line before the last that is not a JSON object (the line number is named).
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ConfigError(f"{path}: line {number} is not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curves(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Series [[step, value], ...] from metrics records: "loss", "lr", "eval" {metric: series}, "diagnostics"
    {summary name: series} and "update_ratio" {module: series} (each layer's ||sBA||_F / ||W0||_F)."""
    out: dict[str, Any] = {"loss": [], "lr": [], "grad_norm": [], "eval": {}, "diagnostics": {}, "update_ratio": {}}
    for rec in records:
        step = rec.get("step")
        if not _scalar(step):
            continue
        if "diagnostics" in rec:
            for name, value in (rec.get("diagnostics") or {}).items():
                if _scalar(value):
                    out["diagnostics"].setdefault(name, []).append([step, value])
            for module, layer in (rec.get("layers") or {}).items():
                if isinstance(layer, dict) and _scalar(layer.get("update_ratio")):
                    out["update_ratio"].setdefault(module, []).append([step, layer["update_ratio"]])
            continue
        for key in ("loss", "lr", "grad_norm"):
            if _scalar(rec.get(key)):
                out[key].append([step, rec[key]])
        for key, value in rec.items():
            if key.startswith("eval_") and _scalar(value):
                out["eval"].setdefault(key, []).append([step, value])
    return out


# -- gathering -------------------------------------------------------------------------------------------
def kind_of_dir(directory: Path) -> str:
    """"adapter" (adapter_config.json inside) or "run" (a `lorakit train` output).

    Raises:
        AdapterFileError: the directory is missing, or is neither (the expected files are named).
    """
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} does not exist or is not a directory")
    if (directory / CONFIG_NAME).is_file():
        return "adapter"
    if any((directory / name).exists() for name in RUN_MARKERS):
        return "run"
    subruns = sorted(p.name for p in directory.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file())
    hint = f"; its runs: {', '.join(subruns)} (give one of them)" if subruns else ""
    raise AdapterFileError(f"{directory} is neither an adapter directory ({CONFIG_NAME}) nor a training run "
                           f"(metrics.jsonl, adapter/){hint}")


def adapter_data(adapter_dir: Path, model_dir: str | None = None, dtype: str | None = "auto",
                 quantize: str | None = None) -> dict[str, Any]:
    """analysis.adapter_report of the adapter, each module with its rank-k table ("rank_k") and layer / type,
    plus "heatmap" (the ||sBA||_F / ||W0||_F grid; None without a model).

    Raises:
        AdapterFileError, ModelDirError, ShapeMismatchError: as analysis.adapter_report.
    """
    from ..analysis import adapter_report

    report = adapter_report(adapter_dir, model_dir=model_dir, dtype=dtype, quantize=quantize)
    for module in report["modules"]:
        module["rank_k"] = rank_k_table(module["singular_values"])
        module["layer"], module["type"] = layer_and_type(module["module"])
    ratios = {m["module"]: m["ratio_to_weight"] for m in report["modules"]}
    report["heatmap"] = heatmap_grid(ratios) if model_dir is not None else None
    return report


def checkpoint_ratios(run_dir: Path, weight_norms: dict[str, float | None]) -> dict[str, Any]:
    """||sBA||_F / ||W0||_F per module at each checkpoint of the run: {"steps": [...], "modules": {path: [ratio
    or None per step]}}; ||W0||_F comes from `weight_norms` (read once from the model), ΔW from the factors."""
    from ..analysis import adapter_report
    from ..train.rundir import checkpoints

    steps: list[int] = []
    modules: dict[str, list[float | None]] = {path: [] for path in weight_norms}
    for ckpt in checkpoints(run_dir):
        adapter = ckpt / "adapter"
        if not (adapter / CONFIG_NAME).is_file():
            continue
        norms = {m["module"]: m["delta_fro_norm"] for m in adapter_report(adapter)["modules"]}
        steps.append(int(ckpt.name.split("-")[-1]))
        for path, w_norm in weight_norms.items():
            delta = norms.get(path)
            modules[path].append(delta / w_norm if delta is not None and w_norm else None)
    return {"steps": steps, "modules": modules}


def gather(directory: str | Path, model_dir: str | None = None, dtype: str | None = "auto",
           quantize: str | None = None) -> dict[str, Any]:
    """Everything the page shows, JSON-able: {"kind", "source", "model_dir", "curves" (runs), "adapter" (None for
    a run without a LoRA adapter, e.g. full fine-tuning), "checkpoints" (runs with --model), "memory" (runs with
    memory.json: the plan against the measured peak, report/measured.py), "nf4" (with --model and --quantize nf4:
    the NF4 error per module, report/nf4_error.py), "demo" (the embedded demo's output directory: its table; the
    rest is then its first adapter run's), "model_from_run"}. DoRA modules carry "dora" (analysis.adapter_report).
    Without `model_dir`, a run's own model (train_config.yaml) is used when it is a local directory. `dtype` and
    `quantize` are how the model is loaded (analysis.adapter_report's).

    Raises:
        AdapterFileError: a missing directory, one that is neither a run nor an adapter, a bad adapter.
        ConfigError: a corrupt metrics.jsonl. ModelDirError / ShapeMismatchError: a bad or mismatched model.
    """
    from .demo_dir import demo_records, demo_summary, run_model, shown_method

    path = Path(directory)
    records = demo_records(path) if path.is_dir() else None
    if records is not None:  # the embedded demo's output: its table, then one method's run
        shown = shown_method(path, records)
        shown_run = gather(path / shown, model_dir, dtype, quantize)
        shown_run.update(kind="demo", source=str(path), demo=demo_summary(path, records, shown))
        return shown_run
    kind = kind_of_dir(path)
    own_model = run_model(path) if model_dir is None and kind == "run" else None
    model_from_run = own_model is not None
    if model_from_run:
        model_dir = own_model
    data: dict[str, Any] = {"kind": kind, "source": str(path), "model_dir": model_dir, "curves": None,
                            "adapter": None, "checkpoints": None, "memory": None, "nf4": None,
                            "model_from_run": model_from_run, "demo": None}
    if model_dir is not None and quantize == "nf4":
        from ..hf import adapter_task
        from .nf4_error import nf4_error_data

        adapter_dir = path if kind == "adapter" else path / "adapter"
        task = adapter_task(adapter_dir) if (adapter_dir / CONFIG_NAME).is_file() else None
        data["nf4"] = nf4_error_data(model_dir, dtype, task)
    if kind == "adapter":
        data["adapter"] = adapter_data(path, model_dir, dtype, quantize)
        return data
    from .measured import plan_vs_measured

    data["memory"] = plan_vs_measured(path)
    metrics = path / "metrics.jsonl"
    data["curves"] = curves(read_metrics(metrics)) if metrics.is_file() else None
    if (path / "adapter" / CONFIG_NAME).is_file():
        data["adapter"] = adapter_data(path / "adapter", model_dir, dtype, quantize)
        if model_dir is not None:
            norms = {m["module"]: m["weight_fro_norm"] for m in data["adapter"]["modules"]}
            data["checkpoints"] = checkpoint_ratios(path, norms)
    return data
