"""Statistics and markdown-table helpers shared by the benchmark report sections.

A figure is the median of the pooled samples; spread is the IQR (25th-75th percentile, inclusive
method) and min-max; runs are the JSON dicts the child processes return (``ok`` marks success).
"""

from __future__ import annotations

import statistics
from typing import Any


def stats(values: list[float]) -> dict[str, float]:
    """median, min, max, q1, q3, n of ``values`` (empty dict if none)."""
    vals = sorted(values)
    if not vals:
        return {}
    q1, q3 = vals[0], vals[0]
    if len(vals) > 1:
        quart = statistics.quantiles(vals, n=4, method="inclusive")
        q1, q3 = quart[0], quart[2]
    med = statistics.median(vals)
    return {"median": med, "min": vals[0], "max": vals[-1], "q1": q1, "q3": q3, "n": len(vals)}


def ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if r.get("ok")]


def pooled(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    return stats([t for r in ok(runs) for t in r.get(key, [])])


def ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def time_cells(st: dict[str, float], runs: list[Any]) -> list[str]:
    if not st:
        return ["error" if runs else "skipped", "", "", ""]
    iqr = f"{ms(st['q1'])}-{ms(st['q3'])}"
    return [ms(st["median"]), iqr, f"{ms(st['min'])}-{ms(st['max'])}", str(st["n"])]


def ratio(a: dict[str, float], b: dict[str, float]) -> float | None:
    return a["median"] / b["median"] if a and b and b["median"] > 0 else None


def x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}x"


def pf(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "**FAIL**")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def mem(runs: list[dict[str, Any]]) -> tuple[str, float | None]:
    vals = [r["peak_growth_mb"] for r in ok(runs)]
    if not vals:
        return ("error" if runs else "skipped"), None
    st = stats(vals)
    spread = f" ({st['min']:.0f}-{st['max']:.0f})" if len(vals) > 1 else ""
    return f"{st['median']:.0f}{spread}", st["median"]


def goal(label: str, ratio: float | None, limit: float) -> list[str]:
    return [label, x(ratio), f"<= {limit:.2f}x", pf(None if ratio is None else ratio <= limit)]


def busy(runs: list[dict[str, Any]]) -> str:
    """Max share of the CPUs other processes used while these runs were timing ('' if unknown)."""
    vals = [r["foreign_cpu_share"] for r in ok(runs) if "foreign_cpu_share" in r]
    return f"{max(vals):.0%}" if vals else ""


def faults(runs: list[dict[str, Any]]) -> str:
    """Median minor page faults per timed step over a row's children ('' for runs made before they were counted)."""
    values = [f for r in ok(runs) for f in r.get("faults_per_step", [])]
    return f"{stats(values)['median']:.0f}" if values else ""
