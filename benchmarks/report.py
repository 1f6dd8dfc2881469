"""Markdown report for the lorakit benchmarks: header (machine, versions, date, machine quietness),
one table per benchmark with PASS/FAIL goals next to it, sanity warnings, errors, and the method.

Statistics: every time is the MEDIAN of all timed samples pooled over rounds (n is printed), with the
IQR (25th-75th percentile) and min-max as spread; memory is the median over the rounds' children.
"""

from __future__ import annotations

from typing import Any

import tables as t

NAMES = {"floor": "FLOOR", "lorakit": "lorakit", "peft": "PEFT", "base": "base"}
TRAIN_GOALS = {1024: (1.05, 1.10), 512: (1.10, 1.15)}  # hidden -> max lorakit/FLOOR at (p=0, p>0)
INFER_GOAL = 1.08
BUSY_WARN = 0.10  # warn when other processes used more than this share of the CPUs while timing

METHOD = (
    "Each configuration (benchmark x contestant x size x dropout) runs in a fresh Python subprocess, so no "
    "allocator state, caches or monkey-patching leak between contestants. Repetitions are organised in "
    "rounds: each round runs one child per contestant, and the order is rotated every round so that drifts "
    "in machine load are shared. In a child the model is built (fixed seed, fp32, "
    "`torch.set_num_threads({threads})`), the inputs are created, and the baseline RSS is read (psutil). The "
    "kernel's RSS high-water mark is then reset (`echo 5 > /proc/self/clear_refs`), {warmup} warm-up steps "
    "and the timed steps run (each timed with `time.perf_counter`), and the peak is read from "
    "`getrusage(RUSAGE_SELF).ru_maxrss`. *Peak memory* = peak RSS - baseline RSS: the extra resident memory "
    "a step needs on top of the weights (activations saved for backward, gradients, temporaries, allocator "
    "slack). `ru_maxrss` is a high-water mark, so memory that glibc keeps instead of returning to the OS "
    "cannot hide the peak; allocator caching and fragmentation can only over-state it, equally for every "
    "contestant since each starts from a fresh process. Without the reset, `ru_maxrss` would include "
    "transient peaks of model construction; with it the window starts at the baseline. Warm-up steps are "
    "inside the memory window (the first step's one-off allocations happen in every real run) but not in "
    "the timings. FLOOR has no dropout, so one FLOOR measurement per hidden size serves both dropout rows. "
    "'Other processes' is the share of all CPUs used by other processes (and hypervisor steal) during the "
    "timed steps, from /proc/stat minus the child's own CPU time (column 'other CPU': the maximum over a "
    "row's children); above {busy:.0%} the timings are suspect: with 2 OpenMP threads on 2 cores, one busy "
    "core can make a step many times slower. `--wait-quiet S` makes the orchestrator wait up to S seconds "
    "before each child until the machine is idle."
)


# ----------------------------------------------------------------------------- benchmark sections


