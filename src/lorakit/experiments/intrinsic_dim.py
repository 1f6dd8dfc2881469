"""`lorakit experiment intrinsic-dim`: train in a random d-dimensional subspace of the adapted weights and find d90,
the smallest d whose quality reaches 90% of full fine-tuning's (Li et al. 2018, arXiv 1804.08838; Aghajanyan et al.
2020, arXiv 2012.13255). The seeds' claim: d90 is far below the number of parameters.

Two subspaces (experiments/subspace.py), both over the weight matrices of the modules LoRA adapts on the task (D
values; embeddings, biases and LayerNorms stay frozen; a classification head trains in full, as lorakit's LoRA runs
train it, so d = 0 is "the head alone"):
  (a) lowrank:    LoRA with a frozen random B (orthonormal columns, seeded) and only A trained: d = Σ r k
  (b) projection: θ = θ0 + c P z, z ∈ R^d the only trained vector, P Fastfood (dense Gaussian for small D·d)
Each subspace run takes STEP_FACTORS times full fine-tuning's step length (subspace.subspace_gain). d90 is read off
the grid of d run (the smallest d of the grid whose mean over seeds reaches the target), so it is only as fine as the
grid; every run has the task's steps, so d90 is "within this training budget".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TextIO

from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..targeting import find_targets
from ..train.batching import evaluate
from ..train.data import load_datasets
from ..train.loop import HEAD_NAMES, resolve_device
from .cells import CellStore, Progress, run_cell
from .charts import log_line_chart
from .core import Task, learning_rate_for, run_config, train_run
from .fits import mean_std, relative
from .output import write_outputs
from .subspace import attach_subspace, freeze_random_b, lora_adapters, subspace_gain

NAME = "intrinsic-dim"
DESCRIPTION = ("training in a random d-dimensional subspace (frozen random B, or a projection of the whole update): "
               "quality vs d, d90")
RANKS, QUICK_RANKS = (1, 8), (1,)  # (a): d = r x (the adapted layers' input sizes summed)
DIMS, QUICK_DIMS = (100, 1000, 10000), (100, 1000)  # (b): d of z
SEEDS, QUICK_SEEDS = 2, 1
THRESHOLDS = (0.5, 0.75, 0.9, 0.95)  # d_threshold is reported at each; d90 is the one at 0.9
# The step length of a subspace run, as a multiple of full fine-tuning's (subspace.subspace_gain). Probed on the
# embedded default's --quick task (12 steps): (b) at d = 1,000 reached 77% / 85% accuracy at factors 10 / 100 (full
# fine-tuning 78%) and chance at 1000, also at d = 100; (a) at r = 1 reached 80% at 30 and chance at 100 (its
# low-rank steps follow the gradient more closely than random directions do, so they tolerate less). On the default
# task (48 steps, seed 0) factor 100 sent (b) at d = 10,000 to chance (15%); factor 30 gave 69.4% at d = 10,000 and
# 67.4% at d = 1,000, factor 10 65.5% at d = 10,000, and factor 300 at d = 100 chance again: 30 for both families.
STEP_FACTORS = {"lowrank": 30.0, "projection": 30.0}
FAMILIES = {"lowrank": "(a) frozen random B, A trained", "projection": "(b) random projection of the update"}
TOLERANCE = 1e-9  # relative: a metric equal to the target up to rounding reaches it (0.72 vs 0.9 x 0.8)


# -- d90: pure functions ---------------------------------------------------------------------------------
def threshold_target(reference: float, threshold: float, higher_is_better: bool = True,
                     baseline: float | None = None) -> float:
    """The metric a run must reach. Higher is better (accuracy), no baseline: threshold x reference (Li et al.: 90%
    of full fine-tuning's accuracy). With a baseline b (the untrained model's metric): b + threshold (reference - b),
    a share of full fine-tuning's improvement; for a loss (lower is better) the baseline is required: the target
    loss is b - threshold (b - reference).

    Raises:
        ConfigError: a loss metric without a baseline, or a threshold outside [0, 1].
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be a share in [0, 1], got {threshold}")
    if baseline is None:
        if not higher_is_better:
            raise ConfigError("a lower-is-better metric (a loss) needs the untrained model's value as the baseline: "
                              "the threshold is a share of full fine-tuning's improvement over it")
        return threshold * reference
    return baseline + threshold * (reference - baseline)


