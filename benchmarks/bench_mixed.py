"""mixed_adapters benchmark: many LoRA adapters in one batch (`model(ids, adapter_names=[...])`), lorakit vs PEFT.

What is measured: the inference forward (`model.eval()`, `torch.inference_mode()`) of the Llama-style model of
models.py (`build_base(hidden)`, 4 layers), batch 32 x 128 tokens, hidden 1024 (quick: 8 x 32, hidden 512).
Contestants, each in its own fresh child process:

* base            -- the model without adapters (the floor);
* lorakit/single  -- one lorakit adapter (r=16, alpha=32, all linear layers), every row uses it: the normal path;
* lorakit/mixed/N -- N adapters loaded (same config, B randomised so they differ), row i uses adapter i mod N
                     (round robin), passed as `adapter_names=[...]`: lorakit's stacked BGMV / SGMV path;
* peft/single, peft/mixed/N -- the same with PEFT (`get_peft_model` + `add_adapter`, `adapter_names=`: PEFT
                     loops over the batch's distinct adapters and slices their rows).

N = 8, 64, 256 (quick: 2, 4, 8). A batch of 32 rows uses at most 32 distinct adapters, so N > 32 measures the
cost of having many adapters loaded, not of using them. Times: `child._measure_steps` (median over rounds x
steps); memory: peak RSS growth during the steps (the stacks lorakit builds on the first mixed forward are in
the window), and the adapters' own size. The lorakit mixed child also checks its first two rows against a
forward of each row alone with `set_active` (max abs difference of the logits).
Goals: lorakit mixed <= 1.15x lorakit single and <= 1.20x base, at every N. They are judged on paired ratios
(`run_mixed_paired`: base, single and mixed forwards alternated in one process), since medians of separate
processes on this shared 2-core machine moved by 10-30% between runs; the separate children still give the
times, memory and PEFT's figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import child
import models
import tables as t

SIZES = {
    False: {"hidden": 1024, "batch": 32, "seq": 128, "counts": (8, 64, 256), "rounds": 2, "warmup": 1, "steps": 3,
            "pairs": 4},
    True: {"hidden": 512, "batch": 8, "seq": 32, "counts": (2, 4, 8), "rounds": 1, "warmup": 1, "steps": 1,
           "pairs": 1},
}
GOAL_VS_SINGLE = 1.15
GOAL_VS_BASE = 1.20


def _randomize_b(params: list[Any], seed: int) -> None:
    """Give every LoRA B a different non-zero value (std 0.01), so that the adapters differ."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def _build_lorakit(hidden: int, seq: int, n: int) -> Any:
    models.ensure_lorakit_importable()
    import lorakit

    lorakit.tune_cpu_allocator()  # explicit, as in models.attach_lorakit
    model = models.build_base(hidden, max_positions=seq)
    cfg = lorakit.LoraConfig(r=models.LORA_R, alpha=models.LORA_ALPHA, target_modules="all-linear")
    for i in range(n):
        lorakit.attach(model, cfg, name=f"a{i}")
    b_params = [p for name, p in model.named_parameters() if name.endswith("lora_B")]
    _randomize_b(b_params, seed=7)
    return model


