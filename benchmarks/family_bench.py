"""What the family's standalone benchmarks (bench_adalora.py, bench_vera.py, bench_delta_lora.py) share: a child
process per measurement, the paired-ratio cell (median and quartiles of the per-pair ratios), median step times and
the command line (--quick, --threads, --out; the child entry point)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import child
import environment


def spawn(script: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Run `script --child PAYLOAD` in a fresh process; its result line, or {"ok": False, "error": stderr tail}."""
    done = subprocess.run([sys.executable, str(script), "--child", json.dumps(payload)],
                          capture_output=True, text=True, cwd=script.parent)
    line = next((x for x in done.stdout.splitlines() if x.startswith(child.RESULT_MARKER)), None)
    if line is None:
        return {"ok": False, "error": done.stderr[-2000:]}
    return json.loads(line[len(child.RESULT_MARKER):])


def ratio_cell(runs: list[dict[str, Any]]) -> tuple[str, float | None]:
    """"median (q1-q3, n=N)" of every per-pair ratio of the runs, and the median (None when every run failed)."""
    ratios = sorted(r for run in runs if run.get("ok") for r in run["ratios"])
    if not ratios:
        return "error: " + "; ".join(str(run.get("error", ""))[-200:] for run in runs), None
    med = statistics.median(ratios)
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [med, med, med]
    return f"{med:.3f}x ({q[0]:.3f}-{q[2]:.3f}, n={len(ratios)})", med


def median_ms(runs: list[dict[str, Any]], key: str, digits: int = 0) -> str:
    """The median of the runs' `key` times, in ms ("-" when none)."""
    times = [t for run in runs if run.get("ok") for t in run.get(key, [])]
    return f"{statistics.median(times) * 1e3:.{digits}f}" if times else "-"


def main(doc: str | None, run_child: Callable[[dict[str, Any]], dict[str, Any]],
         bench: Callable[[Any, int], dict[str, Any]], report: Callable[[dict[str, Any], dict[str, Any]], list[str]],
         sizes: tuple[Any, Any], default_out: Path) -> int:
    """A benchmark's command line: as a child, run one measurement; else bench (FULL or --quick sizes), print the
    report and (not --quick) write it to --out with the raw results beside it (.json)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(default_out))
    args = ap.parse_args()
    if args.child:
        child.KINDS[json.loads(args.child)["kind"]] = run_child
        return child.main(args.child)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    result = bench(sizes[1] if args.quick else sizes[0], args.threads)
    meta = environment.collect_meta(args.threads, time.perf_counter() - t0, args.quick, load_start)
    text = "\n".join(report(result, meta)) + "\n"
    print(text)
    if not args.quick:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"meta": meta, **result}, indent=1))
    return 0