def reaches(value: float, target: float, higher_is_better: bool = True) -> bool:
    """value is at least as good as target (up to a relative TOLERANCE)."""
    slack = TOLERANCE * max(1.0, abs(target))
    return value >= target - slack if higher_is_better else value <= target + slack


def d_threshold(ds: list[int], metrics: list[float], reference: float, threshold: float = 0.9, *,
                higher_is_better: bool = True, baseline: float | None = None) -> int | None:
    """The smallest d in `ds` whose metric reaches threshold_target(reference, threshold, ...); None when none does,
    or when the reference is not better than the baseline (0 for accuracy without one: full fine-tuning learned
    nothing, there is no share of its gain to reach). A higher threshold never gives a smaller d: the target only
    gets harder, and the smallest d of a smaller set is no smaller.

    Raises:
        ConfigError: ds and metrics of different lengths; see threshold_target.
    """
    if len(ds) != len(metrics):
        raise ConfigError(f"d_threshold: {len(ds)} dimensions but {len(metrics)} metrics")
    target = threshold_target(reference, threshold, higher_is_better, baseline)
    floor = 0.0 if baseline is None else baseline  # the target grows with the threshold only above the floor
    if not (reference > floor if higher_is_better else reference < floor):
        return None
    reached = [d for d, m in zip(ds, metrics) if math.isfinite(m) and reaches(m, target, higher_is_better)]
    return min(reached) if reached else None


# -- the cells -------------------------------------------------------------------------------------------
def _heads(task: Task, model: nn.Module) -> tuple[str, ...]:
    return tuple(h for h in HEAD_NAMES if task.kind == "classification" and hasattr(model, h))


def target_paths(task: Task, model: nn.Module) -> list[str]:
    """The modules LoRA adapts on the task (task.settings["target_modules"]), heads left out."""
    heads = _heads(task, model)
    paths = find_targets(model, LoraConfig(r=1, target_modules=task.settings["target_modules"]))
    return [p for p in paths if p.split(".")[0] not in heads]


def _record(run: Any, **extra: Any) -> dict[str, Any]:
    out = {"metric": run.metric, "metrics": run.metrics, "trainable": run.trainable, "total": run.total,
           "seconds": run.seconds, "peak_memory_bytes": run.peak_memory_bytes, **extra}
    run.release()
    return out


def untrained_cell(task: Task, seed: int) -> dict[str, Any]:
    """The base model (with the seed's new head, for classification) evaluated on the eval records, untrained."""
    cfg = run_config(task, "custom", seed=seed, out_dir=Path("unused"))
    data = load_datasets(cfg, task.tokenizer, records=task.train_records, eval_records=task.eval_records)
    model: Any = task.fresh_model(seed)
    if data.task == "classification":
        model.config.label2id, model.config.id2label = dict(data.label2id or {}), data.id2label
    if getattr(model.config, "pad_token_id", None) is None and task.tokenizer.pad_token_id is not None:
        model.config.pad_token_id = task.tokenizer.pad_token_id
    device = resolve_device(cfg.device)
    metrics = evaluate(model.to(device), data.eval, data.collate, cfg, data.task, device)
    return {"kind": "untrained", "d": 0, "seed": seed, "metric": metrics[task.metric], "metrics": metrics,
            "trainable": 0}


