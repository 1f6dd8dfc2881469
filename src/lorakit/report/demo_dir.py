"""`lorakit report` on the embedded demo's output directory (`lorakit train` with no model and no data: runs/demo):
one folder per method (each a `lorakit train` run), the demo's metrics.jsonl (one record per method, then a summary)
and table.md. The page shows the demo's table, then the first method that saved an adapter (LoRA by default) as a
run. Also: the model a run was trained on, from its train_config.yaml, so that a run's page has ||sBA||/||W0||
without --model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TABLE = "table.md"


def markdown_table(text: str) -> dict[str, Any]:
    """The first pipe table of a Markdown text as {"head": [...], "rows": [[...], ...], "after": the text after it}
    ({"head": [], "rows": [], "after": text} when there is none). Cells are stripped; the |---| line is dropped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
    if start is None:
        return {"head": [], "rows": [], "after": text.strip()}
    end = start
    while end < len(lines) and lines[end].lstrip().startswith("|"):
        end += 1
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start:end]]
    body = [row for row in cells[1:] if not all(set(c) <= set("-: ") for c in row)]
    return {"head": cells[0], "rows": body, "after": "\n".join(lines[end:]).strip()}


def demo_records(directory: Path) -> list[dict[str, Any]] | None:
    """The per-method records of a demo output directory (table.md, and a metrics.jsonl whose records name a
    "method" with its own run folder), in the order they ran; None for any other directory."""
    metrics, table = directory / "metrics.jsonl", directory / TABLE
    if not (metrics.is_file() and table.is_file()):
        return None
    records = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("method"), str):
            records.append(record)
    if not records or not all((directory / r["method"]).is_dir() for r in records):
        return None
    return records


def shown_method(directory: Path, records: list[dict[str, Any]]) -> str:
    """The method whose run the page shows: the first that saved an adapter, else the first."""
    for record in records:
        if (directory / record["method"] / "adapter" / "adapter_config.json").is_file():
            return record["method"]
    return records[0]["method"]


def demo_summary(directory: Path, records: list[dict[str, Any]], shown: str) -> dict[str, Any]:
    """What the page's demo section shows: the table (parsed table.md), the methods and the one shown below."""
    table = markdown_table((directory / TABLE).read_text(encoding="utf-8"))
    return {"table": table, "methods": [r["method"] for r in records], "shown": shown}


def run_model(run_dir: Path) -> str | None:
    """The model directory a `lorakit train` run names in its train_config.yaml, when it is a local directory that
    is still there (a model ID is not fetched for a report); else None."""
    import yaml  # type: ignore[import-untyped, unused-ignore]  # stubs may or may not be installed

    try:
        config = yaml.safe_load((run_dir / "train_config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    model = config.get("model") if isinstance(config, dict) else None
    return model if isinstance(model, str) and (Path(model) / "config.json").is_file() else None
