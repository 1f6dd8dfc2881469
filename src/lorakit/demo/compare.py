"""The embedded default of `lorakit train`: LoRA vs full fine-tuning of all-MiniLM-L6-v2 (or, with --methods, the
whole adapter family) on a task built from the standard library's docstrings, with a table like the LoRA paper's.

Every run starts from the same checkpoint, the same new head (same seed) and the same fixed split; each is
timed and its peak memory measured on its own. Adapters are saved in PEFT's format, the fully fine-tuned model
with ``save_pretrained``; the table reports what each takes on disk. The family's settings: family.py.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..train.memory import PeakMemory, write_memory_json
from . import family, minilm
from .settings import LORA_TARGETS, QUICK, DemoSettings
from .stdlib_docs import DocDataset, build_dataset


# -- training: one run through `lorakit train`'s loop ------------------------------------------------------
def train_config(method: str, s: DemoSettings, seed: int, out: Path, n_train: int = 0) -> Any:
    """The TrainConfig of one run: what `lorakit train --method <method> ...` takes (settings: family.plan)."""
    from ..train.config import TrainConfig

    p = family.plan(method, s, n_train)
    steps_hint = family.planned_steps(n_train, s.batch_size, p.epochs)
    return TrainConfig(
        model=str(minilm.model_dir()), out=str(out), task="classification", method=method,
        method_options=dict(p.options), max_length=s.max_length, r=p.r, lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout, target_modules=list(s.target_modules), learning_rate=p.learning_rate,
        epochs=p.epochs, per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.eval_batch_size,
        warmup_ratio=s.warmup_ratio, lr_scheduler_type=s.lr_scheduler_type, weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm, seed=seed, logging_steps=max(10, steps_hint // 8), device=s.device,
    )


def _fit(method: str, model: torch.nn.Module, tokenizer: Any, data: DocDataset, s: DemoSettings, seed: int,
         out: Path) -> dict[str, Any]:
    """Train (the adapter is attached by the loop, the head as modules_to_save), evaluate on the test split, save."""
    from ..train.loop import train

    cfg = train_config(method, s, seed, out, len(data.train))
    result = train(cfg, model=model, tokenizer=tokenizer, train_records=data.train, eval_records=data.test)
    return {"steps": result.steps, "first_loss": result.losses[0],
            "last_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
            "train_seconds": result.seconds, "test_accuracy": result.eval["eval_accuracy"],
            "test_loss": result.eval["eval_loss"], "trainable_params": result.trainable,
            "saved_to": str(result.saved_dir), "method_options": dict(cfg.method_options), "r": cfg.r}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- one run ----------------------------------------------------------------------------------------------
def run_one(method: str, data: DocDataset, tokenizer: Any, out_dir: Path, s: DemoSettings, seed: int,
            log: Any = print) -> dict[str, Any]:
    """Load MiniLM with a new head, train it (`method`: any `lorakit train --method`), evaluate, save; measure it.

    Wall time and peak memory cover the whole run: loading, training, evaluation and saving."""
    name = family.DISPLAY.get(method, method)
    learning_rate, epochs = s.for_method(method)
    log(f"\n== {name}: learning rate {learning_rate:g}, {epochs:g} epochs ==")
    memory = PeakMemory().start()
    start = time.perf_counter()
    model = minilm.load_classifier(data.labels, seed=seed)
    base_total = sum(p.numel() for p in model.parameters())
    fit = _fit(method, model, tokenizer, data, s, seed, out_dir / method)
    seconds = time.perf_counter() - start
    result = {
        "method": method, "total_params": base_total, **fit,
        "trainable_percent": 100.0 * fit["trainable_params"] / base_total,
        "learning_rate": learning_rate, "epochs": epochs, "wall_seconds": seconds, **memory.stop(),
        "disk_bytes": _dir_bytes(Path(fit["saved_to"])),
    }
    measured = {k: v for k, v in result.items() if "rss" in k or "gpu" in k or k == "memory_method"}
    write_memory_json(out_dir / method, measured,
                      covers="loading, training, evaluation and saving of this run (the demo's process)")
    log(f"{name}: test accuracy {fit['test_accuracy']:.4f}, {fit['train_seconds']:.0f}s training, "
        f"{seconds:.0f}s in all")
    del model
    gc.collect()
    return result


# -- the table --------------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _memory(run: dict[str, Any]) -> str:
    if "peak_gpu_bytes" in run:
        return f"{_mb(run['peak_gpu_bytes'])} GPU, {_mb(run['peak_rss_bytes'])} RAM"
    return _mb(run["peak_rss_bytes"])


def format_table(runs: dict[str, dict[str, Any]], s: DemoSettings) -> str:
    """The LoRA paper's table, one row per run in the order of `runs`, in markdown ("vs full FT": n/a without a
    full fine-tuning run)."""
    full_acc = runs["full"]["test_accuracy"] if "full" in runs else None
    head = ("| method | trainable params | trainable % | test accuracy | vs full FT | wall time | peak memory "
            "| saved size |")
    rows = [head, "|" + "---|" * 8]
    for method, run in runs.items():
        relative = f"{100 * run['test_accuracy'] / full_acc:.1f}%" if full_acc else "n/a"
        rows.append(f"| {family.label(method, s)} | {run['trainable_params']:,} | {run['trainable_percent']:.2f}% "
                    f"| {100 * run['test_accuracy']:.1f}% | {relative} | {run['wall_seconds']:.0f} s "
                    f"| {_memory(run)} | {_mb(run['disk_bytes'])} |")
    return "\n".join(rows)


def _where() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"the CPU ({torch.get_num_threads()} threads)"


# -- the demo ---------------------------------------------------------------------------------------------
def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, quick: bool = False,
             settings: DemoSettings | None = None, log: Any = print, device: str | None = None,
             methods: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Build the docstring task, fine-tune MiniLM with each of `methods` in turn, print and save the comparison.

    `methods` (`lorakit train --methods`): names of `lorakit train --method` ("lora,dora,adalora,vera,lora_fa,
    delta_lora,full"), the table's rows in that order; default LoRA then full fine-tuning. Each trains with the
    settings of family.plan from the same checkpoint, head seed and split. Writes into `out_dir`: one folder per
    method (its `lorakit train` output: lora/adapter/ in PEFT format, full/model/ from save_pretrained, their
    train_config.yaml and metrics.jsonl), metrics.jsonl (one line per run, then a summary line) and table.md.
    Returns the numbers (and the table as text). `device` (lorakit train's --device) overrides the settings' device.

    Raises:
        ConfigError: an unknown or repeated method name (before anything is built or written).
    """
    names = family.parse_methods(methods)
    s = settings or (QUICK if quick else DemoSettings())
    if device is not None:
        s = replace(s, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = build_dataset(s.packages, max_train_per_label=s.max_train_per_label,
                         max_test_per_label=s.max_test_per_label)
    data_seconds = time.perf_counter() - start
    log(f"data: {data.describe()} [{data_seconds:.1f}s]")
    tokenizer = minilm.load_tokenizer()
    runs = {method: run_one(method, data, tokenizer, out, s, seed, log) for method in names}
    table = format_table(runs, s)
    total_seconds = time.perf_counter() - start
    chance = 1.0 / len(data.labels)
    summary: dict[str, Any] = {"methods": list(names), "chance_accuracy": chance, "total_seconds": total_seconds,
                               "seed": seed, "quick": quick}
    verdict = f"Total {total_seconds:.0f} s."
    if "lora" in runs and "full" in runs:  # the default run's claim: LoRA within 3% of full FT with < 1% trainable
        lora, full = runs["lora"], runs["full"]
        ratio = lora["test_accuracy"] / full["test_accuracy"] if full["test_accuracy"] else 0.0
        summary.update(lora_vs_full=ratio, lora_trainable_percent=lora["trainable_percent"],
                       passed=ratio >= 0.97 and lora["trainable_percent"] < 1.0)
        verdict = (f"LoRA reaches {100 * ratio:.1f}% of full fine-tuning's accuracy with "
                   f"{lora['trainable_percent']:.2f}% of the parameters trainable; total {total_seconds:.0f} s.")
    plans = [family.plan(method, s, len(data.train)) for method in names]
    caption = (f"Docstrings of the Python standard library, labelled by package: {data.describe()}. "
               f"Chance: {100 * chance:.1f}%. all-MiniLM-L6-v2, {s.max_length} tokens, batch {s.batch_size}; "
               f"adapters on {', '.join(s.target_modules)} + the classifier head (trained in full). "
               f"{'; '.join(family.describe(p) for p in plans)}; seed {seed}. Wall time and peak memory (resident "
               f"set of the process) cover loading, training, evaluation and saving, on {_where()}."
               + (" Delta-LoRA's saved size is its merged model (its base weights moved), as full fine-tuning's."
                  if "delta_lora" in runs else ""))
    text = f"{table}\n\n{caption}\n\n{verdict}\n"
    (out / "table.md").write_text(text)
    with open(out / "metrics.jsonl", "w") as f:
        for method in names:
            f.write(json.dumps(runs[method]) + "\n")
        f.write(json.dumps({"summary": summary, "dataset": {"labels": data.labels, "counts": data.counts(),
                                                            **data.info}, "settings": asdict(s)}) + "\n")
    log("")
    log(text)
    return {"runs": runs, "summary": summary, "table": text, "dataset": data.counts(), "settings": asdict(s),
            **summary}


__all__ = ["LORA_TARGETS", "QUICK", "DemoSettings", "PeakMemory", "format_table", "run_demo", "run_one",
           "train_config"]
