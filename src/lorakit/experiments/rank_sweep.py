"""`lorakit experiment rank-sweep`: LoRA at r = 1, 2, 4, ..., 64 (and full fine-tuning as the reference), several
seeds, on one task. The seeds' claim: quality grows like a ln r + b, with large gains from r = 1 to 2 and little
from 32 to 64. Reported: the metric per r and seed, mean and std per r, the least-squares fit metric = a ln r + b
over every LoRA run with its R^2 (computed: fits.fit_log), the gain per doubling a ln 2, the gains r = 1 -> 2 and
of the largest pair run, and LoRA against full fine-tuning."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from .cells import CellStore, Progress, run_cell
from .charts import log_line_chart
from .core import Task, train_run
from .fits import fit_log, gain, largest_pair, mean_std, relative
from .output import write_outputs

NAME = "rank-sweep"
DESCRIPTION = "LoRA at r = 1, 2, 4, ..., 64 against full fine-tuning: quality vs r, the fit a ln r + b, gain per doubling"
RANKS = (1, 2, 4, 8, 16, 32, 64)
QUICK_RANKS = (1, 4, 16)
SEEDS, QUICK_SEEDS = 2, 1


def plan(quick: bool, seeds: int | None) -> tuple[tuple[int, ...], list[int]]:
    """(ranks, seeds) of a sweep: all ranks and 2 seeds, or (quick) r = 1, 4, 16 and 1 seed; `seeds` overrides."""
    n = seeds if seeds is not None else (QUICK_SEEDS if quick else SEEDS)
    return (QUICK_RANKS if quick else RANKS), list(range(n))


def _cell(task: Task, method: str, r: int | None, seed: int, out_dir: Path) -> dict[str, Any]:
    run = train_run(task, method, seed=seed, out_dir=out_dir, r=r or 8)
    run.release()
    return {"method": method, "r": r, "seed": seed, "metric": run.metric, "metrics": run.metrics,
            "trainable": run.trainable, "total": run.total, "seconds": run.seconds,
            "peak_memory_bytes": run.peak_memory_bytes}


def _pair(means: dict[int, float], pair: tuple[int, int] | None) -> dict[str, Any] | None:
    return {"from": pair[0], "to": pair[1], "gain": gain(means, *pair)} if pair else None


def summarize(runs: list[dict[str, Any]], full_runs: list[dict[str, Any]], higher_is_better: bool) -> dict[str, Any]:
    """Per r: the runs' metrics, mean, std, trainable parameters and mean relative to full fine-tuning; the fit
    a ln r + b over every LoRA run (R^2 None with a reason when undefined), the gain per doubling, the gains of the
    smallest and the largest pair of ranks run."""
    ranks = sorted({run["r"] for run in runs})
    full_mean, full_std = mean_std([run["metric"] for run in full_runs])
    per_rank = []
    for r in ranks:
        values = [run["metric"] for run in runs if run["r"] == r]
        mean, std = mean_std(values)
        per_rank.append({"r": r, "values": values, "mean": mean, "std": std,
                         "trainable": next(run["trainable"] for run in runs if run["r"] == r),
                         "vs_full": relative(mean, full_mean, higher_is_better)})
    fit = fit_log([run["r"] for run in runs], [run["metric"] for run in runs])
    means = {row["r"]: row["mean"] for row in per_rank}
    first = (ranks[0], ranks[1]) if len(ranks) >= 2 else None
    last = largest_pair(ranks)
    return {"ranks": ranks, "per_rank": per_rank, "fit": fit.to_dict(), "gain_first_pair": _pair(means, first),
            "gain_last_pair": _pair(means, last),
            "full": {"values": [run["metric"] for run in full_runs], "mean": full_mean, "std": full_std,
                     "trainable": full_runs[0]["trainable"] if full_runs else None}}


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(summary: dict[str, Any], metric: str) -> str:
    """The sweep as a markdown table: r, trainable parameters, the metric's mean, std and per-seed values, the fit's
    value at r, and the mean relative to full fine-tuning; full fine-tuning last."""
    fit = summary["fit"]
    rows = [f"| r | trainable params | {metric} mean | std | per seed | fit a ln r + b | vs full FT |", "|" + "---|" * 7]
    for row in summary["per_rank"]:
        fitted = None if fit["a"] is None else fit["a"] * math.log(row["r"]) + fit["b"]
        vs = "n/a" if row["vs_full"] is None else f"{100 * row['vs_full']:.1f}%"
        rows.append(f"| {row['r']} | {row['trainable']:,} | {_num(row['mean'])} | {_num(row['std'])} | "
                    f"{', '.join(_num(v) for v in row['values'])} | {_num(fitted)} | {vs} |")
    full = summary["full"]
    if full["values"]:
        rows.append(f"| full FT | {full['trainable']:,} | {_num(full['mean'])} | {_num(full['std'])} | "
                    f"{', '.join(_num(v) for v in full['values'])} | | 100.0% |")
    return "\n".join(rows)


def describe_fit(summary: dict[str, Any], metric: str) -> str:
    """The fit and the gains in words (R^2 as computed, or why it is undefined)."""
    fit = summary["fit"]
    if fit["a"] is None:
        lines = [f"fit {metric} = a ln r + b: not determined ({fit['reason']})"]
    else:
        r2 = f"R^2 = {fit['r2']:.3f}" if fit["r2"] is not None else f"R^2 undefined ({fit['reason']})"
        lines = [f"fit {metric} = a ln r + b over {fit['n']} runs: a = {fit['a']:.4f}, b = {fit['b']:.4f}, {r2}; "
                 f"gain per doubling of r (a ln 2) = {fit['gain_per_doubling']:+.4f}"]
    for key in ("gain_first_pair", "gain_last_pair"):
        pair = summary[key]
        if pair and pair["gain"] is not None:
            lines.append(f"r = {pair['from']} -> {pair['to']}: {pair['gain']:+.4f} (mean {metric})")
    return "\n".join(lines)


def chart(summary: dict[str, Any], metric: str) -> str:
    """The metric against r on a log2 axis: each run, the means with +-1 std, the fitted a ln r + b, full FT's mean."""
    fit, rows = summary["fit"], summary["per_rank"]
    runs = [[row["r"], v] for row in rows for v in row["values"]]
    series = {"mean over seeds": [[row["r"], row["mean"]] for row in rows]}
    if fit["a"] is not None:
        lo, hi = math.log2(rows[0]["r"]), math.log2(rows[-1]["r"])
        grid = [2 ** (lo + (hi - lo) * i / 40) for i in range(41)]
        series["fit a ln r + b"] = [[r, fit["a"] * math.log(r) + fit["b"]] for r in grid]
    errors = {"mean over seeds": [[row["r"], row["mean"] - row["std"], row["mean"] + row["std"]]
                                  for row in rows if row["std"] is not None]}
    full = summary["full"]["mean"]
    return log_line_chart(series, f"{metric} against the LoRA rank r", points={"each run": runs}, errors=errors,
                          hlines={"full fine-tuning": full} if full is not None else None,
                          x_label="LoRA rank r (log2 axis)", y_label=metric)


