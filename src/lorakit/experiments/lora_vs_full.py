"""`lorakit experiment lora-vs-full`: full fine-tuning's update against LoRA's, module by module (Hu et al. 2021,
section 7; the seeds' claim: ΔW* has a fast-decaying spectrum, a rank-r update loses at least Σ_{i>r} σ_i², and LoRA
first aligns the singular directions of B A with those of ΔW*, then converges).

Per seed, from the same start (same base weights, same head): LoRA at rank r (checkpoints every N steps: its
adapter files, read back) and full fine-tuning (ΔW* = W_full - W0 of every module LoRA adapts, recorded by a training
callback). Per module (math in spectra.py): the spectrum of ΔW*, its energy in the top r directions, the
Eckart-Young bound sqrt(Σ_{i>r} σ_i²) against LoRA's achieved ||ΔW* - s B A||_F (never below it), the error after the
best scalar rescaling of s B A, and the alignment ||U_rᵀ U*_r||_F² / r of the top-r left (and right) singular
subspaces of s B A and ΔW* at every LoRA checkpoint. Cells: lora-seedN, full-seedN, analysis-seedN (resumable).
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..io.files import atomic_write
from ..report.page import line_chart
from ..train.callbacks import Callback
from . import spectra as S
from .cells import CellStore, Progress, run_cell
from .charts import log_line_chart
from .core import Task, train_run
from .fits import mean_std
from .output import write_outputs

NAME = "lora-vs-full"
DESCRIPTION = ("the spectrum of full fine-tuning's update, the rank-r bound against LoRA's error, and the alignment "
               "of their singular subspaces over training")
RANK = 8
CHECKPOINTS, QUICK_CHECKPOINTS = 8, 3  # LoRA checkpoints over the run (the last one is the final adapter)
TOP_SINGULAR_VALUES = 128  # singular values of ΔW* kept per module in results.json
BOUND_RANKS = (1, 2, 4, 8, 16, 32, 64)
DELTA_FILE = "delta_w.safetensors"  # ΔW* of the adapted modules (d x k, fp32), in the full fine-tuning run's dir


# -- reading weights --------------------------------------------------------------------------------------------
def weight_rows(model: nn.Module, path: str) -> torch.Tensor:
    """The weight of the module at `path` as its (d, k') matrix of output rows (a view; GPT-2 Conv1D transposed;
    an adapted module's base weight).

    Raises:
        ConfigError: no module of a known layer kind at `path`.
    """
    from ..layer_kinds import kind_of
    from ..layers import LoraLayer
    from ..ops.dora import weight_rows as rows_of

    module = model.get_submodule(path)
    base = module.base_layer if isinstance(module, LoraLayer) else module
    kind, weight = kind_of(base), getattr(base, "weight", None)
    if kind is None or not isinstance(weight, torch.Tensor):
        raise ConfigError(f"module {path!r} ({type(base).__name__}) has no weight of a layer kind lorakit adapts")
    return rows_of(weight, kind.weight_layout)


def read_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A, B, s)} of a PEFT adapter directory (a checkpoint's adapter/ or the final one).

    Raises:
        AdapterFileError: a missing or corrupt file, an unpaired factor.
    """
    from ..config import LoraConfig
    from ..errors import AdapterFileError
    from ..io.files import read_config, read_weights
    from ..io.format import PREFIX, factor_suffixes

    config = LoraConfig.from_peft_dict(read_config(adapter_dir), where=str(adapter_dir / "adapter_config.json"))
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_weights(adapter_dir).items():
        for suffix, (factor, _) in factor_suffixes().items():
            if key.endswith(suffix):
                path = key[: -len(suffix)].removeprefix(PREFIX)
                found.setdefault(path, {})[factor] = tensor
                break
    out = {}
    for path, pair in found.items():
        if set(pair) != {"A", "B"}:
            raise AdapterFileError(f"{adapter_dir}: module {path!r} has only lora_{next(iter(pair))}")
        out[path] = (pair["A"], pair["B"], config.scaling_for(path))
    return out


def module_type(path: str) -> str:
    """The module's name within its layer: the part after the last numeric path component
    ("bert.encoder.layer.3.attention.self.query" -> "attention.self.query"); the path itself without one."""
    parts = re.split(r"\.\d+\.", path)
    return parts[-1]


class UpdateRecorder(Callback):
    """Records ΔW = W(end) - W(start) of the modules at `paths` (their (d, k) rows, fp32 on the CPU): a full
    fine-tuning run's update, without a checkpoint of the whole model."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.start: dict[str, torch.Tensor] = {}
        self.delta: dict[str, torch.Tensor] = {}

    def on_train_begin(self, trainer: Any) -> None:
        self.start = {p: weight_rows(trainer.model, p).detach().to("cpu", torch.float32, copy=True) for p in self.paths}

    def on_loop_end(self, trainer: Any, step: int) -> None:
        self.delta = {p: (weight_rows(trainer.model, p).detach().to("cpu", torch.float32) - w0).contiguous()
                      for p, w0 in self.start.items()}


# -- the cells --------------------------------------------------------------------------------------------------
def checkpoint_every(steps: int, count: int) -> int:
    """Steps between LoRA checkpoints: about `count` of them over a run of `steps` steps (at least 1 apart)."""
    return max(1, steps // max(1, count))


def _run_dir(out_dir: Path, key: str) -> Path:
    return out_dir / "runs" / key


def lora_cell(task: Task, seed: int, r: int, every: int, run_dir: Path) -> dict[str, Any]:
    """LoRA at rank r with a checkpoint every `every` steps; the adapted modules' paths."""
    from ..model import lora_layers

    run = train_run(task, "lora", seed=seed, out_dir=run_dir, r=r, save_steps=every)
    paths = [layer.path for layer in lora_layers(run.model)] if run.model is not None else []
    run.release()
    return {"method": "lora", "seed": seed, "r": r, "metric": run.metric, "metrics": run.metrics,
            "trainable": run.trainable, "total": run.total, "seconds": run.seconds, "modules": paths,
            "run_dir": str(run_dir), "steps": run.metrics["steps"]}


def full_cell(task: Task, seed: int, paths: list[str], run_dir: Path) -> dict[str, Any]:
    """Full fine-tuning; ΔW* of `paths` written to run_dir/delta_w.safetensors."""
    recorder = UpdateRecorder(paths)
    run = train_run(task, "full", seed=seed, out_dir=run_dir, callbacks=[recorder])
    run.release()
    atomic_write(run_dir, {DELTA_FILE: lambda path: save_file(recorder.delta, str(path))})
    return {"method": "full", "seed": seed, "metric": run.metric, "metrics": run.metrics, "trainable": run.trainable,
            "total": run.total, "seconds": run.seconds, "run_dir": str(run_dir)}


def lora_checkpoints(run_dir: Path, steps: int) -> list[tuple[int, Path]]:
    """[(step, adapter dir)] of a LoRA run: its checkpoints and the final adapter (as step `steps`), by step."""
    found = {int(p.name.split("-")[1]): p / "adapter" for p in (run_dir / "checkpoints").glob("step-*")
             if (p / "adapter").is_dir()}
    if (run_dir / "adapter").is_dir():
        found[steps] = run_dir / "adapter"
    return sorted(found.items())


def analysis_cell(lora: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Per module: compare_update at the final adapter, the alignment at every checkpoint.

    Raises:
        ConfigError: the runs' files are gone (a resumed experiment whose runs/ was deleted: use --restart).
    """
    delta_path = Path(full["run_dir"]) / DELTA_FILE
    checkpoints = lora_checkpoints(Path(lora["run_dir"]), lora["steps"])
    if not delta_path.is_file() or not checkpoints:
        raise ConfigError(f"the files of the finished runs are gone ({delta_path}, {lora['run_dir']}): rerun with "
                          f"--restart")
    deltas = load_file(str(delta_path))
    factors = [(step, read_factors(path)) for step, path in checkpoints]
    final = factors[-1][1]
    modules = []
    for path in lora["modules"]:
        if path not in deltas or path not in final:
            continue
        delta = deltas[path]
        a, b, scale = final[path]
        row = {"module": path, "type": module_type(path),
               **S.compare_update(delta, b, a, scale, lora["r"], TOP_SINGULAR_VALUES, BOUND_RANKS)}
        bases = S.dense_subspaces(delta, lora["r"])
        row["alignment"] = [{"step": step, **S.update_alignment(bases, f[path][1], f[path][0], f[path][2], lora["r"])}
                            for step, f in factors if path in f]
        row["chance_alignment"] = {"left": lora["r"] / row["d"], "right": lora["r"] / row["k"]}
        modules.append(row)
    return {"seed": lora["seed"], "steps": [step for step, _ in checkpoints], "modules": modules}


# -- summaries --------------------------------------------------------------------------------------------------
COLUMNS = ("energy_top_r", "bound_rel", "achieved_rel", "achieved_over_bound", "scalar", "scaled_error_rel",
           "cosine", "lora_norm_rel")


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return mean_std(kept)[0] if kept else None


def _final_alignment(row: dict[str, Any], side: str) -> float | None:
    return row["alignment"][-1][side] if row["alignment"] else None


def summarize(modules: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over layers (and seeds) per module type and over every module: the COLUMNS, the final left / right
    alignment and its chance level r / d, r / k; achieved >= bound counted (it holds for every module)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in modules:
        groups.setdefault(row["type"], []).append(row)

    def stats(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": name, "modules": len(rows),
                               "shapes": sorted({f"{r['d']}x{r['k']}" for r in rows})}
        out.update({c: _mean([r[c] for r in rows]) for c in COLUMNS})
        for side in ("left", "right"):
            out[f"alignment_{side}"] = _mean([_final_alignment(r, side) for r in rows])
            out[f"chance_{side}"] = _mean([r["chance_alignment"][side] for r in rows])
        out["bound_holds"] = sum(r["achieved"] >= r["bound"] * (1 - 1e-9) for r in rows)
        return out

    return {"by_type": [stats(rows, name) for name, rows in groups.items()], "overall": stats(modules, "all modules")}


def _num(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(summary: dict[str, Any], r: int) -> str:
    """Per module type (mean over layers) and over all modules, in markdown."""
    head = (f"| module type | modules | d x k | energy of ΔW* in top {r} | bound / ‖ΔW*‖ | LoRA error / ‖ΔW*‖ | "
            f"error / bound | best scalar c* | error after c* / ‖ΔW*‖ | cos(ΔW*, sBA) | ‖sBA‖ / ‖ΔW*‖ | "
            f"alignment left (chance) | alignment right (chance) |")
    rows = [head, "|" + "---|" * 13]
    for s in [*summary["by_type"], summary["overall"]]:
        rows.append(f"| {s['type']} | {s['modules']} | {', '.join(s['shapes'])} | {_num(s['energy_top_r'])} | "
                    f"{_num(s['bound_rel'])} | {_num(s['achieved_rel'])} | {_num(s['achieved_over_bound'], '.2f')} | "
                    f"{_num(s['scalar'], '.2f')} | {_num(s['scaled_error_rel'])} | {_num(s['cosine'])} | "
                    f"{_num(s['lora_norm_rel'], '.2f')} | {_num(s['alignment_left'])} ({_num(s['chance_left'])}) | "
                    f"{_num(s['alignment_right'])} ({_num(s['chance_right'])}) |")
    return "\n".join(rows)


def describe(summary: dict[str, Any], runs: list[dict[str, Any]], r: int, metric: str) -> str:
    """The measured claims in words (never assumed)."""
    o = summary["overall"]
    lines = [f"{o['modules']} modules: ΔW* keeps {_num(o['energy_top_r'], '.1%')} of its energy in its top {r} "
             f"singular directions; the best rank-{r} error (bound) is {_num(o['bound_rel'], '.1%')} of ‖ΔW*‖, LoRA's "
             f"{_num(o['achieved_rel'], '.1%')} ({_num(o['achieved_over_bound'], '.2f')}x the bound; achieved >= bound "
             f"in {o['bound_holds']} of {o['modules']} modules). The best scalar rescaling c* = "
             f"{_num(o['scalar'], '.3f')} of s B A leaves {_num(o['scaled_error_rel'], '.1%')}: what remains is a "
             f"difference of direction, not of length.",
             f"Top-{r} subspace alignment at the end: left {_num(o['alignment_left'])}, right "
             f"{_num(o['alignment_right'])} (a random subspace: {_num(o['chance_left'])}, {_num(o['chance_right'])})."]
    for run in runs:
        lines.append(f"seed {run['seed']}: {metric} LoRA {run['lora']:.4f}, full fine-tuning {run['full']:.4f}")
    return "\n".join(lines)


Series = dict[str, Any]  # {name: [[x, y], ...]} for the charts


def _log10_points(points: list[tuple[float, float | None]]) -> list[list[float]]:
    """[[x, log10 y]] of the points with y > 0 (log axes leave out zeros and missing values)."""
    return [[x, math.log10(y)] for x, y in points if y is not None and y > 0]


def _type_curves(rows: list[dict[str, Any]], r: int) -> tuple[list[list[float]], list[list[float]], list[list[float]],
                                                                 list[list[float]], dict[str, list[list[float]]]]:
    """One module type's curves (means over its layers): log10 σ_i, log10 bound / ‖ΔW*‖ against the rank,
    log10 LoRA's error and error after c* (at k = r), and the alignment against the step per side."""
    n = min(len(m["singular_values"]) for m in rows)
    sv = _log10_points([(i + 1, _mean([m["singular_values"][i] for m in rows])) for i in range(n)])
    bound = _log10_points([(int(k), _mean([m["bound_curve"][k] for m in rows])) for k in rows[0]["bound_curve"]])
    achieved = _log10_points([(r, m["achieved_rel"]) for m in rows])
    rescaled = _log10_points([(r, m["scaled_error_rel"]) for m in rows])
    steps = sorted({a["step"] for m in rows for a in m["alignment"]})
    align = {side: [[s, v] for s in steps
                    if (v := _mean([a[side] for m in rows for a in m["alignment"] if a["step"] == s])) is not None]
             for side in ("left", "right")}
    return sv, bound, achieved, rescaled, align


def sections(modules: list[dict[str, Any]], summary: dict[str, Any], r: int) -> list[tuple[str, str]]:
    """The page: spectra (log10 σ_i against i on a log2 axis), the bound against the rank with LoRA's errors (log10),
    the alignment over the steps per module type with the chance level r / d (r / k)."""
    spectra: Series = {}
    bounds: Series = {}
    errors: Series = {}
    left: Series = {}
    right: Series = {}
    for row in summary["by_type"]:
        name = row["type"]
        sv, bound, achieved, rescaled, align = _type_curves([m for m in modules if m["type"] == name], r)
        spectra[name], bounds[f"bound: {name}"] = sv, bound
        errors.setdefault("LoRA ‖ΔW* - sBA‖ (each module)", []).extend(achieved)
        errors.setdefault("after the best scalar c* (each module)", []).extend(rescaled)
        left[name], right[name] = align["left"], align["right"]
    steps = sorted({p[0] for pts in left.values() for p in pts})
    overall = summary["overall"]
    if steps:
        for side, series, base in (("left", left, "d"), ("right", right, "k")):
            level = overall[f"chance_{side}"]
            series[f"chance r/{base} = {_num(level)}"] = [[steps[0], level], [steps[-1], level]]
    return [
        ("Spectrum of full fine-tuning's update ΔW*", log_line_chart(
            spectra, "log10 σ_i of ΔW* (mean over layers) against i", vlines={f"r = {r}": r},
            x_label="singular value index i (log2 axis)", y_label="log10 σ_i")),
        ("The rank-r bound against LoRA's error", log_line_chart(
            bounds, "log10 ‖ΔW* - X‖ / ‖ΔW*‖: the best rank-k X (lines, mean over layers); LoRA's X = s B A at k = r",
            points=errors, x_label="rank k (log2 axis)", y_label="log10 relative error")),
        ("Alignment of the top-r singular subspaces over training",
         line_chart(left, "left (output) subspaces: ‖U_rᵀ U*_r‖² / r against the step")
         + line_chart(right, "right (input) subspaces: ‖V_rᵀ V*_r‖² / r against the step")),
    ]


# -- the experiment ---------------------------------------------------------------------------------------------
def run(task: Task, out_dir: Path, quick: bool, seeds: int | None, store: CellStore,
        progress_stream: TextIO | None = None) -> dict[str, Any]:
    """LoRA and full fine-tuning per seed (1 by default), the comparison per module; writes results.json, table.md
    and page.html into out_dir and returns the results."""
    seed_list = list(range(seeds if seeds is not None else 1))
    steps = int(task.settings["steps"])
    every = checkpoint_every(steps, QUICK_CHECKPOINTS if quick else CHECKPOINTS)
    progress = Progress(3 * len(seed_list), NAME, progress_stream)

    def metric(cell: dict[str, Any]) -> str:
        return f"{task.metric} {cell['metric']:.4f}"

    analyses, runs = [], []
    for seed in seed_list:
        lora = run_cell(store, progress, f"lora-seed{seed}", f"LoRA r={RANK} seed {seed}",
                        partial(lora_cell, task, seed, RANK, every, _run_dir(out_dir, f"lora-seed{seed}")), note=metric)
        full = run_cell(store, progress, f"full-seed{seed}", f"full fine-tuning seed {seed}",
                        partial(full_cell, task, seed, lora["modules"], _run_dir(out_dir, f"full-seed{seed}")),
                        note=metric)
        analyses.append(run_cell(store, progress, f"analysis-seed{seed}", f"spectra and alignment seed {seed}",
                                 partial(analysis_cell, lora, full), note=lambda c: f"{len(c['modules'])} modules"))
        runs.append({"seed": seed, "lora": lora["metric"], "full": full["metric"], "lora_run": lora, "full_run": full})
    modules = [m | {"seed": a["seed"]} for a in analyses for m in a["modules"]]
    summary = summarize(modules)
    results = {"r": RANK, "lora_alpha": task.settings["lora_scale"] * RANK, "seeds": seed_list, "steps": steps,
               "checkpoint_every": every, "runs": runs, "modules": modules, **summary,
               "definitions": {
                   "bound": "sqrt(sum_{i>r} sigma_i^2) of dW* = W_full - W0: the best rank-r error (Eckart-Young)",
                   "achieved": "||dW* - s B A||_F of LoRA's final adapter",
                   "scalar": "c* = <dW*, sBA> / ||sBA||^2, the scalar minimising ||dW* - c sBA||_F (scaled_error)",
                   "alignment": "||U_r^T U*_r||_F^2 / r of the top-r singular subspaces (left: output rows, right: "
                                "input columns) of s B A at a checkpoint and of dW*; chance: r / d, r / k"}}
    text = describe(summary, runs, RANK, task.metric)
    write_outputs(out_dir, NAME, task, results, format_table(summary, RANK), sections(modules, summary, RANK),
                  summary=text, stream=None)
    return results


__all__ = ["DESCRIPTION", "NAME", "UpdateRecorder", "analysis_cell", "checkpoint_every", "format_table",
           "lora_checkpoints", "module_type", "read_factors", "run", "summarize", "weight_rows"]