def _train_section(bench: dict[str, Any], notes: list[str]) -> list[str]:
    s, res = bench["settings"], bench["results"]
    lines = [
        "## train_step",
        "",
        f"Forward + loss + backward + `zero_grad(set_to_none=True)` in `model.train()`, batch "
        f"{s['train_batch']} x {s['train_seq']} tokens; {s['rounds']} round(s) x {s['train_steps']} timed "
        f"steps per child after {s['warmup']} warm-up steps. Times in ms per step (median, IQR, min-max over "
        "n samples); peak mem = peak RSS growth in MiB (median over rounds, min-max).",
        "",
    ]
    lines += [
        "The time goals use the *paired* ratio: FLOOR and the contestant built in one process and their steps "
        f"alternated (ABBA order, {s.get('train_pairs', '?')} pairs per child, one child per round), so a slow "
        "phase of this shared 2-core machine hits both sides of a pair; 'paired x FLOOR' is the median of the "
        "per-pair ratios over all rounds (IQR in brackets). 'x FLOOR' divides the medians of separate processes, "
        "which also gives the memory figures. 'page faults / step' is the median count of minor page faults "
        "per timed step in those processes (pages the kernel mapped in and zeroed). lorakit's children call "
        "`lorakit.tune_cpu_allocator()`, which fixes glibc's malloc thresholds for the process as `lorakit train` "
        "does (attach alone does not; docs/cpu-internals.md); the FLOOR and PEFT "
        "processes keep glibc's defaults, so their separate medians include the faults users of plain PyTorch "
        "and PEFT get, and lorakit's 'x FLOOR' can fall below 1. In a paired child FLOOR shares lorakit's "
        "process and its allocator settings, so the paired ratio compares the computation alone.",
        "",
    ]
    header = ["H", "dropout", "contestant", "median ms", "IQR ms", "min-max ms", "n", "x FLOOR", "paired x FLOOR"]
    header += ["x PEFT", "peak mem MiB", "page faults / step", "trainable params", "other CPU"]
    rows: list[list[str]] = []
    goals: list[list[str]] = []
    for hidden in s["train_hiddens"]:
        floor_runs = res.get(f"H{hidden}/floor", [])
        floor = t.pooled(floor_runs, "times_s")
        lim0, lim1 = TRAIN_GOALS.get(hidden) or TRAIN_GOALS[1024 if hidden >= 1024 else 512]
        for i, p in enumerate(s["train_dropouts"]):
            lk_runs = res.get(f"H{hidden}/p{p}/lorakit", [])
            pf_runs = res.get(f"H{hidden}/p{p}/peft", [])
            lk, pf = t.pooled(lk_runs, "times_s"), t.pooled(pf_runs, "times_s")
            lk_pair = t.pooled(res.get(f"H{hidden}/p{p}/lorakit/paired", []), "ratios")
            pf_pair = t.pooled(res.get(f"H{hidden}/p{p}/peft/paired", []), "ratios")
            if floor_runs:
                name = "FLOOR" + (" (shared)" if i else "")
                rows.append(
                    [
                        str(hidden),
                        f"{p:g}",
                        name,
                        *t.time_cells(floor, floor_runs),
                        "1.000x",
                        "",
                        t.x(t.ratio(floor, pf)),
                        t.mem(floor_runs)[0],
                        t.faults(floor_runs),
                        "0",
                        t.busy(floor_runs),
                    ]
                )
            for name, st, runs, pair in (("lorakit", lk, lk_runs, lk_pair), ("PEFT", pf, pf_runs, pf_pair)):
                if runs:
                    trainable = next((str(r["trainable_params"]) for r in t.ok(runs)), "error")
                    rows.append(
                        [
                            str(hidden),
                            f"{p:g}",
                            name,
                            *t.time_cells(st, runs),
                            t.x(t.ratio(st, floor)),
                            _paired_cell(pair),
                            t.x(t.ratio(st, pf)),
                            t.mem(runs)[0],
                            t.faults(runs),
                            trainable,
                            t.busy(runs),
                        ]
                    )
            tag = f"H={hidden} p={p:g}: lorakit"
            if lk_pair:  # paired ratios where measured; else the ratio of separate-process medians
                vs_floor, vs_peft = lk_pair["median"], t.ratio(lk_pair, pf_pair)
                label = "paired, "
            else:
                vs_floor, vs_peft, label = t.ratio(lk, floor), t.ratio(lk, pf), ""
            goals.append(t.goal(f"{tag} / FLOOR step time ({label}median)", vs_floor, lim0 if p == 0 else lim1))
            goals.append(t.goal(f"{tag} / PEFT step time ({label}median)", vs_peft, 1.0))
            if p > 0:
                (lk_cell, lk_mem), (pf_cell, pf_mem) = t.mem(lk_runs), t.mem(pf_runs)
                ok = None if lk_mem is None or pf_mem is None else lk_mem < pf_mem
                goals.append(
                    [f"{tag} peak mem < PEFT", f"{lk_cell} vs {pf_cell} MiB", "lorakit < PEFT", t.pf(ok)]
                )
            _train_sanity(f"train_step H={hidden} p={p:g}", p, floor_runs, lk_runs, pf_runs, notes)
    return (
        lines
        + t.table(header, rows)
        + ["", "Goals:", ""]
        + t.table(["goal", "measured", "target", "result"], goals)
    )