def run(task: Task, out_dir: Path, quick: bool, seeds: int | None, store: CellStore,
        progress_stream: TextIO | None = None) -> dict[str, Any]:
    """Train every (r, seed) LoRA cell and full fine-tuning per seed (resumable cells), then write results.json,
    table.md and page.html into out_dir and return the results."""
    ranks, seed_list = plan(quick, seeds)
    progress = Progress(len(seed_list) * (len(ranks) + 1), NAME, progress_stream)
    runs, full_runs = [], []
    for seed in seed_list:
        for r in ranks:
            key = f"lora-r{r}-seed{seed}"
            runs.append(run_cell(store, progress, key, f"LoRA r={r} seed {seed}",
                                 partial(_cell, task, "lora", r, seed, out_dir / "runs" / key),
                                 note=lambda c: f"{task.metric} {c['metric']:.4f}"))
        key = f"full-seed{seed}"
        full_runs.append(run_cell(store, progress, key, f"full fine-tuning seed {seed}",
                                  partial(_cell, task, "full", None, seed, out_dir / "runs" / key),
                                  note=lambda c: f"{task.metric} {c['metric']:.4f}"))
    summary = summarize(runs, full_runs, task.higher_is_better)
    results = {"ranks": list(ranks), "seeds": seed_list, "steps": task.settings["steps"],
               "lora_alpha": f"{task.settings['lora_scale']:g} r", "runs": runs, "full_runs": full_runs, **summary}
    table = format_table(summary, task.metric)
    text = describe_fit(summary, task.metric)
    write_outputs(out_dir, NAME, task, results, table, [("Quality against rank", chart(summary, task.metric))],
                  summary=text)
    return results


__all__ = ["DESCRIPTION", "NAME", "QUICK_RANKS", "RANKS", "describe_fit", "format_table", "plan", "run", "summarize"]
