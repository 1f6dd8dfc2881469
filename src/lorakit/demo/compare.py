"""The embedded default of `lorakit train`: LoRA vs full fine-tuning of all-MiniLM-L6-v2 (or, with --methods, the
whole adapter family) on a task built from the standard library's docstrings, with a table like the LoRA paper's.

Every run starts from the same checkpoint, the same new head (same seed) and the same fixed split; each is
timed and its peak memory measured on its own. Adapters are saved in PEFT's format, the fully fine-tuned model
with ``save_pretrained``; the table reports what each takes on disk. The family's settings: family.py.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import family, minilm
from .stdlib_docs import DEFAULT_PACKAGES, DocDataset, build_dataset

# LoRA (r=8) on the query, value and attention-output projections and the feed-forward up-projection of
# the 6 layers (0.90% of the parameters with the classifier head, which trains in full as modules_to_save).
# Measured on this task: LoRA on query, key, value and attention output only (0.69%) stays ~6 points below
# full fine-tuning; adding the feed-forward layer closes the gap. all-linear would be 1.5%. The pooler is
# left frozen: LoRA on it changed nothing measurable and its update grows past the weight's norm.
LORA_TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense"]


@dataclass
class DemoSettings:
    """Everything that decides the demo's result. The defaults are the embedded default run."""

    packages: tuple[str, ...] = DEFAULT_PACKAGES
    max_train_per_label: int | None = 160
    max_test_per_label: int | None = 60
    max_length: int = 32  # word-piece tokens per docstring (the median docstring has 14; 90% have <= 30)
    batch_size: int = 16
    eval_batch_size: int = 64
    warmup_ratio: float = 0.06
    lr_scheduler_type: str = "linear"  # linear | cosine | constant (after warm-up)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # LoRA
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lora_learning_rate: float = 2e-3
    lora_epochs: float = 8.0  # LoRA learns with fewer parameters: more epochs (as in the LoRA paper's GLUE runs)
    # full fine-tuning
    full_learning_rate: float = 1e-4
    full_epochs: float = 4.0
    device: str = "auto"  # lorakit train's --device: auto (CUDA when there is one) | cpu | cuda | cuda:N
    # the rest of the family (--methods; see family.plan). DoRA and LoRA-FA train exactly as LoRA above (r, alpha,
    # dropout, lr, epochs): DoRA only adds a magnitude vector, LoRA-FA only freezes A; the others as follows.
    # VeRA: r=256 is PEFT's VeraConfig default (the paper's GLUE runs use r=1024; its shared A, B are frozen, so a
    # larger r adds compute, not trainable parameters). Its trained vectors need a larger learning rate than LoRA's
    # A, B (the paper tunes them at several times LoRA's rate); 4e-3 is twice LoRA's here. d_initial 0.1: PEFT's
    # default (and the paper's). Same epochs as LoRA.
    vera_r: int = 256
    vera_learning_rate: float = 4e-3
    vera_d_initial: float = 0.1
    # AdaLoRA: init_r 12 -> target_r 8 are PEFT's AdaLoraConfig defaults; the final average rank is LoRA's r. alpha is
    # scaled so that s = alpha / init_r equals LoRA's alpha / r. The schedule is a share of the run's steps, shaped
    # as PEFT's AdaLoraConfig example (tinit 10, tfinal 20 of 100 steps); a masking every 1% of the steps (AdaLoRA's
    # GLUE scripts mask every 100 of ~10^4 steps). total_step: the run's own (lorakit.train.loop fills it in).
    adalora_init_r: int = 12
    adalora_target_r: int = 8
    adalora_tinit_fraction: float = 0.1
    adalora_tfinal_fraction: float = 0.2
    adalora_deltaT_fraction: float = 0.01
    # Delta-LoRA: lambda 0.5 (the paper's and lorakit's default); W0 starts moving a quarter into the run, once the
    # warm-up (6%) is over and B A has left its zero start (the paper's K=500 is for much longer runs); dropout 0
    # (Delta-LoRA refuses dropout, as the paper trains without).
    delta_lambda: float = 0.5
    delta_start_fraction: float = 0.25

    def for_method(self, method: str) -> tuple[float, float]:
        """(learning rate, epochs) of a run: full fine-tuning's, VeRA's, or LoRA's (every other adapter)."""
        if method == "full":
            return self.full_learning_rate, self.full_epochs
        if method == "vera":
            return self.vera_learning_rate, self.lora_epochs
        return self.lora_learning_rate, self.lora_epochs


QUICK = DemoSettings(packages=("email", "logging"), max_train_per_label=50, max_test_per_label=20,
                     max_length=32, lora_epochs=1.0, full_epochs=1.0)


# -- memory -----------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process between start() and stop(), in bytes.

    On Linux the kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs; elsewhere a
    thread samples the resident size every 20 ms (psutil, if installed). On a GPU the peak of allocated
    memory is reported too.
    """

    def __init__(self) -> None:
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.method = ""
        self.start_bytes = 0

    def start(self) -> PeakMemory:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            if _status_kib("VmHWM") is None:
                raise OSError("no VmHWM")
            self.method = "VmHWM"
            self.start_bytes = (_status_kib("VmRSS") or 0) * 1024
        except OSError:
            self.method = "sampled"
            self.start_bytes = self._sample()
            self._sampled = self.start_bytes
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _sample() -> int:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # a lifetime peak: the best there is
            return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB elsewhere

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sampled = max(self._sampled, self._sample())

    def stop(self) -> dict[str, int | str]:
        if self.method == "VmHWM":
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._sampled, self._sample())
        result: dict[str, int | str] = {"peak_rss_bytes": peak, "start_rss_bytes": self.start_bytes,
                                        "peak_rss_growth_bytes": max(0, peak - self.start_bytes),
                                        "memory_method": self.method}
        if torch.cuda.is_available():
            result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        return result


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
