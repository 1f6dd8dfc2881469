"""`lorakit experiment magnitude-direction`: the DoRA paper's weight decomposition analysis (Liu et al. 2024, arXiv
2402.09353, section 2.2 and figure 2) for full fine-tuning, LoRA and DoRA on one task.

A weight W (d x k) is a magnitude and a direction per output row: W_i = M_i · V_i / ||V_i||. lorakit's DoRA (as PEFT's)
normalises per output row of the weight (the paper writes the norm per column of its W in R^{d x k}; PEFT's row of
an nn.Linear weight is that vector). Per adapted module and checkpoint t, against the start W0:

    ΔM(t) = (1/d) Σ_i |M_i(t) - ||W0_i|| |        ΔD(t) = (1/d) Σ_i (1 - cos(W_i(t), W0_i))

with W(t) = W0 + s B A for LoRA, m ⊙ (W0 + s B A) / ||W0 + s B A||_row for DoRA (its trained magnitude m; both from
the factors: lorakit.ops.dora.lowrank_magnitude_direction) and the dense weight for full fine-tuning
(ops.dora.row_magnitude_direction), all in float64. The values are recorded by a training callback at every
checkpoint step (the weights a checkpoint would hold: no full-model checkpoint files are written). The paper's
finding: ΔM and ΔD correlate positively for LoRA, negatively for full fine-tuning, and DoRA resembles full
fine-tuning. What is reported is what was measured: Pearson's r and Spearman's ρ of (ΔD, ΔM) over layers x
checkpoints (as the paper's figure pools them), the same within checkpoints (each step's mean taken out: both grow
with training, which alone makes a pooled correlation positive) and across layers at the last step.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import torch

from ..train.callbacks import Callback, StepOutput
from . import spectra as S
from .cells import CellStore, Progress, run_cell
from .charts import scatter_chart
from .core import Task, train_run
from .lora_vs_full import checkpoint_every, module_type, weight_rows
from .output import write_outputs

NAME = "magnitude-direction"
DESCRIPTION = ("DoRA's Delta M / Delta D per layer over checkpoints for full fine-tuning, LoRA and DoRA, with their "
               "correlations")
METHODS = ("lora", "dora", "full")  # LoRA first: its adapted modules are the ones measured for every method
LABELS = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning"}
RANK = 8
CHECKPOINTS, QUICK_CHECKPOINTS = 8, 4


def layer_changes(dm: torch.Tensor, dd: torch.Tensor) -> tuple[float, float, float]:
    """(ΔM, ΔD, signed ΔM) of one layer from its per-row changes: mean |ΔM_i|, mean ΔD_i, mean ΔM_i."""
    return float(dm.abs().mean()), float(dd.mean()), float(dm.mean())


class MagnitudeDirectionRecorder(Callback):
    """At every `every` steps and the last, (ΔM, ΔD) of each measured module against its start.

    Adapted modules (LoRA / DoRA): W0 is the frozen base weight, W(t) comes from the factors (and DoRA's magnitude).
    Other modules (full fine-tuning): `paths`, whose start weights are copied when training begins.
    """

    def __init__(self, every: int, paths: list[str] | None = None) -> None:
        self.every, self.paths = every, paths
        self.start: dict[str, torch.Tensor] = {}  # full fine-tuning: W0 rows of `paths`
        self.layers: dict[str, Any] = {}  # LoRA / DoRA: the adapted layers by path
        self.points: list[dict[str, Any]] = []

    def on_train_begin(self, trainer: Any) -> None:
        from ..model import lora_layers

        self.layers = {layer.path: layer for layer in lora_layers(trainer.model)}
        if not self.layers:
            self.start = {p: weight_rows(trainer.model, p).detach().to("cpu", torch.float64, copy=True)
                          for p in self.paths or []}

    def on_step_end(self, trainer: Any, out: StepOutput) -> None:
        if out.step % self.every == 0 or out.step == trainer.total_steps:
            self.record(trainer.model, out.step)

    def record(self, model: torch.nn.Module, step: int) -> None:
        """Append one point per module for `step`."""
        from ..ops.dora import lowrank_magnitude_direction, row_magnitude_direction

        changes = {}
        with torch.no_grad():
            for path, layer in self.layers.items():
                adapter = next(iter(layer.adapters.values()))
                w0 = layer.base_layer.weight.detach().to("cpu", torch.float64)
                magnitude = getattr(adapter, "lora_magnitude_vector", None)  # DoRA's trained m (PEFT's key)
                changes[path] = lowrank_magnitude_direction(
                    w0, layer.kind.weight_layout, adapter.lora_A.detach().to("cpu", torch.float64),
                    adapter.lora_B.detach().to("cpu", torch.float64), adapter.scale,
                    None if magnitude is None else magnitude.detach().to("cpu", torch.float64))
            for path, w0 in self.start.items():  # (d, k') rows: the layout is already "dk"
                changes[path] = row_magnitude_direction(w0, weight_rows(model, path).detach().to("cpu", torch.float64))
        for path, (dm, dd) in changes.items():
            m, d, signed = layer_changes(dm, dd)
            self.points.append({"step": step, "module": path, "type": module_type(path), "delta_m": m,
                                "delta_d": d, "delta_m_signed": signed})


def method_cell(task: Task, method: str, seed: int, every: int, paths: list[str] | None,
                run_dir: Path) -> dict[str, Any]:
    """One run of `method` with the recorder; its metric and points."""
    recorder = MagnitudeDirectionRecorder(every, paths)
    run = train_run(task, method, seed=seed, out_dir=run_dir, r=RANK, callbacks=[recorder])
    run.release()
    return {"method": method, "seed": seed, "metric": run.metric, "metrics": run.metrics, "trainable": run.trainable,
            "total": run.total, "seconds": run.seconds, "modules": sorted({p["module"] for p in recorder.points}),
            "points": recorder.points}


MIN_POINTS = 3  # a correlation of 2 points is always +-1: None below 3


def _corr(fn: Any, xs: list[float], ys: list[float]) -> float | None:
    return fn(xs, ys) if len(xs) >= MIN_POINTS else None


def correlations(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Pearson and Spearman of (ΔD, ΔM) pooled over the points, Pearson within checkpoints (each (seed, step)'s
    mean taken out) and Pearson / Spearman across layers at the last step, with the numbers of points; None where
    undefined (fewer than MIN_POINTS points, or a constant coordinate)."""
    dd, dm = [p["delta_d"] for p in points], [p["delta_m"] for p in points]
    steps = [(p["seed"], p["step"]) for p in points]
    last = max((p["step"] for p in points), default=None)
    final = [p for p in points if p["step"] == last]
    fd, fm = [p["delta_d"] for p in final], [p["delta_m"] for p in final]
    within = _corr(S.pearson, S.centred_within(dd, steps), S.centred_within(dm, steps))
    return {"points": len(points), "pearson": _corr(S.pearson, dd, dm), "spearman": _corr(S.spearman, dd, dm),
            "within_checkpoint_pearson": within if len(points) - len(set(steps)) >= MIN_POINTS - 1 else None,
            "final_step": last, "final_points": len(final), "final_pearson": _corr(S.pearson, fd, fm),
            "final_spearman": _corr(S.spearman, fd, fm),
            "mean_delta_m": sum(dm) / len(dm) if dm else None, "mean_delta_d": sum(dd) / len(dd) if dd else None}


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: correlations over all its points (every seed) and per module type."""
    out: dict[str, Any] = {}
    types = list(dict.fromkeys(p["type"] for c in cells for p in c["points"]))  # the first run's order
    for method in METHODS:
        points = [p | {"seed": c["seed"]} for c in cells if c["method"] == method for p in c["points"]]
        out[method] = {"all": correlations(points),
                       "by_type": {t: correlations([p for p in points if p["type"] == t]) for t in types
                                   if any(p["type"] == t for p in points)},
                       "metric": [c["metric"] for c in cells if c["method"] == method]}
    return out


def _num(value: float | None, spec: str = "+.3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def format_table(summary: dict[str, Any]) -> str:
    """One row per method over all modules, then per module type."""
    rows = ["| method | modules | points | Pearson r(ΔD, ΔM) | Spearman ρ | within-checkpoint r | last step r "
            "(layers) | mean ΔM | mean ΔD |", "|" + "---|" * 9]
    for method in METHODS:
        groups = [("all", summary[method]["all"]), *summary[method]["by_type"].items()]
        for name, c in groups:
            rows.append(f"| {LABELS[method]} | {name} | {c['points']} | {_num(c['pearson'])} | "
                        f"{_num(c['spearman'])} | {_num(c['within_checkpoint_pearson'])} | "
                        f"{_num(c['final_pearson'])} (n={c['final_points']}) | {_num(c['mean_delta_m'], '.3g')} | "
                        f"{_num(c['mean_delta_d'], '.3g')} |")
    return "\n".join(rows)


def describe(summary: dict[str, Any], metric: str) -> str:
    """The measured signs beside the paper's claim."""
    lines = ["The DoRA paper: LoRA's ΔM and ΔD correlate positively, full fine-tuning's negatively, DoRA's like full "
             "fine-tuning's. Measured here (Pearson over layers x checkpoints; within checkpoints):"]
    for method in METHODS:
        c = summary[method]["all"]
        scores = ", ".join(f"{v:.4f}" for v in summary[method]["metric"])
        lines.append(f"{LABELS[method]}: r = {_num(c['pearson'])}, within checkpoints {_num(c['within_checkpoint_pearson'])} "
                     f"({c['points']} points); {metric} {scores}")
    return "\n".join(lines)


def sections(cells: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One scatter per method: ΔD (x) against ΔM (y), one colour per checkpoint step."""
    out = []
    for method in METHODS:
        groups: dict[str, Any] = {}  # "step N" -> [[ΔD, ΔM], ...]
        for cell in cells:
            if cell["method"] == method:
                for p in sorted(cell["points"], key=lambda p: p["step"]):
                    groups.setdefault(f"step {p['step']}", []).append([p["delta_d"], p["delta_m"]])
        out.append((f"{LABELS[method]}: ΔD against ΔM", scatter_chart(
            groups, f"{LABELS[method]}: each point one layer at one checkpoint", x_label="ΔD (mean 1 - cos per row)",
            y_label="ΔM (mean |Δ row norm|)")))
    return out


def run(task: Task, out_dir: Path, quick: bool, seeds: int | None, store: CellStore,
        progress_stream: TextIO | None = None) -> dict[str, Any]:
    """LoRA, DoRA and full fine-tuning per seed (1 by default) with the recorder; writes results.json, table.md and
    page.html into out_dir and returns the results."""
    seed_list = list(range(seeds if seeds is not None else 1))
    steps = int(task.settings["steps"])
    every = checkpoint_every(steps, QUICK_CHECKPOINTS if quick else CHECKPOINTS)
    progress = Progress(len(METHODS) * len(seed_list), NAME, progress_stream)
    cells: list[dict[str, Any]] = []
    for seed in seed_list:
        paths: list[str] | None = None
        for method in METHODS:
            key = f"{method}-seed{seed}"
            cell = run_cell(store, progress, key, f"{LABELS[method]} seed {seed}",
                            partial(method_cell, task, method, seed, every, paths, out_dir / "runs" / key),
                            note=lambda c: f"{task.metric} {c['metric']:.4f}, {len(c['points'])} points")
            paths = paths or cell["modules"]
            cells.append(cell)
    summary = summarize(cells)
    results = {"methods": list(METHODS), "r": RANK, "lora_alpha": task.settings["lora_scale"] * RANK,
               "seeds": seed_list, "steps": steps, "checkpoint_every": every, "summary": summary, "cells": cells,
               "definitions": {
                   "delta_m": "mean over output rows i of |M_i(t) - ||W0_i|| |, M_i(t) = ||W_i(t)|| (DoRA: m_i)",
                   "delta_d": "mean over output rows i of 1 - cos(W_i(t), W0_i)",
                   "rows": "per output row of the weight, as lorakit's and PEFT's DoRA normalise",
                   "within_checkpoint_pearson": "Pearson of (dD, dM) after subtracting each checkpoint's mean"}}
    write_outputs(out_dir, NAME, task, results, format_table(summary), sections(cells),
                  summary=describe(summary, task.metric))
    return results


__all__ = ["DESCRIPTION", "METHODS", "MagnitudeDirectionRecorder", "NAME", "correlations", "format_table",
           "layer_changes", "run", "summarize"]
