"""`lorakit experiment variants`: the seeds' comparison table of lorakit's methods on one task (LoRA, DoRA, AdaLoRA,
VeRA, LoRA-FA, Delta-LoRA, full fine-tuning): trainable parameters (and % of the model), the metric (mean over
seeds), relative to full fine-tuning, wall time, peak memory and the size of what is saved. Each method trains
with lorakit.demo.family's settings (rank, alpha, dropout, options; DoRA and LoRA-FA as LoRA, VeRA r=256, AdaLoRA
12 -> 8, Delta-LoRA without dropout), for the task's number of steps at the task's learning rates."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from ..demo import family
from ..demo.settings import DemoSettings
from .cells import CellStore, Progress, run_cell
from .core import Task, train_run
from .fits import mean_std, relative
from .output import write_outputs

NAME = "variants"
DESCRIPTION = "lorakit's methods on one task: trainable parameters, quality, time, memory, adapter size"
METHODS = family.FAMILY  # lora, dora, adalora, vera, lora_fa, delta_lora, full
SEEDS, QUICK_SEEDS = 1, 1


def method_settings(method: str, steps: int, n_train: int, s: DemoSettings | None = None) -> dict[str, Any]:
    """r, lora_alpha, lora_dropout and method_options of `method` (family.plan's), with the schedules that count steps
    (AdaLoRA's tinit / tfinal / deltaT, Delta-LoRA's update_start_step) made for a run of `steps` steps."""
    s = s or DemoSettings()
    p = family.plan(method, s, n_train)
    options = dict(p.options)
    if method == "adalora":
        options = family.adalora_options(s, steps)
    elif method == "delta_lora":
        options["update_start_step"] = max(1, round(s.delta_start_fraction * steps))
    return {"r": p.r, "lora_alpha": p.lora_alpha, "lora_dropout": p.lora_dropout, "method_options": options,
            "label": family.label(method, s)}


def _dir_bytes(path: Path | None) -> int | None:
    if path is None or not path.exists():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _cell(task: Task, method: str, seed: int, out_dir: Path) -> dict[str, Any]:
    m = method_settings(method, task.settings["steps"], len(task.train_records))
    run = train_run(task, method, seed=seed, out_dir=out_dir, r=m["r"], lora_alpha=m["lora_alpha"],
                    lora_dropout=m["lora_dropout"], method_options=m["method_options"])
    run.release()
    return {"method": method, "label": m["label"], "seed": seed, "metric": run.metric, "metrics": run.metrics,
            "trainable": run.trainable, "total": run.total, "seconds": run.seconds,
            "peak_memory_bytes": run.peak_memory_bytes, "saved_bytes": _dir_bytes(run.saved_dir),
            "saved": run.saved_dir.name if run.saved_dir else None, "settings": {k: m[k] for k in m if k != "label"}}


def summarize(cells: list[dict[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """One row per method (in the order of the cells): the metric's mean and std over seeds, relative to full
    fine-tuning's mean, trainable parameters and their share, mean wall time, the largest peak memory, saved bytes."""
    methods = list(dict.fromkeys(c["method"] for c in cells))
    by = {m: [c for c in cells if c["method"] == m] for m in methods}
    full_mean = mean_std([c["metric"] for c in by["full"]])[0] if "full" in by else None
    rows = []
    for method in methods:
        runs = by[method]
        mean, std = mean_std([c["metric"] for c in runs])
        first = runs[0]
        rows.append({"method": method, "label": first["label"], "seeds": [c["seed"] for c in runs], "mean": mean,
                     "std": std, "vs_full": relative(mean, full_mean, higher_is_better),
                     "trainable": first["trainable"], "total": first["total"],
                     "trainable_percent": 100.0 * first["trainable"] / first["total"],
                     "seconds": sum(c["seconds"] for c in runs) / len(runs),
                     "peak_memory_bytes": max((c["peak_memory_bytes"] or 0) for c in runs) or None,
                     "saved_bytes": first["saved_bytes"], "saved": first["saved"]})
    return rows


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The comparison as a markdown table, one row per method."""
    out = [f"| method | trainable params | trainable % | {metric} | vs full FT | wall time | peak memory | saved size |",
           "|" + "---|" * 8]
    for row in rows:
        value = "n/a" if row["mean"] is None else f"{row['mean']:.4f}"
        if row["std"] is not None:
            value += f" ± {row['std']:.4f}"
        vs = "n/a" if row["vs_full"] is None else f"{100 * row['vs_full']:.1f}%"
        saved = _mib(row["saved_bytes"]) + (" (merged model)" if row["method"] == "delta_lora" else "")
        out.append(f"| {row['label']} | {row['trainable']:,} | {row['trainable_percent']:.3f}% | {value} | {vs} | "
                   f"{row['seconds']:.0f} s | {_mib(row['peak_memory_bytes'])} | {saved} |")
    return "\n".join(out)


def chart(rows: list[dict[str, Any]], metric: str) -> str:
    """The metric against trainable parameters (log axis), one dot per method."""
    from .charts import log_line_chart

    points = {row["label"]: [[row["trainable"], row["mean"]]] for row in rows
              if row["mean"] is not None and math.isfinite(row["mean"])}
    return log_line_chart({}, f"{metric} against trainable parameters", base=10.0, points=points,
                          x_label="trainable parameters (log axis)", y_label=metric, width=620)


def run(task: Task, out_dir: Path, quick: bool, seeds: int | None, store: CellStore,
        progress_stream: TextIO | None = None) -> dict[str, Any]:
    """Train each method for each seed (resumable cells), write results.json, table.md, page.html; return the rows."""
    seed_list = list(range(seeds if seeds is not None else (QUICK_SEEDS if quick else SEEDS)))
    progress = Progress(len(seed_list) * len(METHODS), NAME, progress_stream)
    cells = []
    for seed in seed_list:
        for method in METHODS:
            key = f"{method}-seed{seed}"
            cells.append(run_cell(store, progress, key, f"{family.DISPLAY[method]} seed {seed}",
                                  partial(_cell, task, method, seed, out_dir / "runs" / key),
                                  note=lambda c: f"{task.metric} {c['metric']:.4f}"))
    rows = summarize(cells, task.higher_is_better)
    table = format_table(rows, task.metric)
    fastest = min(rows, key=lambda row: row["seconds"])
    summary = (f"{task.settings['steps']} steps per run, seeds {seed_list}; wall time covers loading, training, "
               f"evaluation and saving (fastest: {fastest['label']}, {fastest['seconds']:.0f} s); peak memory "
               "is the process's resident set (CPU) or allocated GPU memory during the run.")
    results = {"methods": list(METHODS), "seeds": seed_list, "steps": task.settings["steps"], "rows": rows,
               "runs": cells}
    write_outputs(out_dir, NAME, task, results, table, [("Quality against trainable parameters",
                                                         chart(rows, task.metric))], summary=summary)
    return results


__all__ = ["DESCRIPTION", "METHODS", "NAME", "format_table", "method_settings", "run", "summarize"]