def _paired_cell(st: dict[str, float]) -> str:
    """Median per-pair ratio to FLOOR with its IQR, or '' when no paired child ran."""
    return f"{st['median']:.3f}x ({st['q1']:.3f}-{st['q3']:.3f})" if st else ""


def _train_sanity(
    tag: str, p: float, floor_runs: list[Any], lk_runs: list[Any], pf_runs: list[Any], notes: list[str]
) -> None:
    lk, pf, fl = t.ok(lk_runs), t.ok(pf_runs), t.ok(floor_runs)
    if lk and pf and lk[0]["trainable_params"] != pf[0]["trainable_params"]:
        notes.append(
            f"{tag}: lorakit trains {lk[0]['trainable_params']} parameters, PEFT "
            f"{pf[0]['trainable_params']} (different targets or rank?)"
        )
    for name, runs in (("lorakit", lk), ("PEFT", pf)):
        for r in runs[:1]:
            if r.get("tensors_with_grad") != r.get("trainable_tensors"):
                notes.append(
                    f"{tag}: {name}: only {r.get('tensors_with_grad')} of {r.get('trainable_tensors')} "
                    "trainable tensors received a gradient"
                )
    if p == 0 and fl:
        ref = fl[0]["first_loss"]
        for name, runs in (("lorakit", lk), ("PEFT", pf)):
            if runs and abs(runs[0]["first_loss"] - ref) > 1e-3:
                notes.append(
                    f"{tag}: {name} first-step loss {runs[0]['first_loss']:.5f} != FLOOR's {ref:.5f} "
                    "(adapter not a no-op at initialisation?)"
                )


def _infer_section(bench: dict[str, Any], notes: list[str]) -> list[str]:
    s, res = bench["settings"], bench["results"]
    lines = [
        "## inference",
        "",
        f"Forward of the unmerged model, `model.eval()` under `torch.inference_mode()`, batch "
        f"{s['infer_batch']} x {s['infer_seq']}, hidden {s['infer_hidden']}; {s['rounds']} round(s) x "
        f"{s['infer_steps']} timed forwards per child after {s['warmup']} warm-up forwards. Times in ms per "
        "forward; peak mem = peak RSS growth in MiB.",
        "",
    ]
    lines += [
        "The goal uses the *paired* ratio: the base model and the adapter model built in one process and their "
        f"forwards alternated (ABBA, {s.get('infer_pairs', '?')} pairs per child, one child per round); "
        "'paired x base' is the median of the per-pair ratios (IQR in brackets).",
        "",
    ]
    st = {c: t.pooled(res.get(c, []), "times_s") for c in ("base", "lorakit", "peft")}
    pair = {c: t.pooled(res.get(f"{c}/paired", []), "ratios") for c in ("lorakit", "peft")}
    rows = []
    for c in ("base", "lorakit", "peft"):
        runs = res.get(c, [])
        if runs:
            rows.append(
                [
                    NAMES[c],
                    *t.time_cells(st[c], runs),
                    t.x(t.ratio(st[c], st["base"])),
                    _paired_cell(pair.get(c, {})),
                    t.x(t.ratio(st[c], st["peft"])),
                    t.mem(runs)[0],
                    t.busy(runs),
                ]
            )
    header = ["contestant", "median ms", "IQR ms", "min-max ms", "n", "x base", "paired x base", "x PEFT"]
    header += ["peak mem MiB", "other CPU"]
    lines += t.table(header, rows) + ["", "Goals:", ""]
    if pair["lorakit"]:
        goal = t.goal("lorakit / base forward time (paired, median)", pair["lorakit"]["median"], INFER_GOAL)
    else:
        goal = t.goal("lorakit / base forward time", t.ratio(st["lorakit"], st["base"]), INFER_GOAL)
    return lines + t.table(["goal", "measured", "target", "result"], [goal])


