"""AdaLoRA training-step benchmark: lorakit's AdaLoRA against lorakit's LoRA at the same initial rank and against
PEFT's AdaLoRA (with its update_and_allocate in the loop), on the CPU (fp32), paired and alternated in one process.

    .venv/bin/python benchmarks/bench_adalora.py                  # -> benchmarks/RESULTS-adalora.md (and stdout)
    .venv/bin/python benchmarks/bench_adalora.py --quick          # smoke run, small sizes

* model: ``models.build_base(hidden)`` (4-layer Llama-style, fp32, seed 0), all linear layers except the LM head,
  hidden 256, batch 2 x 128 tokens (quick: hidden 128, 2 x 64), dropout 0: sized for a shared 2-core machine.
* contestants: ``lorakit:adalora`` = ``lorakit.attach(model, LoraConfig(method="adalora", r=16, alpha=32,
  target_modules="all-linear", options={"total_step": 100000, "target_r": 8, "deltaT": 10}))`` with its step hook
  (``lorakit.training_hooks``: importance EMAs every step, a budget mask every 10 steps) and the orthogonality
  regulariser in the loss; ``lorakit:lora`` = LoRA r = 16, alpha 32; ``peft:adalora`` = ``AdaLoraConfig(init_r=16,
  target_r=8, lora_alpha=32, deltaT=10, total_step=100000)`` with ``model.base_model.update_and_allocate(step)``.
* one step: forward + loss + backward + AdamW step + (AdaLoRA: the allocation) + ``zero_grad(set_to_none=True)``.
* time: each comparison builds both models in one fresh process and alternates their steps ABBA
  (``child.alternate_pairs``); the figure is the median of the per-pair ratios over all rounds.
* memory: each contestant alone in a fresh process, the RSS high-water mark reset after warm-up; peak growth
  over the timed steps (``child._measure_steps``).

Goals (issue 17, section 4): AdaLoRA step <= 1.15x lorakit LoRA at the same initial rank; < PEFT's AdaLoRA.
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
GOAL_VS_LORA = 1.15  # lorakit AdaLoRA step / lorakit LoRA step, at most
GOAL_VS_PEFT = 1.0  # lorakit AdaLoRA step / PEFT AdaLoRA step, below
COMPARISONS = (("lorakit:adalora", "lorakit:lora"), ("lorakit:adalora", "peft:adalora"))  # (contestant, reference)
CONTESTANTS = ("lorakit:adalora", "lorakit:lora", "peft:adalora")
SCHEDULE = {"total_step": 100000, "target_r": 8, "deltaT": 10}  # long run: masking every 10 steps throughout


@dataclass(frozen=True)
class Sizes:
    hidden: int = 256  # smaller than the core train_step (512): the AdaLoRA overheads are per layer, not per token
    batch: int = 2
    seq: int = 128
    dropouts: tuple[float, ...] = (0.0,)
    rounds: int = 2
    pairs: int = 10  # alternated pairs per paired child (covers a masking step of each contestant)
    warmup: int = 2
    mem_steps: int = 10


FULL, QUICK = Sizes(), Sizes(hidden=128, batch=2, seq=64, rounds=1, pairs=12, warmup=1, mem_steps=10)


# -- child side ------------------------------------------------------------------------------------------------
def build(name: str, hidden: int, dropout: float, seq: int) -> Any:
    """contestant `name` in train mode: a step function (forward, loss, backward, AdamW, allocation, zero_grad)."""
    import torch

    model = models.build_base(hidden, max_positions=seq)
    if name == "peft:adalora":
        import peft

        config = peft.AdaLoraConfig(init_r=RANK, lora_alpha=models.LORA_ALPHA, target_modules="all-linear",
                                    lora_dropout=dropout, **SCHEDULE)
        model = peft.get_peft_model(model, config).train()
        allocate = model.base_model.update_and_allocate
    else:
        models.ensure_lorakit_importable()
        import lorakit

        lorakit.tune_cpu_allocator()  # what lorakit's Trainer does for a CPU run
        fields = dict(method="adalora", options=SCHEDULE) if name == "lorakit:adalora" else {}
        lorakit.attach(model, lorakit.LoraConfig(r=RANK, alpha=models.LORA_ALPHA, target_modules="all-linear",
                                                 dropout=dropout, **fields))
        model.train()
        hooks = lorakit.training_hooks(model)

        def allocate(step: int) -> None:
            for hook in hooks:
                hook.after_optimizer_step(step)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    count = [0]

    def step(ids: Any) -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        count[0] += 1
        allocate(count[0])
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step.model = model  # type: ignore[attr-defined]
    return step


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    """kind "paired": the contestant and reference alternated; kind "memory": one contestant alone."""
    torch = child._setup_torch(args["threads"])
    ids = models.make_inputs(args["batch"], args["seq"])
    if args["kind"] == "paired":
        ref = build(args["reference"], args["hidden"], args["dropout"], args["seq"])
        other = build(args["contestant"], args["hidden"], args["dropout"], args["seq"])
        res = child.alternate_pairs(lambda: ref(ids), lambda: other(ids), args["warmup"], args["pairs"])
        return {**res, "threads": torch.get_num_threads()}
    step = build(args["contestant"], args["hidden"], args["dropout"], args["seq"])
    res = child._measure_steps(lambda: step(ids), args["warmup"], args["steps"])
    return {**res, "trainable_params": models.count_trainable(step.model)}



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
        "# AdaLoRA benchmark (lorakit AdaLoRA vs lorakit LoRA vs PEFT AdaLoRA)",
        "",
        f"- Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs; torch threads {st['threads']}; fp32. A shared "
        "machine: other sessions ran their tests at the same time ('other CPU': their share while timing).",
        f"- Load average at start / end: {meta['load_avg_start']} / {meta['load_avg_end']}",
        f"- Versions: Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, peft "
        f"{meta['peft']}, lorakit {meta['lorakit_commit']}",
        f"- Date: {meta['date']}; total {meta['duration_s']} s",
        f"- Model: 4-layer Llama-style, hidden {st['hidden']}, batch {st['batch']} x {st['seq']} tokens, all linear "
        f"layers except the LM head, (initial) r = {st['r']} for every contestant, alpha {models.LORA_ALPHA}; AdaLoRA "
        f"{SCHEDULE} (importance every step, a mask every deltaT steps).",
        "- Step: forward + loss + backward + AdamW step + allocation (AdaLoRA) + zero_grad. Time: contestant and reference in one process, steps "
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
    return family_bench.main(__doc__, run_child, bench, report, (FULL, QUICK), HERE / "RESULTS-adalora.md")


if __name__ == "__main__":
    sys.exit(main())
