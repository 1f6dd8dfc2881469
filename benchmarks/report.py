"""Markdown report for the lorakit benchmarks: machine/versions header, one table per benchmark,
PASS/FAIL goals, sanity checks and the measurement method.

Statistics: every time is the MEDIAN of all timed samples pooled over rounds (n is printed), with
IQR (25th-75th percentile) and min-max as spread; memory is the median over the rounds' children.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMES = {"floor": "FLOOR", "lorakit": "lorakit", "peft": "PEFT", "base": "base"}
TRAIN_GOALS = {1024: (1.05, 1.10), 512: (1.10, 1.15)}  # hidden -> (p=0, p=0.1) max lorakit/floor
INFER_GOAL = 1.08

METHOD = (
    "**Method.** Each configuration (benchmark x contestant x size x dropout) runs in a fresh Python "
    "subprocess, so no allocator state, caches or monkey-patching leak between contestants. Repetitions are "
    "organised in rounds: each round runs one child per contestant and the order is rotated every round, so "
    "drifts in machine load are shared. In a child, the model is built (fixed seed, fp32, "
    "`torch.set_num_threads({threads})`), inputs are created, then the baseline RSS is read (psutil). The "
    "kernel's RSS high-water mark is then reset (`echo 5 > /proc/self/clear_refs`), {warmup} warm-up steps "
    "and the timed steps run (each timed with `time.perf_counter`), and the peak is read from "
    "`getrusage(RUSAGE_SELF).ru_maxrss`. *Peak memory* = peak RSS - baseline RSS, i.e. the extra resident "
    "memory a step needs on top of the weights (activations saved for backward, gradients, temporaries, "
    "allocator slack). `ru_maxrss` is a high-water mark, so memory that glibc keeps instead of returning to "
    "the OS does not hide the peak; it can only over-state it through fragmentation or cached free chunks, "
    "which affects all contestants alike because each starts from a fresh process. Without the reset, "
    "`ru_maxrss` would also include transient peaks of model construction; the reset makes the window start "
    "exactly at the baseline (the header says whether the reset was available). Warm-up steps are inside "
    "the memory window (the first step makes one-off allocations every real training run also makes) but "
    "not in the timings. FLOOR has no dropout, so one FLOOR measurement per hidden size serves both dropout rows."
)


def stats(values: list[float]) -> dict[str, float]:
    vals = sorted(values)
    if not vals:
        return {}
    q1, q3 = (
        (statistics.quantiles(vals, n=4, method="inclusive")[i] for i in (0, 2))
        if len(vals) > 1
        else (vals[0], vals[0])
    )
    return {
        "median": statistics.median(vals),
        "min": vals[0],
        "max": vals[-1],
        "q1": q1,
        "q3": q3,
        "n": len(vals),
    }


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def collect_meta(threads: int, elapsed_s: float, quick: bool) -> dict[str, Any]:
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--", "src"))
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "threads": threads,
        "load_avg_end": os.getloadavg(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "lorakit_commit": commit + (" (+ uncommitted changes in src/)" if dirty else ""),
        "lorakit_subject": _git("log", "-1", "--format=%s"),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(elapsed_s),
        "quick": quick,
    }


# ----------------------------------------------------------------------------- formatting helpers


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if x * 1e3 >= 100 else f"{x * 1e3:.1f}"


def _time_cells(st: dict[str, float]) -> list[str]:
    if not st:
        return ["error", "", "", ""]
    return [
        _ms(st["median"]),
        f"{_ms(st['q1'])}-{_ms(st['q3'])}",
        f"{_ms(st['min'])}-{_ms(st['max'])}",
        str(st["n"]),
    ]


def _ratio(a: dict[str, float], b: dict[str, float]) -> float | None:
    return a["median"] / b["median"] if a and b and b["median"] > 0 else None


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}x"


def _pf(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "**FAIL**")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if r.get("ok")]


def _pooled(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    return stats([t for r in _ok(runs) for t in r.get(key, [])])


def _mem(runs: list[dict[str, Any]]) -> tuple[str, float | None]:
    vals = [r["peak_growth_mb"] for r in _ok(runs)]
    if not vals:
        return "error", None
    st = stats(vals)
    cell = f"{st['median']:.0f}" + (f" ({st['min']:.0f}-{st['max']:.0f})" if len(vals) > 1 else "")
    return cell, st["median"]


# ----------------------------------------------------------------------------- benchmark sections


def _train_section(bench: dict[str, Any], notes: list[str]) -> list[str]:
    s, res = bench["settings"], bench["results"]
    lines = [
        "## train_step",
        "",
        f"Forward + loss + backward + `zero_grad(set_to_none=True)`, `model.train()`, batch {s['train_batch']} x "
        f"{s['train_seq']} tokens, {s['rounds']} round(s) x {s['train_steps']} timed steps after {s['warmup']} "
        "warm-up steps. Times in ms per step (median, IQR, min-max over n samples); memory = peak RSS growth in "
        "MiB (median over rounds, min-max).",
        "",
    ]
    header = [
        "H",
        "dropout",
        "contestant",
        "median ms",
        "IQR ms",
        "min-max ms",
        "n",
        "x FLOOR",
        "x PEFT",
        "peak mem MiB",
        "trainable params",
    ]
    rows: list[list[str]] = []
    goals: list[list[str]] = []
    for hidden in s["train_hiddens"]:
        floor_runs = res.get(f"H{hidden}/floor", [])
        floor = _pooled(floor_runs, "times_s")
        floor_mem, _ = _mem(floor_runs)
        tgt = TRAIN_GOALS.get(hidden) or TRAIN_GOALS[1024 if hidden >= 1024 else 512]
        for i, p in enumerate(s["train_dropouts"]):
            lk_runs, pf_runs = res.get(f"H{hidden}/p{p}/lorakit", []), res.get(f"H{hidden}/p{p}/peft", [])
            lk, pf = _pooled(lk_runs, "times_s"), _pooled(pf_runs, "times_s")
            lk_mem, lk_mem_v = _mem(lk_runs)
            pf_mem, pf_mem_v = _mem(pf_runs)
            if floor_runs:
                rows.append(
                    [
                        str(hidden),
                        f"{p:g}",
                        "FLOOR" + (" (shared)" if i else ""),
                        *_time_cells(floor),
                        "1.000x",
                        _x(_ratio(floor, pf)),
                        floor_mem,
                        "0",
                    ]
                )
            for name, st, runs, mem in (("lorakit", lk, lk_runs, lk_mem), ("PEFT", pf, pf_runs, pf_mem)):
                if not runs:
                    continue
                trainable = next((str(r["trainable_params"]) for r in _ok(runs)), "error")
                rows.append(
                    [
                        str(hidden),
                        f"{p:g}",
                        name,
                        *_time_cells(st),
                        _x(_ratio(st, floor)),
                        _x(_ratio(st, pf)),
                        mem,
                        trainable,
                    ]
                )
            limit = tgt[0] if p == 0 else tgt[1]
            r_floor, r_peft = _ratio(lk, floor), _ratio(lk, pf)
            goals.append(
                [
                    f"H={hidden} p={p:g}: lorakit / FLOOR step time",
                    _x(r_floor),
                    f"<= {limit:.2f}x",
                    _pf(None if r_floor is None else r_floor <= limit),
                ]
            )
            goals.append(
                [
                    f"H={hidden} p={p:g}: lorakit / PEFT step time",
                    _x(r_peft),
                    "<= 1.00x",
                    _pf(None if r_peft is None else r_peft <= 1.0),
                ]
            )
            if p > 0:
                ok = None if lk_mem_v is None or pf_mem_v is None else lk_mem_v < pf_mem_v
                goals.append(
                    [
                        f"H={hidden} p={p:g}: lorakit peak mem < PEFT",
                        f"{lk_mem} vs {pf_mem} MiB",
                        "lorakit < PEFT",
                        _pf(ok),
                    ]
                )
            _train_sanity(hidden, p, floor_runs, lk_runs, pf_runs, notes)
    lines += _table(header, rows) + ["", "Goals:", ""]
    lines += _table(["goal", "measured", "target", "result"], goals)
    return lines


def _train_sanity(
    hidden: int, p: float, floor_runs: list[Any], lk_runs: list[Any], pf_runs: list[Any], notes: list[str]
) -> None:
    tag = f"train_step H={hidden} p={p:g}"
    lk, pf, fl = _ok(lk_runs), _ok(pf_runs), _ok(floor_runs)
    if lk and pf and lk[0]["trainable_params"] != pf[0]["trainable_params"]:
        notes.append(
            f"{tag}: lorakit trains {lk[0]['trainable_params']} params, PEFT "
            f"{pf[0]['trainable_params']} (different target modules or rank?)"
        )
    for name, runs in (("lorakit", lk), ("PEFT", pf)):
        for r in runs[:1]:
            if r.get("tensors_with_grad") != r.get("trainable_tensors"):
                notes.append(
                    f"{tag}: {name}: {r.get('tensors_with_grad')} of {r.get('trainable_tensors')} "
                    "trainable tensors received a gradient"
                )
    if p == 0 and fl:
        ref = fl[0]["first_loss"]
        for name, runs in (("lorakit", lk), ("PEFT", pf)):
            if runs and abs(runs[0]["first_loss"] - ref) > 1e-3:
                notes.append(
                    f"{tag}: {name} first-step loss {runs[0]['first_loss']:.5f} != FLOOR {ref:.5f} "
                    "(adapter not a no-op at init?)"
                )


def _infer_section(bench: dict[str, Any], notes: list[str]) -> list[str]:
    s, res = bench["settings"], bench["results"]
    lines = [
        "## inference",
        "",
        f"Forward of the unmerged model, `model.eval()` + `torch.inference_mode()`, batch {s['infer_batch']} x "
        f"{s['infer_seq']}, hidden {s['infer_hidden']}, {s['rounds']} round(s) x {s['infer_steps']} timed "
        f"forwards after {s['warmup']} warm-up forwards. Times in ms per forward.",
        "",
    ]
    st = {c: _pooled(res.get(c, []), "times_s") for c in ("base", "lorakit", "peft")}
    rows = []
    for c in ("base", "lorakit", "peft"):
        if c in res:
            rows.append(
                [
                    NAMES[c],
                    *_time_cells(st[c]),
                    _x(_ratio(st[c], st["base"])),
                    _x(_ratio(st[c], st["peft"])),
                    _mem(res[c])[0],
                ]
            )
    lines += _table(
        ["contestant", "median ms", "IQR ms", "min-max ms", "n", "x base", "x PEFT", "peak mem MiB"], rows
    )
    r = _ratio(st["lorakit"], st["base"])
    lines += ["", "Goals:", ""]
    lines += _table(
        ["goal", "measured", "target", "result"],
        [
            [
                "lorakit / base forward time",
                _x(r),
                f"<= {INFER_GOAL:.2f}x",
                _pf(None if r is None else r <= INFER_GOAL),
            ]
        ],
    )
    return lines


def _io_section(bench: dict[str, Any], notes: list[str]) -> list[str]:
    s, res = bench["settings"], bench["results"]
    lines = [
        "## merge_save_load",
        "",
        f"Hidden {s['io_hidden']}, {s['io_rounds']} round(s) x {s['io_reps']} repetitions per child. "
        "`merge_and_unload` on a freshly adapted model (LoRA B set non-zero so the merge is real); save = "
        "`lorakit.save_adapter` / `save_pretrained` into a new directory; load = `lorakit.load_adapter` / "
        "`PeftModel.from_pretrained` onto a freshly built base model (file in the OS page cache). Model "
        "construction is never timed. Times in ms: median (min-max), n.",
        "",
    ]
    rows = []
    per = {
        c: {k: _pooled(res.get(c, []), k) for k in ("merge_s", "save_s", "load_s")}
        for c in ("lorakit", "peft")
    }
    for label, key in (
        ("merge_and_unload", "merge_s"),
        ("save adapter", "save_s"),
        ("load adapter", "load_s"),
    ):
        cells = [label]
        for c in ("lorakit", "peft"):
            st = per[c][key]
            cells.append(
                f"{_ms(st['median'])} ({_ms(st['min'])}-{_ms(st['max'])}), n={st['n']}" if st else "error"
            )
        cells.append(_x(_ratio(per["lorakit"][key], per["peft"][key])))
        rows.append(cells)
    size = []
    for c in ("lorakit", "peft"):
        ok = _ok(res.get(c, []))
        size.append(
            f"{ok[0]['adapter_weight_bytes'] / 1e6:.2f} MB ({ok[0]['adapter_bytes'] / 1e6:.2f} MB dir)"
            if ok
            else "error"
        )
        for r in ok[:1]:
            if r.get("lora_b_tensors_randomized", 0) == 0:
                notes.append(
                    f"merge_save_load: {NAMES[c]}: no parameter named like 'lora_B' found, merge check vacuous"
                )
            if r.get("merge_max_abs_diff", 0.0) > 1e-3:
                notes.append(
                    f"merge_save_load: {NAMES[c]}: merged vs unmerged logits differ by "
                    f"{r['merge_max_abs_diff']:.2e}"
                )
    rows.append(["adapter size (weights file)", *size, ""])
    lines += _table(["operation", "lorakit", "PEFT", "lorakit / PEFT"], rows)
    return lines


SECTIONS = {"train_step": _train_section, "inference": _infer_section, "merge_save_load": _io_section}


def render(meta: dict[str, Any], data: dict[str, Any]) -> str:
    threads_seen = sorted(
        {r.get("threads") for b in data.values() for rs in b["results"].values() for r in rs if r.get("ok")}
        - {None}
    )
    resets = {
        r.get("hwm_reset")
        for b in data.values()
        for rs in b["results"].values()
        for r in rs
        if r.get("ok") and "hwm_reset" in r
    }
    lines = ["# lorakit benchmarks", ""]
    if meta["quick"]:
        lines += [
            "> **Quick smoke run** (`--quick`): reduced sizes and repetitions; figures and PASS/FAIL are "
            "indicative only.",
            "",
        ]
    la = ", ".join(f"{x:.2f}" for x in meta["load_avg_end"])
    lines += [
        f"- Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs ({meta['physical_cores']} physical cores); "
        f"torch threads used: {', '.join(map(str, threads_seen)) or meta['threads']}; load average at end: {la}",
        f"- Versions: Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}, lorakit commit {meta['lorakit_commit']} ({meta['lorakit_subject']})",
        f"- Date: {meta['date']}; duration {meta['duration_s']} s; dtype fp32; model: Llama-style, 4 layers, "
        "heads H/64, intermediate ~2.75 H (multiple of 64), vocab 2048; LoRA r=16, alpha=32, all linear layers "
        "except the LM head",
        f"- RSS high-water-mark reset via /proc/self/clear_refs: {'yes' if resets == {True} else 'NO (peak includes model build)'}",
        "",
    ]
    notes: list[str] = []
    for name, bench in data.items():
        lines += SECTIONS[name](bench, notes) + [""]
    errors = [
        (f"{name}/{key}", r)
        for name, b in data.items()
        for key, rs in b["results"].items()
        for r in rs
        if not r.get("ok")
    ]
    if notes:
        lines += ["## Sanity warnings", ""] + [f"- {n}" for n in notes] + [""]
    if errors:
        lines += ["## Errors", ""]
        for key, r in errors:
            lines += [
                f"- `{key}`: {r.get('error')}",
                "",
                "```",
                (r.get("traceback") or "").strip()[-1500:],
                "```",
                "",
            ]
    lines += ["## Method", "", METHOD.format(threads=meta["threads"], warmup=_warmup(data)), ""]
    return "\n".join(lines)


def _warmup(data: dict[str, Any]) -> int:
    return next((int(b["settings"]["warmup"]) for b in data.values()), 2)
