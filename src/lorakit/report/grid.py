"""Module paths as a grid: the layer index and the module type of a path, and {path: value} as layers x types (the
heatmaps of `lorakit report`)."""

from __future__ import annotations

import re
from typing import Any


def layer_and_type(module_path: str) -> tuple[int | None, str]:
    """(layer index, module type) of a module path: "model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj");
    the last number in the path is the layer; a path with none is (None, the path)."""
    found = None
    for match in re.finditer(r"(?:^|\.)(\d+)(?=\.)", module_path):
        found = match
    if found is None:
        return None, module_path
    return int(found.group(1)), module_path[found.end() + 1:]


def heatmap_grid(values: dict[str, float | None]) -> dict[str, Any]:
    """{module path: value} as a grid: rows = layer indices (ascending), columns = module types (first-seen order),
    cells[i][j] the value or None. Paths without a layer index form a row labelled "-"."""
    rows: list[int | None] = []
    cols: list[str] = []
    cells: dict[tuple[int | None, str], float | None] = {}
    for path, value in values.items():
        layer, kind = layer_and_type(path)
        if layer not in rows:
            rows.append(layer)
        if kind not in cols:
            cols.append(kind)
        cells[(layer, kind)] = value
    rows.sort(key=lambda x: (x is None, x if x is not None else 0))
    return {"rows": ["-" if r is None else str(r) for r in rows], "cols": cols,
            "cells": [[cells.get((r, c)) for c in cols] for r in rows]}
