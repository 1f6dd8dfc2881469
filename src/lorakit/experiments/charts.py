"""Inline-SVG charts of the experiment pages, beside lorakit.report.page's line_chart / heatmap / bar_chart: a line
chart with a logarithmic x axis (quality against r or d) with horizontal / vertical marker lines (full fine-tuning,
d90) and error bars, and a scatter chart (Delta D against Delta M). Small pure functions: numbers in, an SVG string
out, every text escaped; the page's STYLE is report.page's."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

from ..report.svg import PALETTE, tick_label

Points = Sequence[Sequence[float]]
Series = Mapping[str, Points]
MARKER = "#6b7280"  # grey: reference lines


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 x 10^k apart) covering [lo, hi]; [lo] when lo == hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], start
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def log_ticks(lo: float, hi: float, base: float = 2.0) -> list[float]:
    """The powers of `base` in [lo, hi] (lo > 0); at most ~10 of them (every k-th power when there are more)."""
    first, last = math.ceil(math.log(lo, base) - 1e-9), math.floor(math.log(hi, base) + 1e-9)
    every = max(1, math.ceil((last - first + 1) / 10))
    return [base**k for k in range(first, last + 1, every)]


def _padded(lo: float, hi: float) -> tuple[float, float]:
    if hi > lo:
        pad = 0.05 * (hi - lo)
        return lo - pad, hi + pad
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _frame(width: int, height: int, title: str, box: tuple[int, int, int, int], x_label: str, y_label: str) -> list[str]:
    left, right, top, bottom = box
    return [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(title)}">', f'<text x="{left}" y="14" class="title">{escape(title)}</text>',
            f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>',
            f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" class="tick" text-anchor="middle">'
            f'{escape(x_label)}</text>',
            f'<text transform="translate(12,{(top + height - bottom) / 2:.0f}) rotate(-90)" class="tick" '
            f'text-anchor="middle">{escape(y_label)}</text>']


def _legend_width(names: Sequence[str]) -> int:
    """The right margin that holds a legend of `names` (~6 px per character of a 10 px label); 12 without one."""
    return 12 + (round(6 * max(len(n) for n in names)) + 14 if names else 0)


def _legend(parts: list[str], names: list[tuple[str, str]], x: float, top: int) -> None:
    """One entry per line right of the plot, starting at x: a coloured square and the name."""
    for i, (name, colour) in enumerate(names):
        y = top + 14 * i
        parts.append(f'<rect x="{x:.0f}" y="{y + 2}" width="8" height="8" fill="{colour}"/>'
                     f'<text x="{x + 11:.0f}" y="{y + 10}" class="tick">{escape(name)}</text>')


def log_line_chart(series: Series, title: str, *, base: float = 2.0,
                   points: Series | None = None, errors: Series | None = None,
                   hlines: dict[str, float] | None = None, vlines: dict[str, float] | None = None,
                   x_label: str = "", y_label: str = "", width: int = 680, height: int = 280) -> str:
    """Lines {name: [[x, y], ...]} on a log-`base` x axis; `points`: dots without a line (each run), `errors`:
    vertical bars {name: [[x, lo, hi], ...]} in the colour of the series of that name, `hlines` / `vlines`: dashed
    grey reference lines {label: y} / {label: x}. Non-positive x are left out. "" when there is nothing to draw."""
    points, errors, hlines, vlines = points or {}, errors or {}, hlines or {}, vlines or {}
    drawn = [p for group in (*series.values(), *points.values()) for p in group if p[0] > 0 and math.isfinite(p[1])]
    if not drawn and not hlines:
        return ""
    xs = [p[0] for p in drawn] + [x for x in vlines.values() if x > 0]
    ys = ([p[1] for p in drawn] + [y for y in hlines.values() if math.isfinite(y)]
          + [v for bars in errors.values() for e in bars for v in e[1:] if math.isfinite(v)])
    x_lo, x_hi = (min(xs), max(xs)) if xs else (1.0, base)
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo / base, x_hi * base
    y_lo, y_hi = _padded(min(ys), max(ys))
    names = list(dict.fromkeys([*series, *points]))
    box = left, right, top, bottom = 62, _legend_width(names), 24, 34
    lx_lo, lx_hi = math.log(x_lo, base), math.log(x_hi, base)

    def sx(x: float) -> float:
        return left + (math.log(x, base) - lx_lo) / (lx_hi - lx_lo) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    parts = _frame(width, height, title, box, x_label, y_label)
    for tick in log_ticks(x_lo, x_hi, base):
        parts.append(f'<text x="{sx(tick):.1f}" y="{height - bottom + 12}" class="tick" text-anchor="middle">'
                     f'{escape(tick_label(tick))}</text>')
    for tick in nice_ticks(y_lo, y_hi):
        parts.append(f'<text x="{left - 4}" y="{sy(tick) + 3:.1f}" class="tick" text-anchor="end">'
                     f'{escape(tick_label(tick))}</text>')
    for label, y in hlines.items():
        parts.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{width - right}" y2="{sy(y):.1f}" stroke="{MARKER}" '
                     f'stroke-dasharray="5,4"><title>{escape(label)}: {y:.4g}</title></line>'
                     f'<text x="{left + 4}" y="{sy(y) - 3:.1f}" class="tick">{escape(label)}</text>')
    for label, x in vlines.items():
        if x > 0:
            parts.append(f'<line x1="{sx(x):.1f}" y1="{top}" x2="{sx(x):.1f}" y2="{height - bottom}" '
                         f'stroke="{MARKER}" stroke-dasharray="5,4"><title>{escape(label)}: {x:.4g}</title></line>'
                         f'<text x="{sx(x) + 3:.1f}" y="{top + 10}" class="tick">{escape(label)}</text>')
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    for name, bars in errors.items():
        for x, lo, hi in bars:
            if x > 0 and math.isfinite(lo) and math.isfinite(hi):
                parts.append(f'<line x1="{sx(x):.1f}" y1="{sy(lo):.1f}" x2="{sx(x):.1f}" y2="{sy(hi):.1f}" '
                             f'stroke="{colour.get(name, MARKER)}" stroke-width="1"/>')
    for name, pts in series.items():
        pts = [p for p in pts if p[0] > 0 and math.isfinite(p[1])]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour[name]}" stroke-width="1.5">'
                     f'<title>{escape(name)}</title></polyline>')
    for name, pts in points.items():
        for x, y in pts:
            if x > 0 and math.isfinite(y):
                parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour[name]}">'
                             f'<title>{escape(name)}: x {x:.4g}, y {y:.4g}</title></circle>')
    _legend(parts, [(n, colour[n]) for n in names], width - right + 10, top)
    parts.append("</svg>")
    return "".join(parts)


def scatter_chart(groups: Series, title: str, *, x_label: str = "", y_label: str = "",
                  width: int = 520, height: int = 300) -> str:
    """Points {group: [[x, y], ...]}, one colour per group (legend), with the x = 0 and y = 0 lines when they fall
    inside the plot; "" when there is no finite point."""
    drawn = {g: [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])] for g, pts in groups.items()}
    every = [p for pts in drawn.values() for p in pts]
    if not every:
        return ""
    x_lo, x_hi = _padded(min(p[0] for p in every), max(p[0] for p in every))
    y_lo, y_hi = _padded(min(p[1] for p in every), max(p[1] for p in every))
    names = list(drawn)
    box = left, right, top, bottom = 62, _legend_width(names), 24, 34

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    parts = _frame(width, height, title, box, x_label, y_label)
    for tick in nice_ticks(x_lo, x_hi):
        parts.append(f'<text x="{sx(tick):.1f}" y="{height - bottom + 12}" class="tick" text-anchor="middle">'
                     f'{escape(tick_label(tick))}</text>')
    for tick in nice_ticks(y_lo, y_hi):
        parts.append(f'<text x="{left - 4}" y="{sy(tick) + 3:.1f}" class="tick" text-anchor="end">'
                     f'{escape(tick_label(tick))}</text>')
    if x_lo < 0 < x_hi:
        parts.append(f'<line x1="{sx(0):.1f}" y1="{top}" x2="{sx(0):.1f}" y2="{height - bottom}" stroke="#ddd"/>')
    if y_lo < 0 < y_hi:
        parts.append(f'<line x1="{left}" y1="{sy(0):.1f}" x2="{width - right}" y2="{sy(0):.1f}" stroke="#ddd"/>')
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        for x, y in drawn[name]:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}" fill-opacity="0.75">'
                         f'<title>{escape(name)}: {x:.4g}, {y:.4g}</title></circle>')
    _legend(parts, [(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(names)], width - right + 10, top)
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["log_line_chart", "log_ticks", "nice_ticks", "scatter_chart", "tick_label"]
