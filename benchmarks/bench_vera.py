"""VeRA training-step benchmark: lorakit's VeRA against lorakit's LoRA at the same rank and against PEFT's VeRA, on
the CPU (fp32), paired and alternated in one process as the core benchmark's train_step.

    .venv/bin/python benchmarks/bench_vera.py                  # -> benchmarks/RESULTS-vera.md (and stdout)
    .venv/bin/python benchmarks/bench_vera.py --quick          # smoke run, small sizes

* model: ``models.build_base(hidden)`` (4-layer Llama-style, fp32, seed 0), all linear layers except the LM head,
  r = 16 for every contestant; batch 4 x 256 tokens (quick: 2 x 64); dropout 0 and 0.1.
* contestants: ``lorakit:vera`` = ``lorakit.attach(model, LoraConfig(method="vera", r=16, target_modules=
  "all-linear", dropout=p))``; ``lorakit:lora`` = the same with LoRA (alpha 32); ``peft:vera`` =
  ``peft.get_peft_model(model, VeraConfig(r=16, target_modules="all-linear", vera_dropout=p))``.
* one step: forward + loss + backward + ``zero_grad(set_to_none=True)`` in train mode (the core train_step).
* time: each comparison (VeRA / LoRA, VeRA / PEFT VeRA) builds both models in one fresh process and alternates
  their steps ABBA (``child.alternate_pairs``); the figure is the median of the per-pair ratios over all rounds.
* memory: each contestant alone in a fresh process, the RSS high-water mark reset after warm-up; peak growth
  over the timed steps (``child._measure_steps``).

Goals (issue 17, section 4): VeRA step <= 1.10x lorakit LoRA at the same rank; VeRA step < PEFT's VeRA.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import child
import family_bench
import models
from family_bench import median_ms, ratio_cell

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
RANK = models.LORA_R
GOAL_VS_LORA = 1.10  # lorakit VeRA step / lorakit LoRA step, at most
GOAL_VS_PEFT = 1.0  # lorakit VeRA step / PEFT VeRA step, below
COMPARISONS = (("lorakit:vera", "lorakit:lora"), ("lorakit:vera", "peft:vera"))  # (contestant, reference)
CONTESTANTS = ("lorakit:vera", "lorakit:lora", "peft:vera")


@dataclass(frozen=True)
class Sizes:
    hidden: int = 512
    batch: int = 4
    seq: int = 256
    dropouts: tuple[float, ...] = (0.0, 0.1)
    rounds: int = 2
    pairs: int = 6  # alternated pairs per paired child
    warmup: int = 2
    mem_steps: int = 4


FULL, QUICK = Sizes(), Sizes(hidden=128, batch=2, seq=64, rounds=1, pairs=2, warmup=1, mem_steps=2)


# -- child side ------------------------------------------------------------------------------------------------
def build(name: str, hidden: int, dropout: float, seq: int) -> Any:
    """A fresh base model with contestant `name`'s adapter, in train mode."""
    model = models.build_base(hidden, max_positions=seq)
    if name == "peft:vera":
        import peft

        return peft.get_peft_model(model, peft.VeraConfig(r=RANK, target_modules="all-linear",
                                                           vera_dropout=dropout)).train()
    models.ensure_lorakit_importable()
    import lorakit

    lorakit.tune_cpu_allocator()  # what lorakit's Trainer does for a CPU run (models.attach_lorakit does too)
    fields = dict(method="vera") if name == "lorakit:vera" else dict(alpha=models.LORA_ALPHA)
    lorakit.attach(model, lorakit.LoraConfig(r=RANK, target_modules="all-linear", dropout=dropout, **fields))
    return model.train()


def _step(model: Any, ids: Any) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    """kind "paired": the contestant and reference alternated; kind "memory": one contestant alone."""
    torch = child._setup_torch(args["threads"])
    ids = models.make_inputs(args["batch"], args["seq"])
    if args["kind"] == "paired":
        ref = build(args["reference"], args["hidden"], args["dropout"], args["seq"])
        other = build(args["contestant"], args["hidden"], args["dropout"], args["seq"])
        res = child.alternate_pairs(lambda: _step(ref, ids), lambda: _step(other, ids), args["warmup"], args["pairs"])
        return {**res, "threads": torch.get_num_threads()}
    model = build(args["contestant"], args["hidden"], args["dropout"], args["seq"])
    res = child._measure_steps(lambda: _step(model, ids), args["warmup"], args["steps"])
    return {**res, "trainable_params": models.count_trainable(model)}



