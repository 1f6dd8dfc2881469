"""Sections of `lorakit report`'s page for what only some runs have: the plan next to the measured memory
(runs with memory.json), the NF4 error per module (--quantize nf4 with --model) and DoRA's magnitude per output row.
Each returns "" when there is nothing to show. Plots come from report/page.py's SVG helpers."""

from __future__ import annotations

from html import escape
from typing import Any

from .svg import heatmap, line_chart

NOTE_MEMORY = ("The plan is `lorakit plan` for this run's own settings (train_config.yaml: model, method, r, targets, "
               "dtype, batch, max_length), computed from the model's config alone. The measured figure covers the "
               "whole process from before the model was loaded: also the tokenizer and data, evaluation, saving, "
               "the allocator's slack and short-lived tensors, which the plan does not model.")


def _mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.1f} MiB"


def _section(title: str, body: str, section_id: str) -> str:
    return f'<section id="{section_id}"><h2>{escape(title)}</h2>{body}</section>'


def memory_panel(memory: dict[str, Any] | None) -> str:
    """The plan's rows (bytes per item, the total) and the run's measured peak, side by side, with their ratio."""
    if not memory:
        return ""
    rows = "".join(f"<tr><td>{escape(name)}</td><td class=\"num\">{_mib(nbytes)}</td></tr>"
                   for name, nbytes in memory["rows"])
    plan = (f'<table class="numbers" id="memory-plan"><tr><th>lorakit plan</th><th></th></tr>{rows}</table>'
            if rows else f"<p>{escape(memory['note'])}</p>")
    measured = memory["measured"]
    ratio = "-" if memory["ratio"] is None else f"{memory['ratio']:.2f}"
    side = (f'<table class="numbers" id="memory-measured"><tr><th>measured ({escape(memory["measured_what"])})</th>'
            f'<td id="memory-measured-bytes" data-value="{memory["measured_bytes"] or ""}">'
            f'{_mib(memory["measured_bytes"])}</td></tr>'
            f'<tr><th>peak resident set of the process</th><td>{_mib(measured.get("peak_rss_bytes"))}</td></tr>'
            f'<tr><th>resident set before loading</th><td>{_mib(measured.get("start_rss_bytes"))}</td></tr>'
            f'<tr><th>plan total / measured</th><td id="memory-ratio">{ratio}</td></tr>'
            f'<tr><th>covers</th><td>{escape(str(measured.get("covers", "")))}</td></tr></table>')
    body = f'<div class="plot">{plan}</div><div class="plot">{side}</div><p class="note">{escape(NOTE_MEMORY)}</p>'
    return _section("Memory: the plan next to what this run measured", body, "memory")


def nf4_panel(nf4: dict[str, Any] | None) -> str:
    """The NF4 error ||W - deq(q(W))||_F / ||W||_F per quantised module: a layers x module types heatmap."""
    if not nf4:
        return ""
    grid = nf4["heatmap"]
    chart = heatmap(grid["rows"], grid["cols"], grid["cells"],
                    "NF4 relative error ||W - NF4(W)||_F / ||W||_F: layers (rows) x module types")
    mean = "-" if nf4["mean"] is None else f"{nf4['mean']:.4f}"
    worst = "-" if nf4["max"] is None else f"{nf4['max']:.4f}"
    body = (f'<p>{len(nf4["modules"])} weights stored in NF4 (blocks of 64, double-quantised scales); mean relative '
            f'error <b id="nf4-mean">{mean}</b>, largest <b>{worst}</b>.</p><div class="plot">{chart}</div>')
    return _section("NF4 error per module (the quantised base)", body, "nf4")


def dora_panel(adapter: dict[str, Any] | None) -> str:
    """DoRA modules: per output row the magnitude change m_i - ||W0_i|| (with --model) or the magnitude m_i, and
    the means of |ΔM| and of the direction change 1 - cos(W0_i + s(BA)_i, W0_i) (the DoRA paper's ΔM, ΔD)."""
    modules = [m for m in (adapter or {}).get("modules", []) if m.get("dora")]
    if not modules:
        return ""
    with_base = modules[0]["dora"]["magnitude_change"] is not None
    rows, charts = [], []
    for m in modules:
        dora = m["dora"]
        values = dora["magnitude_change"] if with_base else dora["magnitude"]
        title = f"{m['module']}: {'m_i - ||W0_i||' if with_base else 'm_i'} per output row"
        charts.append(f'<div class="plot">{line_chart({"row": [[i, v] for i, v in enumerate(values)]}, title, 420, 160)}'
                      "</div>")
        if with_base:
            rows.append(f"<tr><td><code>{escape(m['module'])}</code></td><td>{dora['mean_abs_magnitude_change']:.4g}</td>"
                        f"<td>{dora['mean_direction_change']:.4g}</td></tr>")
    table = ("<table><tr><th>module</th><th>ΔM = mean |m_i − ||W0_i|| |</th><th>ΔD = mean (1 − cos)</th></tr>"
             + "".join(rows) + "</table>") if rows else \
        "<p>Pass <code>--model DIR</code> to see the change against the base weight's row norms.</p>"
    note = ("<p class=\"note\">DoRA's W' row i = m_i (W0 + s B A)_i / ||(W0 + s B A)_i||: the magnitude m is trained "
            "per output row (as PEFT stores it); its start is ||W0_i||.</p>")
    return _section("DoRA: magnitude and direction per output row", table + note + "".join(charts), "dora")


def demo_panel(demo: dict[str, Any] | None, source: str) -> str:
    """The embedded demo's table (its table.md), and which of its runs the sections below show."""
    if not demo:
        return ""
    table = demo["table"]
    head = "".join(f"<th>{escape(c)}</th>" for c in table["head"])
    rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table["rows"])
    after = "".join(f"<p class=\"note\">{escape(p)}</p>" for p in table["after"].split("\n\n") if p.strip())
    shown = f"{source.rstrip('/')}/{demo['shown']}"
    body = (f'<table id="demo-table"><tr>{head}</tr>{rows}</table>{after}'
            f"<p>The sections below show the run <code>{escape(shown)}</code>; "
            f"<code>lorakit report {escape(shown)}</code> makes its page alone.</p>")
    return _section("The embedded demo: " + ", ".join(demo["methods"]), body, "demo")
