"""Inline SVG plots as small pure functions (no plotting library, no network): a line chart, a heatmap and a bar
chart; `lorakit report`'s page and the experiment pages draw with them. Every text placed in the SVG is escaped."""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f")


def tick_label(value: float) -> str:
    """A short axis label: 0, 0.25, 1.5e+04, 3.0e-04."""
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _scale(lo: float, hi: float, out_lo: float, out_hi: float) -> Callable[[float], float]:
    span = hi - lo if hi > lo else 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def line_chart(series: dict[str, list[list[float]]], title: str, width: int = 520, height: int = 220) -> str:
    """An inline SVG line chart of {name: [[x, y], ...]} (a legend when several); "" when there is no point."""
    points = [p for s in series.values() for p in s]
    if not points:
        return ""
    left, right, top, bottom = 60, 10, 24, 28
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx = _scale(min(xs), max(xs), left, width - right)
    sy = _scale(min(ys), max(ys), height - bottom, top)
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{left}" y="14" class="title">{escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>']
    for value in (min(ys), max(ys)):
        parts.append(f'<text x="{left - 4}" y="{sy(value) + 4:.1f}" class="tick" text-anchor="end">'
                     f'{escape(tick_label(value))}</text>')
    for value in (min(xs), max(xs)):
        parts.append(f'<text x="{sx(value):.1f}" y="{height - 10}" class="tick" text-anchor="middle">'
                     f'{escape(tick_label(value))}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5">'
                     f'<title>{escape(name)}</title></polyline>')
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{colour}"/>')
        if len(series) > 1:
            parts.append(f'<text x="{width - right - 4}" y="{top + 12 * (i + 1)}" class="tick" text-anchor="end" '
                         f'fill="{colour}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _colour(value: float | None, hi: float) -> str:
    """White (0) to deep blue (hi); grey for a missing value."""
    if value is None or not math.isfinite(value):
        return "#e5e7eb"
    t = min(max(value / hi, 0.0), 1.0) if hi > 0 else 0.0
    r, g, b = (round(255 - t * (255 - c)) for c in (30, 64, 175))
    return f"rgb({r},{g},{b})"


def heatmap(rows: list[str], cols: list[str], cells: list[list[float | None]], title: str, cell: int = 56) -> str:
    """An inline SVG heatmap: one row per label in `rows`, one column per label in `cols`, each cell coloured by
    its value (its number written inside); "" for an empty grid."""
    if not rows or not cols:
        return ""
    values = [v for row in cells for v in row if v is not None and math.isfinite(v)]
    hi = max(values, default=0.0)
    left = 12 + 6 * max(len(r) for r in rows)  # ~6 px per character of a 10 px label
    top = 30 + round(4.5 * max(len(c) for c in cols))  # the column labels are turned 45 degrees
    width = max(left + cell * len(cols) + 10, 8 * len(title))
    height = top + 22 * len(rows) + 10
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">', f'<text x="4" y="14" class="title">{escape(title)}</text>']
    for j, col in enumerate(cols):
        x = left + cell * j + cell / 2
        parts.append(f'<text transform="translate({x:.1f},{top - 6}) rotate(-45)" class="tick">{escape(col)}</text>')
    for i, row in enumerate(rows):
        y = top + 22 * i
        parts.append(f'<text x="{left - 6}" y="{y + 15}" class="tick" text-anchor="end">{escape(row)}</text>')
        for j, value in enumerate(cells[i]):
            label = "-" if value is None else f"{value:.3g}"
            parts.append(f'<rect x="{left + cell * j}" y="{y}" width="{cell - 2}" height="20" '
                         f'fill="{_colour(value, hi)}"><title>{escape(row)} / {escape(cols[j])}: {label}</title></rect>'
                         f'<text x="{left + cell * j + cell / 2 - 1:.1f}" y="{y + 14}" class="cell" '
                         f'text-anchor="middle">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(values: list[float], title: str, width: int = 220, height: int = 64) -> str:
    """An inline SVG bar chart of non-negative values (a spectrum σ_1 >= σ_2 >= ...); "" when empty."""
    if not values:
        return ""
    top, bottom = 18, 4
    hi = max(values) or 1.0
    bar = (width - 4) / len(values)
    parts = [f'<svg class="bars" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}"><text x="2" y="12" class="tick">{escape(title)}</text>']
    for i, value in enumerate(values):
        h = max(value, 0.0) / hi * (height - top - bottom)
        parts.append(f'<rect x="{2 + i * bar:.1f}" y="{height - bottom - h:.1f}" width="{max(bar - 1, 1):.1f}" '
                     f'height="{h:.1f}" fill="{PALETTE[0]}"><title>sigma_{i + 1} = {value:.4g}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)
