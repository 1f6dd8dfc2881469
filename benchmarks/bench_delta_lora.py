"""Delta-LoRA training-step benchmark: lorakit's Delta-LoRA against lorakit's LoRA at the same rank (and PEFT's LoRA
for reference: PEFT has no Delta-LoRA), on the CPU (fp32), paired and alternated in one process.

    .venv/bin/python benchmarks/bench_delta_lora.py            # -> benchmarks/RESULTS-delta_lora.md (and stdout)
    .venv/bin/python benchmarks/bench_delta_lora.py --quick    # smoke run, small sizes

* model: ``models.build_base(hidden)`` (4-layer Llama-style, fp32, seed 0), all linear layers except the LM head,
  r = 16, alpha 32, dropout 0 (Delta-LoRA trains without dropout); batch 4 x 256 tokens (quick: 2 x 64).
* contestants: ``lorakit:delta_lora`` = ``lorakit.attach(model, LoraConfig(method="delta_lora", r=16, alpha=32,
  target_modules="all-linear", options={"update_start_step": 0}))`` (W0 moves at every step: the worst case);
  ``lorakit:lora`` = the same with LoRA; ``peft:lora`` = ``peft.get_peft_model(model, peft.LoraConfig(r=16,
  lora_alpha=32, target_modules="all-linear"))``.
* one step: forward + loss + backward + AdamW step + the step hooks (``lorakit.training_hooks``: Delta-LoRA's
  update of W0; none for LoRA) + ``zero_grad(set_to_none=True)``: the optimizer step is in, since Delta-LoRA's
  extra work follows it.
* time: each comparison builds both models in one fresh process and alternates their steps ABBA
  (``child.alternate_pairs``); the figure is the median of the per-pair ratios over all rounds. The hook alone is
  timed too (ms per step, inside the Delta-LoRA steps).
* memory: each contestant alone in a fresh process, the RSS high-water mark reset after warm-up; peak growth
  over the timed steps (``child._measure_steps``).

Goal (issue 17, section 4): Delta-LoRA step <= 1.3x lorakit LoRA at the same rank.
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
GOAL_VS_LORA = 1.30  # lorakit Delta-LoRA step / lorakit LoRA step, at most
COMPARISONS = (("lorakit:delta_lora", "lorakit:lora"), ("lorakit:delta_lora", "peft:lora"))  # (contestant, reference)
CONTESTANTS = ("lorakit:delta_lora", "lorakit:lora", "peft:lora")


@dataclass(frozen=True)
class Sizes:
    hidden: int = 512
    batch: int = 4
    seq: int = 256
    rounds: int = 2
    pairs: int = 8  # alternated pairs per paired child
    warmup: int = 2
    mem_steps: int = 4


FULL, QUICK = Sizes(), Sizes(hidden=128, batch=2, seq=64, rounds=1, pairs=2, warmup=1, mem_steps=2)


# -- child side ------------------------------------------------------------------------------------------------
class Contestant:
    """A fresh base model with contestant `name`'s adapter (train mode), its AdamW and its step hooks."""

    def __init__(self, name: str, hidden: int, seq: int) -> None:
        import torch

        model = models.build_base(hidden, max_positions=seq)
        self.hooks: list[Any] = []
        if name == "peft:lora":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=models.LORA_ALPHA,
                                                               target_modules="all-linear", lora_dropout=0.0))
        else:
            models.ensure_lorakit_importable()
            import lorakit

            lorakit.tune_cpu_allocator()  # what lorakit's Trainer does for a CPU run
            extra = {"method": "delta_lora", "options": {"update_start_step": 0}} if name.endswith("delta_lora") else {}
            lorakit.attach(model, lorakit.LoraConfig(r=RANK, alpha=models.LORA_ALPHA, target_modules="all-linear",
                                                     dropout=0.0, **extra))
            self.hooks = lorakit.training_hooks(model)
        self.model = model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.steps = 0
        self.hook_s: list[float] = []

    def step(self, ids: Any) -> float:
        t0 = time.perf_counter()
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.steps += 1
        t1 = time.perf_counter()
        for hook in self.hooks:
            hook.after_optimizer_step(self.steps)
        if self.hooks:
            self.hook_s.append(time.perf_counter() - t1)
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    """kind "paired": the contestant and reference alternated; kind "memory": one contestant alone."""
    torch = child._setup_torch(args["threads"])
    ids = models.make_inputs(args["batch"], args["seq"])
    if args["kind"] == "paired":
        ref = Contestant(args["reference"], args["hidden"], args["seq"])
        other = Contestant(args["contestant"], args["hidden"], args["seq"])
        res = child.alternate_pairs(lambda: ref.step(ids), lambda: other.step(ids), args["warmup"], args["pairs"])
        return {**res, "hook_s": other.hook_s[args["warmup"]:], "threads": torch.get_num_threads()}
    one = Contestant(args["contestant"], args["hidden"], args["seq"])
    res = child._measure_steps(lambda: one.step(ids), args["warmup"], args["steps"])
    return {**res, "trainable_params": models.count_trainable(one.model)}