def _build_peft(hidden: int, seq: int, n: int) -> Any:
    import peft

    base = models.build_base(hidden, max_positions=seq)
    cfg = peft.LoraConfig(r=models.LORA_R, lora_alpha=models.LORA_ALPHA, target_modules="all-linear")
    model = peft.get_peft_model(base, cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    b_params = [p for name, p in model.named_parameters() if ".lora_B." in name]
    _randomize_b(b_params, seed=7)
    return model


def _lorakit_row_check(model: Any, ids: Any, names: list[str], rows: int = 2) -> float:
    """Max |logits| difference between the mixed batch and each of its first rows run alone with set_active."""
    import torch

    import lorakit

    with torch.inference_mode():
        mixed = model(input_ids=ids[:rows], adapter_names=names[:rows]).logits
        worst = 0.0
        for i in range(rows):
            lorakit.set_active(model, names[i])
            alone = model(input_ids=ids[i : i + 1]).logits
            worst = max(worst, float((alone[0] - mixed[i]).abs().max()))
    return worst


def run_mixed(args: dict[str, Any]) -> dict[str, Any]:
    """One contestant of the mixed-adapter forward (see the module docstring)."""
    torch = child._setup_torch(args["threads"])
    library, mode, n = args["library"], args["mode"], args["adapters"]
    t0 = time.perf_counter()
    if library == "base":
        model = models.build_base(args["hidden"], max_positions=args["seq"])
    elif library == "lorakit":
        model = _build_lorakit(args["hidden"], args["seq"], n)
    else:
        model = _build_peft(args["hidden"], args["seq"], n)
    build_s = time.perf_counter() - t0
    model.eval()
    ids = models.make_inputs(args["batch"], args["seq"])
    names = [f"a{i % max(n, 1)}" for i in range(args["batch"])]
    extra: dict[str, Any] = {"adapter_names": names} if mode == "mixed" else {}
    adapter_mb = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" in name)

    def step() -> None:
        with torch.inference_mode():
            model(input_ids=ids, **extra)

    res = child._measure_steps(step, args["warmup"], args["steps"])
    if library == "lorakit" and mode == "mixed":
        res["row_check_max_abs_diff"] = _lorakit_row_check(model, ids, names)
    res.update(build_s=build_s, adapter_mb=adapter_mb / child.MIB, threads=torch.get_num_threads())
    return res


def run_mixed_paired(args: dict[str, Any]) -> dict[str, Any]:
    """The goals' ratios, paired: base, lorakit single and lorakit mixed/N in one process, forwards in rotated order.

    One lorakit model holds the N adapters; *single* is its forward with `set_active("a0")` and no
    `adapter_names` (the normal path's cost does not depend on how many adapters are loaded). Each round runs the
    three forwards back to back, so a slow phase of the machine hits all three; the per-round ratios mixed / base
    and mixed / single are what the goals use.
    """
    torch = child._setup_torch(args["threads"])
    models.ensure_lorakit_importable()
    import lorakit

    n = args["adapters"]
    base = models.build_base(args["hidden"], max_positions=args["seq"]).eval()
    model = _build_lorakit(args["hidden"], args["seq"], n).eval()
    lorakit.set_active(model, "a0")
    ids = models.make_inputs(args["batch"], args["seq"])
    names = [f"a{i % n}" for i in range(args["batch"])]

    def forward(m: Any, **extra: Any) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            m(input_ids=ids, **extra)
        return time.perf_counter() - t0

    sides = {"base": lambda: forward(base), "single": lambda: forward(model),
             "mixed": lambda: forward(model, adapter_names=names)}
    for _ in range(args["warmup"]):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    mark = child._cpu_mark()
    order = list(sides)
    for i in range(args["pairs"]):
        for k in order[i % 3:] + order[: i % 3]:
            times[k].append(sides[k]())
    return {
        "ratios_vs_base": [m / b for m, b in zip(times["mixed"], times["base"], strict=True)],
        "ratios_vs_single": [m / s for m, s in zip(times["mixed"], times["single"], strict=True)],
        "times_s": times["mixed"],
        "base_times_s": times["base"],
        "single_times_s": times["single"],
        "foreign_cpu_share": child._foreign_share(mark),
        "threads": torch.get_num_threads(),
    }


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"mixed": run_mixed, "mixed_paired": run_mixed_paired}


def _jobs(sizes: dict[str, Any], threads: int) -> list[tuple[str, dict[str, Any]]]:
    base = {"kind": "mixed", "threads": threads}
    base.update({k: sizes[k] for k in ("hidden", "batch", "seq", "warmup", "steps")})
    jobs = [("base", {**base, "library": "base", "mode": "single", "adapters": 0})]
    for library in ("lorakit", "peft"):
        jobs.append((f"{library}/single", {**base, "library": library, "mode": "single", "adapters": 1}))
        for n in sizes["counts"]:
            jobs.append((f"{library}/mixed/{n}", {**base, "library": library, "mode": "mixed", "adapters": n}))
    for n in sizes["counts"]:
        jobs.append((f"lorakit/paired/{n}", {**base, "kind": "mixed_paired", "library": "lorakit",
                                             "adapters": n, "pairs": sizes["pairs"]}))
    return jobs


def bench(s: Any, execute: Callable[..., None]) -> dict[str, Any]:
    """Run every round of the mixed-adapter benchmark through run.py's `execute(jobs, s, results)`."""
    sizes = SIZES[bool(s.quick)]
    skip = set(getattr(s, "skip", ()))
    jobs = [job for job in _jobs(sizes, s.threads) if job[1]["library"] not in skip]
    results: dict[str, list[Any]] = {}
    for rnd in range(sizes["rounds"]):
        k = rnd % len(jobs) if jobs else 0
        execute(jobs[k:] + jobs[:k], s, results)  # rotated, as run.py does
    return {"settings": {**sizes, "counts": list(sizes["counts"]), "threads": s.threads}, "results": results}


def _cell(st: dict[str, float]) -> str:
    return f"{st['median']:.3f}x ({st['q1']:.3f}-{st['q3']:.3f})"