def head_cell(task: Task, seed: int, out_dir: Path) -> dict[str, Any]:
    """d = 0: only the classification head trains (the floor every subspace run starts from)."""
    model = task.fresh_model(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    for head in _heads(task, model):
        getattr(model, head).requires_grad_(True)
    run = train_run(task, "custom", seed=seed, out_dir=out_dir, model=model,
                    learning_rate=learning_rate_for(task, "lora"))
    return _record(run, kind="head", d=0, seed=seed)


def full_cell(task: Task, seed: int, out_dir: Path) -> dict[str, Any]:
    """The reference: full fine-tuning."""
    return _record(train_run(task, "full", seed=seed, out_dir=out_dir), kind="full", seed=seed)


def lowrank_cell(task: Task, r: int, seed: int, out_dir: Path) -> dict[str, Any]:
    """(a): LoRA at rank r with B frozen random (orthonormal columns) and A trained from 0; no dropout."""
    lr, lr_full = learning_rate_for(task, "lora"), learning_rate_for(task, "full")
    found: dict[str, Any] = {}

    def configure(model: nn.Module) -> None:
        adapters = [a for _, a in lora_adapters(model)]
        d = sum(a.lora_A.numel() for a in adapters)
        D = sum(a.lora_B.shape[0] * a.lora_A[0].numel() for a in adapters)  # the adapted weights: d_out x k each
        found.update(d=d, D=D, gain=subspace_gain(d, D, lr_full, lr, STEP_FACTORS["lowrank"]))
        freeze_random_b(model, seed=seed, gain=found["gain"])

    run = train_run(task, "lora", seed=seed, out_dir=out_dir, r=r, lora_dropout=0.0, learning_rate=lr,
                    configure=configure)
    return _record(run, kind="lowrank", r=r, seed=seed, **found)


def projection_cell(task: Task, d: int, seed: int, out_dir: Path) -> dict[str, Any]:
    """(b): θ = θ0 + c P z over the adapted weights, z (d) the only trained vector besides the head."""
    lr, lr_full = learning_rate_for(task, "lora"), learning_rate_for(task, "full")
    model: Any = task.fresh_model(seed)
    paths = target_paths(task, model)
    D = sum(model.get_submodule(p).weight.numel() for p in paths)
    gain = subspace_gain(d, D, lr_full, lr, STEP_FACTORS["projection"])
    sub = attach_subspace(model, paths, d, seed=seed, gain=gain, train_also=_heads(task, model))
    run = train_run(task, "custom", seed=seed, out_dir=out_dir, model=model, learning_rate=lr)
    return _record(run, kind="projection", d=d, seed=seed, D=D, gain=gain, projection=sub.projection)


# -- the summary -----------------------------------------------------------------------------------------
def _stats(cells: list[dict[str, Any]]) -> dict[str, Any]:
    values = [c["metric"] for c in cells]
    mean, std = mean_std(values)
    return {"values": values, "mean": mean, "std": std, "trainable": cells[0]["trainable"] if cells else None}


def summarize(cells: list[dict[str, Any]], higher_is_better: bool) -> dict[str, Any]:
    """Means over seeds per set-up and d; per family the points (d, mean, ...) and d_threshold at each of THRESHOLDS
    (the head-only d = 0 point counts for both families). For a loss the threshold is a share of full fine-tuning's
    improvement over the untrained model; for accuracy a share of full fine-tuning's accuracy. With a head, also
    d90_over_head: the smallest d reaching 90% of full fine-tuning's improvement over the head alone (what the
    subspace adds to a head that trains in full)."""
    by_kind = {k: [c for c in cells if c["kind"] == k] for k in ("untrained", "head", "full", *FAMILIES)}
    reference, untrained = _stats(by_kind["full"]), _stats(by_kind["untrained"])
    head = _stats(by_kind["head"]) if by_kind["head"] else None
    baseline = None if higher_is_better else untrained["mean"]
    families = {}
    for family, label in FAMILIES.items():
        points = []
        for d in sorted({c["d"] for c in by_kind[family]}):
            group = [c for c in by_kind[family] if c["d"] == d]
            stats = _stats(group)
            points.append({"d": d, "r": group[0].get("r"), **stats,
                           "vs_full": relative(stats["mean"], reference["mean"], higher_is_better)})
        start = [{"d": 0, **head}] if head else []
        ds, means = [p["d"] for p in start + points], [p["mean"] for p in start + points]
        d_at = {str(t): (d_threshold(ds, means, reference["mean"], t, higher_is_better=higher_is_better,
                                     baseline=baseline) if points and reference["mean"] is not None else None)
                for t in THRESHOLDS}
        over_head = (d_threshold(ds, means, reference["mean"], 0.9, higher_is_better=higher_is_better,
                                 baseline=head["mean"]) if head and points and reference["mean"] is not None else None)
        families[family] = {"label": label, "points": points, "d_at": d_at, "d90": d_at["0.9"],
                            "d90_over_head": over_head}
    target = (threshold_target(reference["mean"], 0.9, higher_is_better, baseline)
              if reference["mean"] is not None else None)
    rule = ("90% of full fine-tuning's mean" if higher_is_better else
            "the untrained loss minus 90% of full fine-tuning's improvement over it")
    return {"reference": reference, "untrained": untrained, "head_only": head, "families": families,
            "target_90": target, "threshold_rule": rule}


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _row(name: str, d: str, stats: dict[str, Any], vs: float | None) -> str:
    trainable = "n/a" if stats["trainable"] is None else f"{stats['trainable']:,}"
    return (f"| {name} | {d} | {trainable} | {_num(stats['mean'])} | {_num(stats['std'])} | "
            f"{', '.join(_num(v) for v in stats['values'])} | {'n/a' if vs is None else f'{100 * vs:.1f}%'} |")


def format_table(summary: dict[str, Any], metric: str, higher_is_better: bool) -> str:
    """One row per set-up and d (mean over seeds): the untrained model, the head alone, (a), (b), full FT."""
    ref = summary["reference"]["mean"]
    rows = [f"| set-up | d | trainable params | {metric} mean | std | per seed | vs full FT |", "|" + "---|" * 7]
    rows.append(_row("untrained", "0", summary["untrained"], relative(summary["untrained"]["mean"], ref,
                                                                      higher_is_better)))
    if summary["head_only"]:
        rows.append(_row("head only", "0", summary["head_only"],
                         relative(summary["head_only"]["mean"], ref, higher_is_better)))
    for family in summary["families"].values():
        for p in family["points"]:
            name = family["label"] + (f", r={p['r']}" if p["r"] else "")
            rows.append(_row(name, f"{p['d']:,}", p, p["vs_full"]))
    rows.append(_row("full fine-tuning", "all", summary["reference"], 1.0 if ref is not None else None))
    return "\n".join(rows)


def describe(summary: dict[str, Any], metric: str) -> str:
    """d90 of each family in words, with the target and how it is defined."""
    lines = [f"target ({summary['threshold_rule']}): {metric} {_num(summary['target_90'])}"]
    for family in summary["families"].values():
        d90 = family["d90"]
        found = ("not reached on this grid" if d90 is None else "0: the head alone reaches it" if d90 == 0
                 else f"{d90:,} (the smallest d of the grid that reaches it)")
        shares = ", ".join(f"{float(t):.0%}: {'-' if d is None else f'{d:,}'}" for t, d in family["d_at"].items())
        lines.append(f"d90 {family['label']}: {found}; d at other shares: {shares}")
        if summary["head_only"]:
            over = family["d90_over_head"]
            lines.append(f"    90% of full fine-tuning's gain over the head alone: "
                         f"{'not reached on this grid' if over is None else f'd = {over:,}'}")
    return "\n".join(lines)


def chart(summary: dict[str, Any], metric: str) -> str:
    """The metric against d on a log10 axis, per family (means; each run as a dot), with full fine-tuning's mean,
    the 90% target and the head-only level as horizontal lines and each family's d90 as a vertical line."""
    series: dict[str, Any] = {}
    dots: dict[str, Any] = {}
    vlines: dict[str, float] = {}
    for family in summary["families"].values():
        series[family["label"]] = [[p["d"], p["mean"]] for p in family["points"]]
        dots[family["label"] + " (runs)"] = [[p["d"], v] for p in family["points"] for v in p["values"]]
        if family["d90"]:
            vlines[f"d90 {family['label'][:3]}"] = family["d90"]
    hlines = {"full fine-tuning": summary["reference"]["mean"], "90% target": summary["target_90"]}
    if summary["head_only"]:
        hlines["head only (d = 0)"] = summary["head_only"]["mean"]
    return log_line_chart(series, f"{metric} against the subspace dimension d", base=10.0, points=dots,
                          hlines={k: v for k, v in hlines.items() if v is not None}, vlines=vlines,
                          x_label="subspace dimension d (log10 axis)", y_label=metric)


# -- the experiment --------------------------------------------------------------------------------------
def plan(quick: bool, seeds: int | None) -> tuple[tuple[int, ...], tuple[int, ...], list[int]]:
    """(ranks of (a), dimensions of (b), seeds); `seeds` overrides the default count."""
    n = seeds if seeds is not None else (QUICK_SEEDS if quick else SEEDS)
    if quick:
        return QUICK_RANKS, QUICK_DIMS, list(range(n))
    return RANKS, DIMS, list(range(n))


def run(task: Task, out_dir: Path, quick: bool, seeds: int | None, store: CellStore,
        progress_stream: TextIO | None = None) -> dict[str, Any]:
    """Per seed: the untrained model, the head alone (classification), full fine-tuning, (a) at each rank and (b) at
    each d, as resumable cells; then results.json, table.md and page.html in out_dir. Returns the results."""
    ranks, dims, seed_list = plan(quick, seeds)
    runs_dir = out_dir / "runs"
    jobs: list[tuple[str, str, Any]] = []
    for seed in seed_list:
        jobs.append((f"untrained-seed{seed}", f"untrained seed {seed}", lambda s=seed: untrained_cell(task, s)))
        if task.kind == "classification":
            jobs.append((f"head-seed{seed}", f"head only (d = 0) seed {seed}",
                         lambda s=seed: head_cell(task, s, runs_dir / f"head-seed{s}")))
        jobs.append((f"full-seed{seed}", f"full fine-tuning seed {seed}",
                     lambda s=seed: full_cell(task, s, runs_dir / f"full-seed{s}")))
        jobs += [(f"lowrank-r{r}-seed{seed}", f"(a) frozen random B, r={r} seed {seed}",
                  lambda r=r, s=seed: lowrank_cell(task, r, s, runs_dir / f"lowrank-r{r}-seed{s}")) for r in ranks]
        jobs += [(f"projection-d{d}-seed{seed}", f"(b) projection d={d:,} seed {seed}",
                  lambda d=d, s=seed: projection_cell(task, d, s, runs_dir / f"projection-d{d}-seed{s}"))
                 for d in dims]
    progress = Progress(len(jobs), NAME, progress_stream)
    cells = [run_cell(store, progress, key, what, fn,
                      note=lambda c: f"d={c['d']:,} {task.metric} {c['metric']:.4f}" if "d" in c
                      else f"{task.metric} {c['metric']:.4f}")
             for key, what, fn in jobs]
    summary = summarize(cells, task.higher_is_better)
    D = next((c["D"] for c in cells if "D" in c), None)
    results = {"ranks": list(ranks), "dims": list(dims), "seeds": seed_list, "steps": task.settings["steps"],
               "D": D, "thresholds": list(THRESHOLDS), "cells": cells, **summary,
               "subspace": "the weight matrices of the modules LoRA adapts on this task (biases, embeddings, norms "
                           "frozen); a classification head trains in full",
               "step_factors": STEP_FACTORS,
               "step_length": "gain c = factor (lr_full / lr) sqrt(D / d): one Adam step moves the D weights `factor` "
                              "times as far as a full fine-tuning step"}
    write_outputs(out_dir, NAME, task, results, format_table(summary, task.metric, task.higher_is_better),
                  [("Quality against the subspace dimension d", chart(summary, task.metric))],
                  summary=describe(summary, task.metric))
    return results


__all__ = ["DESCRIPTION", "NAME", "THRESHOLDS", "d_threshold", "describe", "format_table", "plan", "reaches", "run",
           "summarize", "target_paths", "threshold_target"]