# -- orchestrator side ---------------------------------------------------------------------------------------
def bench(sizes: Sizes, threads: int) -> dict[str, Any]:
    base = {"threads": threads, "hidden": sizes.hidden, "batch": sizes.batch, "seq": sizes.seq,
            "warmup": sizes.warmup}
    paired: dict[str, list[Any]] = {}
    memory: dict[str, list[Any]] = {}
    for rnd in range(sizes.rounds):
        jobs = list(COMPARISONS) if rnd % 2 == 0 else list(reversed(COMPARISONS))
        for contestant, reference in jobs:
            paired.setdefault(f"{contestant}|{reference}", []).append(family_bench.spawn(SCRIPT, {
                **base, "kind": "paired", "contestant": contestant, "reference": reference, "pairs": sizes.pairs}))
    for contestant in CONTESTANTS:
        memory.setdefault(contestant, []).append(family_bench.spawn(SCRIPT, {**base, "kind": "memory", "contestant": contestant,
                                                         "steps": sizes.mem_steps}))
    return {"settings": {**asdict(sizes), "threads": threads, "r": RANK}, "paired": paired, "memory": memory}




def report(result: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    st = result["settings"]
    lines = [
        "# Delta-LoRA benchmark (lorakit Delta-LoRA vs lorakit LoRA; PEFT LoRA for reference)",
        "",
        f"- Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs; torch threads {st['threads']}; fp32. A shared "
        "machine: other sessions ran their tests at the same time ('other CPU': their share while timing).",
        f"- Load average at start / end: {meta['load_avg_start']} / {meta['load_avg_end']}",
        f"- Versions: Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, peft "
        f"{meta['peft']}, lorakit {meta['lorakit_commit']}",
        f"- Date: {meta['date']}; total {meta['duration_s']} s",
        f"- Model: 4-layer Llama-style, hidden {st['hidden']}, batch {st['batch']} x {st['seq']} tokens, all linear "
        f"layers except the LM head, r = {st['r']}, alpha {models.LORA_ALPHA}, dropout 0; Delta-LoRA with "
        "update_start_step 0 (W0 moves at every step). PEFT has no Delta-LoRA: its LoRA is a reference only.",
        "- Step: forward + loss + backward + AdamW step + step hooks + zero_grad. Time: contestant and reference in "
        f"one process, steps alternated ABBA ({st['pairs']} pairs per child, {st['rounds']} child(ren) per row); "
        "median of the per-pair ratios (IQR). Memory: each contestant alone in a fresh process, peak RSS growth over "
        f"{st['mem_steps']} timed steps after {st['warmup']} warm-up steps.",
        "",
        "| contestant / reference | paired ratio | contestant ms | reference ms | hook ms | goal | met | other CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in result["paired"].items():
        contestant, reference = key.split("|")
        cell, med = ratio_cell(runs)
        goal = f"<= {GOAL_VS_LORA:.2f}x" if reference == "lorakit:lora" else "-"
        met = "-" if med is None or reference != "lorakit:lora" else ("yes" if med <= GOAL_VS_LORA else "NO")
        other = max((run.get("foreign_cpu_share", 0.0) for run in runs if run.get("ok")), default=0.0)
        lines.append(f"| {contestant} / {reference} | {cell} | {median_ms(runs, 'times_s')} | "
                     f"{median_ms(runs, 'reference_times_s')} | {median_ms(runs, 'hook_s')} | {goal} | {met} | {other:.0%} |")
    lines += ["", "| contestant | median step ms | peak RSS growth MiB | trainable params |", "|---|---|---|---|"]
    for contestant, runs in result["memory"].items():
        ok = [run for run in runs if run.get("ok")]
        if not ok:
            err = "; ".join(str(run.get("error", ""))[-200:] for run in runs)
            lines.append(f"| {contestant} | error: {err} | | |")
            continue
        peak = statistics.median(run["peak_growth_mb"] for run in ok)
        lines.append(f"| {contestant} | {median_ms(ok, 'times_s')} | {peak:.0f} | {ok[0]['trainable_params']} |")
    return lines


def main() -> int:
    return family_bench.main(__doc__, run_child, bench, report, (FULL, QUICK), HERE / "RESULTS-delta_lora.md")


if __name__ == "__main__":
    sys.exit(main())