def _io_section(bench: dict[str, Any], notes: list[str]) -> list[str]:
    s, res = bench["settings"], bench["results"]
    lines = [
        "## merge_save_load",
        "",
        f"Hidden {s['io_hidden']}; {s['io_rounds']} round(s) x {s['io_reps']} timed repetitions per child after "
        f"{s.get('io_warmup', 0)} untimed warm-up repetition(s) (first calls pay one-off lazy initialisation). "
        "merge = `lorakit.merge_and_unload(model)` / `peft_model.merge_and_unload()` on a freshly adapted model "
        "(LoRA B set non-zero so the merge does real work; merged and unmerged logits are compared, and so are logits before save and after load); save = "
        "`lorakit.save_adapter` / `save_pretrained` into a new directory; load = `lorakit.load_adapter` / "
        "`PeftModel.from_pretrained` onto a freshly built base model (file in the OS page cache). Model "
        "construction is never timed. Times in ms: median (min-max), n samples.",
        "",
    ]
    per = {
        c: {k: t.pooled(res.get(c, []), k) for k in ("merge_s", "save_s", "load_s")}
        for c in ("lorakit", "peft")
    }
    rows = []
    for label, key in (
        ("merge_and_unload", "merge_s"),
        ("save adapter", "save_s"),
        ("load adapter", "load_s"),
    ):
        cells = [label]
        for c in ("lorakit", "peft"):
            st = per[c][key]
            missing = "error" if res.get(c) else "skipped"
            cells.append(
                f"{t.ms(st['median'])} ({t.ms(st['min'])}-{t.ms(st['max'])}), n={st['n']}" if st else missing
            )
        rows.append(cells + [t.x(t.ratio(per["lorakit"][key], per["peft"][key]))])
    size = []
    for c in ("lorakit", "peft"):
        ok = t.ok(res.get(c, []))
        size.append(
            f"{ok[0]['adapter_weight_bytes'] / 1e6:.2f} MB ({ok[0]['adapter_bytes'] / 1e6:.2f} MB with "
            "config)"
            if ok
            else "n/a"
        )
        for r in ok[:1]:
            if r.get("lora_b_tensors_randomized", 0) == 0:
                notes.append(
                    f"merge_save_load: {NAMES[c]}: no parameter named like 'lora_B'; merge check vacuous"
                )
            if r.get("roundtrip_max_abs_diff", 0.0) > 1e-4:
                notes.append(
                    f"merge_save_load: {NAMES[c]}: save -> load round trip changes logits by up to "
                    f"{r['roundtrip_max_abs_diff']:.2e}"
                )
            if r.get("merge_max_abs_diff", 0.0) > 1e-3:
                notes.append(
                    f"merge_save_load: {NAMES[c]}: merged vs unmerged logits differ by up to "
                    f"{r['merge_max_abs_diff']:.2e}"
                )
    rows.append(["adapter size on disk (weights file)", *size, ""])
    return lines + t.table(["operation", "lorakit", "PEFT", "lorakit / PEFT"], rows)


DORA_GOALS = (1.12, 1.05)  # DoRA / lorakit LoRA: max step-time ratio, max peak-memory ratio
VARIANT_NAMES = {
    "lorakit": "lorakit LoRA",
    "lorakit:dora": "lorakit DoRA",
    "lorakit:fa": "lorakit LoRA-FA",
    "peft": "PEFT LoRA",
    "peft:dora": "PEFT DoRA",
}


