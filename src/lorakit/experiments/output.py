"""What every experiment writes into its --out: results.json (the numbers, the task, the settings, the versions and
the date), table.md (the printed table and its summary) and page.html: ONE self-contained page (no CDN, no
network) with the experiment's inline-SVG sections, the table and the data inlined as JSON, styled as
`lorakit report`'s page. All three are written atomically (lorakit.io.files.atomic_write)."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..report.page import STYLE, finite

if TYPE_CHECKING:
    from .core import Task

EXTRA_STYLE = "table.results td,table.results th{font-family:ui-monospace,monospace}section{margin-bottom:12px}"


def versions() -> dict[str, str]:
    """lorakit, torch, transformers and Python versions."""
    import torch
    import transformers

    from .. import __version__

    return {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def markdown_table_rows(table_md: str) -> list[list[str]]:
    """The cells of a markdown table's rows ("| a | b |" lines; the "|---|" rule dropped); other lines ignored."""
    rows = []
    for line in table_md.splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            continue
        cells = [c.strip() for c in line[1:-1].split("|")]
        if all(set(c) <= set("-: ") and c for c in cells):
            continue  # the header rule
        rows.append(cells)
    return rows


def table_html(table_md: str) -> str:
    """A markdown table as an HTML table (first row: the header); every cell escaped. "" for no table."""
    rows = markdown_table_rows(table_md)
    if not rows:
        return ""
    head = "".join(f"<th>{escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _json_for_script(data: Any) -> str:
    """JSON safe inside <script>: '<', '>' and '&' written as \\u003c, \\u003e, \\u0026."""
    text = json.dumps(finite(data), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(experiment: str, record: dict[str, Any], table_md: str, sections: list[tuple[str, str]],
                summary: str = "") -> str:
    """The page: title, the task in one line, the summary, each (heading, inline SVG / HTML) section, the table,
    and `record` (results.json's content) inlined as JSON in <script type="application/json" id="experiment-data">.
    Section bodies are the experiment's own SVG / HTML (made with escaped text); headings and summary are escaped."""
    task = record["task"]
    title = f"lorakit experiment {experiment}"
    intro = (f"<p>{escape(task['name'])}: {escape(task['kind'])}, {task['train_examples']:,} training / "
             f"{task['eval_examples']:,} evaluation examples, metric {escape(task['metric'])}; "
             f"{escape(record['date'])}, lorakit {escape(record['versions']['lorakit'])}, torch "
             f"{escape(record['versions']['torch'])}.</p>")
    body = "".join(f"<section><h2>{escape(heading)}</h2>{html}</section>" for heading, html in sections)
    note = "".join(f'<p class="note">{escape(line)}</p>' for line in summary.splitlines() if line.strip())
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{STYLE}{EXTRA_STYLE}</style></head><body>"
            f"<h1>{escape(title)}</h1>{intro}{note}{body}<section><h2>Table</h2>{table_html(table_md)}</section>"
            f'<script type="application/json" id="experiment-data">{_json_for_script(record)}</script>'
            "</body></html>\n")


def write_outputs(out_dir: Path, experiment: str, task: Task, results: dict, table_md: str,
                  sections: list[tuple[str, str]], summary: str = "", stream: TextIO | None = None) -> dict[str, Any]:
    """Write results.json ({experiment, task: task.describe(), results, versions, date, argv}), table.md (the
    table, then `summary`) and page.html (render_page) into `out_dir`, print the table and summary to `stream`
    (default stdout), and return the record written to results.json. NaN / infinities are written as null."""
    from ..io.files import atomic_write

    out_dir = Path(out_dir)
    record = finite({"experiment": experiment, "task": task.describe(), "results": results, "versions": versions(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "argv": list(sys.argv)})
    text = table_md.rstrip() + "\n" + (f"\n{summary.rstrip()}\n" if summary.strip() else "")
    page = render_page(experiment, record, table_md, sections, summary)
    atomic_write(out_dir, {
        "results.json": lambda p: p.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n"),
        "table.md": lambda p: p.write_text(text),
        "page.html": lambda p: p.write_text(page, encoding="utf-8"),
    })
    print(f"\n{text}\nwrote {out_dir / 'results.json'}, {out_dir / 'table.md'}, {out_dir / 'page.html'}",
          file=stream or sys.stdout, flush=True)
    return record


__all__ = ["markdown_table_rows", "render_page", "table_html", "versions", "write_outputs"]