def section(bench_dict: dict[str, Any], notes: list[str]) -> list[str]:
    """The RESULTS.md section: times per contestant, ratios, and the goals."""
    s, res = bench_dict["settings"], bench_dict["results"]
    lines = [
        "## mixed_adapters",
        "",
        f"Inference forward (`model.eval()`, `torch.inference_mode()`), batch {s['batch']} x {s['seq']}, hidden "
        f"{s['hidden']}, LoRA r={models.LORA_R} on every linear layer. *mixed/N*: N adapters loaded, row i uses "
        f"adapter i mod N via `adapter_names=[...]` (at most {s['batch']} distinct per batch); *single*: one "
        f"adapter for all rows, the normal path. {s['rounds']} round(s) x {s['steps']} timed forwards per child "
        f"after {s['warmup']} warm-up. Times in ms per forward; peak mem = peak RSS growth in MiB during the "
        "steps (lorakit's stacks are built in the first, warm-up, forward); adapters = their parameters' size.",
        "",
    ]
    st = {key: t.pooled(runs, "times_s") for key, runs in res.items()}
    header = ["contestant", "median ms", "IQR ms", "min-max ms", "n", "x base", "x own single", "peak mem MiB"]
    header += ["adapters MiB", "build s", "other CPU"]
    rows = []
    for key, runs in res.items():
        if "/paired/" in key:
            continue
        library = key.split("/")[0]
        single = st.get(f"{library}/single", {})
        good = t.ok(runs)
        adapters = f"{good[0]['adapter_mb']:.0f}" if good else ""
        build = f"{min(r['build_s'] for r in good):.1f}" if good else ""
        rows.append([key, *t.time_cells(st[key], runs), t.x(t.ratio(st[key], st.get("base", {}))),
                     t.x(t.ratio(st[key], single)) if key != "base" else "", t.mem(runs)[0], adapters, build,
                     t.busy(runs)])
        checks = [r["row_check_max_abs_diff"] for r in good if "row_check_max_abs_diff" in r]
        if checks and max(checks) > 1e-3:
            notes.append(f"mixed_adapters/{key}: rows differ from per-row runs by {max(checks):.2e}")
    lines += t.table(header, rows) + [""]
    checks = [r["row_check_max_abs_diff"] for key, runs in res.items() for r in t.ok(runs)
              if "row_check_max_abs_diff" in r]
    if checks:
        lines += [f"Check: lorakit's mixed logits vs each row alone with `set_active`: max abs difference "
                  f"{max(checks):.1e}.", ""]
    goals = []
    paired_rows = []
    for n in s["counts"]:
        mixed = st.get(f"lorakit/mixed/{n}", {})
        runs = res.get(f"lorakit/paired/{n}", [])
        vs_single, vs_base = t.pooled(runs, "ratios_vs_single"), t.pooled(runs, "ratios_vs_base")
        if vs_single and vs_base:  # the three forwards in one process: the goals' ratios
            paired_rows.append([f"N={n}", str(vs_base["n"]), _cell(vs_single), _cell(vs_base), t.busy(runs)])
            goals.append(t.goal(f"N={n}: lorakit mixed / lorakit single (paired, median)", vs_single["median"],
                                GOAL_VS_SINGLE))
            goals.append(t.goal(f"N={n}: lorakit mixed / base (paired, median)", vs_base["median"], GOAL_VS_BASE))
            continue
        goals.append(t.goal(f"N={n}: lorakit mixed / lorakit single", t.ratio(mixed, st.get("lorakit/single", {})),
                            GOAL_VS_SINGLE))
        goals.append(t.goal(f"N={n}: lorakit mixed / base", t.ratio(mixed, st.get("base", {})), GOAL_VS_BASE))
    if paired_rows:
        lines += ["Paired: the base model and one lorakit model holding the N adapters in one process, its forward "
                  "with one active adapter (single) and with `adapter_names` (mixed) and the base forward run back "
                  f"to back in rotated order, {s.get('pairs', '?')} rounds per child; median per-round ratio (IQR):",
                  ""]
        lines += t.table(["adapters", "n", "mixed / single", "mixed / base", "other CPU"], paired_rows) + [""]
    lines += ["Goals:", ""] + t.table(["goal", "measured", "target", "result"], goals) + [""]
    peft_rows = []
    for n in s["counts"]:
        mixed = st.get(f"peft/mixed/{n}", {})
        peft_rows.append([f"N={n}", t.x(t.ratio(mixed, st.get("peft/single", {}))),
                          t.x(t.ratio(mixed, st.get("base", {}))),
                          t.x(t.ratio(mixed, st.get(f"lorakit/mixed/{n}", {})))])
    lines += ["PEFT's `adapter_names` path, for comparison:", ""]
    lines += t.table(["adapters", "PEFT mixed / PEFT single", "PEFT mixed / base", "PEFT mixed / lorakit mixed"],
                     peft_rows)
    return lines