def _variants_section(bench: dict[str, Any], notes: list[str]) -> list[str]:
    s, res = bench["settings"], bench["results"]
    lines = [
        "## variants (DoRA, LoRA-FA)",
        "",
        f"Training step as in train_step (dropout 0), batch {s['train_batch']} x {s['train_seq']} tokens; "
        f"{s['variants_rounds']} round(s) x {s['variants_steps']} timed steps per child. Ratios are against "
        "lorakit's own LoRA step in the same run; peak mem = peak RSS growth in MiB.",
        "",
    ]
    header = ["H", "contestant", "median ms", "IQR ms", "min-max ms", "n", "x lorakit LoRA", "peak mem MiB"]
    header += ["mem x lorakit LoRA", "trainable params", "other CPU"]
    rows: list[list[str]] = []
    goals: list[list[str]] = []
    for hidden in s["variants_hiddens"]:
        ref_runs = res.get(f"H{hidden}/lorakit", [])
        ref, (_, ref_mem) = t.pooled(ref_runs, "times_s"), t.mem(ref_runs)
        stats: dict[str, tuple[dict[str, float], float | None]] = {}
        for c, label in VARIANT_NAMES.items():
            runs = res.get(f"H{hidden}/{c}", [])
            if not runs:
                continue
            st, (mem_cell, mem_val) = t.pooled(runs, "times_s"), t.mem(runs)
            stats[c] = (st, mem_val)
            mem_ratio = None if mem_val is None or not ref_mem else mem_val / ref_mem
            trainable = next((str(r["trainable_params"]) for r in t.ok(runs)), "error")
            rows.append([str(hidden), label, *t.time_cells(st, runs), t.x(t.ratio(st, ref)), mem_cell,
                         t.x(mem_ratio), trainable, t.busy(runs)])
        if "lorakit:dora" in stats:
            st, mem_val = stats["lorakit:dora"]
            goals.append(t.goal(f"H={hidden}: lorakit DoRA / lorakit LoRA step time", t.ratio(st, ref), DORA_GOALS[0]))
            mem_ratio = None if mem_val is None or not ref_mem else mem_val / ref_mem
            goals.append(t.goal(f"H={hidden}: lorakit DoRA / lorakit LoRA peak mem", mem_ratio, DORA_GOALS[1]))
            if "peft:dora" in stats:
                goals.append(t.goal(f"H={hidden}: lorakit DoRA / PEFT DoRA step time",
                                    t.ratio(st, stats["peft:dora"][0]), 1.0))
        if "lorakit:fa" in stats and stats["lorakit:fa"][1] is not None and ref_mem:
            saved = ref_mem - stats["lorakit:fa"][1]
            goals.append([f"H={hidden}: LoRA-FA activation memory saved vs LoRA", f"{saved:.0f} MiB",
                          "> 0 MiB", t.pf(saved > 0)])
    infer = {c: res.get(f"infer/{c}", []) for c in ("lorakit", "lorakit:dora", "peft:dora")}
    infer_rows = []
    ref = t.pooled(infer["lorakit"], "times_s")
    for c, runs in infer.items():
        if runs:
            st = t.pooled(runs, "times_s")
            infer_rows.append([VARIANT_NAMES[c], *t.time_cells(st, runs), t.x(t.ratio(st, ref)), t.busy(runs)])
            if c == "lorakit:dora":
                pair = t.pooled(res.get("infer/lorakit:dora/paired", []), "ratios")
                if pair:  # both in one process, forwards alternated: the goal's ratio
                    infer_rows.append(["lorakit DoRA / lorakit LoRA, paired", "", "", "", str(pair["n"]),
                                       _paired_cell(pair), t.busy(res["infer/lorakit:dora/paired"])])
                    goals.append(t.goal("inference: lorakit DoRA / lorakit LoRA forward time (paired, median)",
                                        pair["median"], 1.0))
                else:
                    goals.append(t.goal("inference: lorakit DoRA / lorakit LoRA forward time", t.ratio(st, ref), 1.0))
    init_rows = []
    for method in ("pissa_niter_4", "olora"):
        st = {c: t.pooled(res.get(f"init/{method}/{c}", []), "times_s") for c in ("lorakit", "peft")}
        for c in ("lorakit", "peft"):
            runs = res.get(f"init/{method}/{c}", [])
            if runs:
                init_rows.append([method, "lorakit" if c == "lorakit" else "PEFT", *t.time_cells(st[c], runs),
                                  t.x(t.ratio(st[c], st["peft"]))])
        if method == "pissa_niter_4" and st["lorakit"]:
            med = st["lorakit"]["median"]
            goals.append([f"PiSSA fast path, one {s['init_size']}x{s['init_size']} matrix", f"{med:.2f} s",
                          "< 1 s", t.pf(med < 1.0)])
    out = lines + t.table(header, rows)
    if infer_rows:
        out += ["", f"Inference (eval, no dropout), batch {s['infer_batch']} x {s['infer_seq']}, hidden "
                    f"{s['infer_hidden']}, ms per forward:", ""]
        out += t.table(["contestant", "median ms", "IQR ms", "min-max ms", "n", "x lorakit LoRA", "other CPU"],
                       infer_rows)
    if init_rows:
        out += ["", f"Residual initialisation of one {s['init_size']} x {s['init_size']} Linear (r=16), seconds "
                    "per matrix (attach / get_peft_model):", ""]
        out += t.table(["init", "library", "median ms", "IQR ms", "min-max ms", "n", "x PEFT"], init_rows)
    return out + ["", "Goals:", ""] + t.table(["goal", "measured", "target", "result"], goals)