# -- orchestrator side ---------------------------------------------------------------------------------------
def bench(sizes: Sizes, threads: int) -> dict[str, Any]:
    base = {"threads": threads, "hidden": sizes.hidden, "batch": sizes.batch, "seq": sizes.seq,
            "warmup": sizes.warmup}
    paired: dict[str, list[Any]] = {}
    memory: dict[str, list[Any]] = {}
    for p in sizes.dropouts:
        for rnd in range(sizes.rounds):
            jobs = list(COMPARISONS) if rnd % 2 == 0 else list(reversed(COMPARISONS))
            for contestant, reference in jobs:
                key = f"{contestant}|{reference}|{p}"
                paired.setdefault(key, []).append(family_bench.spawn(SCRIPT, {**base, "kind": "paired", "contestant": contestant,
                                                          "reference": reference, "dropout": p,
                                                          "pairs": sizes.pairs}))
        for contestant in CONTESTANTS:
            memory.setdefault(f"{contestant}|{p}", []).append(family_bench.spawn(SCRIPT, {**base, "kind": "memory", "dropout": p,
                                                                      "contestant": contestant,
                                                                      "steps": sizes.mem_steps}))
    return {"settings": {**asdict(sizes), "threads": threads, "r": RANK}, "paired": paired, "memory": memory}




def report(result: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    st = result["settings"]
    lines = [
        "# VeRA benchmark (lorakit VeRA vs lorakit LoRA vs PEFT VeRA)",
        "",
        f"- Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs; torch threads {st['threads']}; fp32. A shared "
        "machine: other sessions ran their tests at the same time ('other CPU': their share while timing).",
        f"- Load average at start / end: {meta['load_avg_start']} / {meta['load_avg_end']}",
        f"- Versions: Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, peft "
        f"{meta['peft']}, lorakit {meta['lorakit_commit']}",
        f"- Date: {meta['date']}; total {meta['duration_s']} s",
        f"- Model: 4-layer Llama-style, hidden {st['hidden']}, batch {st['batch']} x {st['seq']} tokens, all linear "
        f"layers except the LM head, r = {st['r']} for every contestant (LoRA alpha {models.LORA_ALPHA}).",
        "- Step: forward + loss + backward + zero_grad. Time: contestant and reference in one process, steps "
        f"alternated ABBA ({st['pairs']} pairs per child, {st['rounds']} child(ren) per row); median of the "
        "per-pair ratios (IQR). Memory: each contestant alone in a fresh process, peak RSS growth over "
        f"{st['mem_steps']} timed steps after {st['warmup']} warm-up steps.",
        "",
        "| dropout | contestant / reference | paired ratio | contestant ms | reference ms | goal | met | other CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in result["paired"].items():
        contestant, reference, p = key.split("|")
        cell, med = ratio_cell(runs)
        goal = GOAL_VS_LORA if reference == "lorakit:lora" else GOAL_VS_PEFT
        met = "-" if med is None else ("yes" if (med <= goal if goal != GOAL_VS_PEFT else med < goal) else "NO")
        other = max((run.get("foreign_cpu_share", 0.0) for run in runs if run.get("ok")), default=0.0)
        lines.append(f"| {p} | {contestant} / {reference} | {cell} | {median_ms(runs, 'times_s')} | "
                     f"{median_ms(runs, 'reference_times_s')} | {'<=' if goal != GOAL_VS_PEFT else '<'} {goal:.2f}x | "
                     f"{met} | {other:.0%} |")
    lines += ["", "| dropout | contestant | median step ms | peak RSS growth MiB | trainable params |",
              "|---|---|---|---|---|"]
    for key, runs in result["memory"].items():
        contestant, p = key.split("|")
        ok = [run for run in runs if run.get("ok")]
        if not ok:
            lines.append(f"| {p} | {contestant} | error | | |")
            continue
        peak = statistics.median(run["peak_growth_mb"] for run in ok)
        lines.append(f"| {p} | {contestant} | {median_ms(ok, 'times_s')} | {peak:.0f} | {ok[0]['trainable_params']} |")
    return lines


def main() -> int:
    return family_bench.main(__doc__, run_child, bench, report, (FULL, QUICK), HERE / "RESULTS-vera.md")


if __name__ == "__main__":
    sys.exit(main())