def _module_section(name: str) -> Any:
    def section(bench: dict[str, Any], notes: list[str]) -> list[str]:
        import child

        return child.extra_module(name).section(bench, notes)

    return section


SECTIONS = {
    "train_step": _train_section,
    "inference": _infer_section,
    "merge_save_load": _io_section,
    "variants": _variants_section,
    "qlora": _module_section("qlora"),
    "swap": _module_section("swap"),
    "mixed_batch": _module_section("mixed_batch"),
    "loading": _module_section("loading"),
    "train_loop": _module_section("train_loop"),
}


def _all_runs(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{name}/{key}", r) for name, b in data.items() for key, rs in b["results"].items() for r in rs]


def render(meta: dict[str, Any], data: dict[str, Any]) -> str:
    """The whole RESULTS.md text."""
    runs = [r for _, r in _all_runs(data) if r.get("ok")]
    threads = sorted({int(r["threads"]) for r in runs if "threads" in r}) or [meta["threads"]]
    resets = {r["hwm_reset"] for r in runs if "hwm_reset" in r}
    busy = t.stats([r["foreign_cpu_share"] for r in runs if "foreign_cpu_share" in r])
    lines = ["# lorakit benchmarks", ""]
    if meta["quick"]:
        lines += [
            "> **Quick smoke run** (`--quick`): reduced sizes and repetitions; figures and PASS/FAIL are "
            "indicative only.",
            "",
        ]
    if busy and busy["max"] > BUSY_WARN:
        lines += [
            f"> **Machine not quiet**: other processes used up to {busy['max']:.0%} of the CPUs while "
            f"timing (median {busy['median']:.0%}); treat the timings as unreliable.",
            "",
        ]
    la = " / ".join(", ".join(f"{x:.2f}" for x in meta[k]) for k in ("load_avg_start", "load_avg_end"))
    busy_txt = f"median {busy['median']:.1%}, max {busy['max']:.1%}" if busy else "n/a"
    lines += [
        f"- Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs ({meta['physical_cores']} physical "
        f"cores); torch threads used: {', '.join(map(str, threads))}; fp32",
        f"- Load average at start / end: {la}; other processes' CPU share while timing: {busy_txt}",
        f"- Versions: Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}, lorakit commit {meta['lorakit_commit']} ({meta['lorakit_subject']})",
        f"- Date: {meta['date']}; total duration {meta['duration_s']} s",
        "- Model: `LlamaForCausalLM` from `LlamaConfig`, 4 layers, heads H/64, intermediate ~2.75 H (multiple "
        "of 64), vocab 2048, SDPA attention, seed 0; LoRA r=16, alpha=32, all linear layers except the LM head",
        f"- RSS high-water-mark reset available: {'yes' if resets == {True} else 'NO (peaks include model build)'}",
        "",
    ]
    notes: list[str] = []
    for name, bench in data.items():
        lines += SECTIONS[name](bench, notes) + [""]
    if notes:
        lines += ["## Sanity warnings", ""] + [f"- {n}" for n in notes] + [""]
    errors: dict[str, tuple[list[str], str]] = {}
    for key, r in _all_runs(data):
        if not r.get("ok"):
            msg = str(r.get("error"))
            errors.setdefault(msg, ([], str(r.get("traceback") or "")))[0].append(key)
    if errors:
        lines += ["## Errors", ""]
        for msg, (keys, tb) in errors.items():
            lines += [f"- `{msg}` in: {', '.join(keys)}", "", "```", tb.strip()[-1500:], "```", ""]
    warmup = next((int(b["settings"]["warmup"]) for b in data.values()), 2)
    method = METHOD.format(threads=threads[0], warmup=warmup, busy=BUSY_WARN)
    return "\n".join(lines + ["## Method", "", method, ""])
