"""`lorakit report`: the page's data (curves, rank-k tables, ||sBA||/||W0||), the self-contained HTML file, and the
CLI's errors; on a tiny `lorakit train` run and on an adapter saved by the real `peft`."""

from __future__ import annotations

import json
import math
import re

import pytest
from report_helpers import RUN_STEPS, build_peft_adapter, build_report_run, expected_rank_k, inlined_data

from lorakit.cli.main import main
from lorakit.report.data import heatmap_grid, layer_and_type, rank_k_table
from lorakit.report.page import _json_for_script, ba_counts, render

report_run = pytest.fixture(build_report_run, scope="module", name="report_run")
peft_adapter = pytest.fixture(build_peft_adapter, scope="module", name="peft_adapter")


def test_rank_k_table_energy_error_and_bound():
    rows = rank_k_table([1.0, 3.0, 2.0])  # sorted inside: 3, 2, 1; total energy 14
    assert [r["k"] for r in rows] == [1, 2, 3]
    assert rows[0]["energy_kept"] == pytest.approx(9 / 14) and rows[1]["energy_kept"] == pytest.approx(13 / 14)
    assert rows[0]["rel_error"] == pytest.approx(math.sqrt(5 / 14)) and rows[2]["rel_error"] == 0.0
    assert all(r["rel_error"] == r["bound"] for r in rows)
    assert rank_k_table([0.0, 0.0])[1] == {"k": 2, "energy_kept": None, "rel_error": None, "bound": None}


def test_layer_and_type_and_grid():
    assert layer_and_type("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert layer_and_type("transformer.h.10.attn.c_attn") == (10, "attn.c_attn")
    assert layer_and_type("lm_head") == (None, "lm_head")
    grid = heatmap_grid({"m.layers.1.q": 0.2, "m.layers.0.q": 0.1, "m.layers.0.v": 0.3})
    assert grid == {"rows": ["0", "1"], "cols": ["q", "v"], "cells": [[0.1, 0.3], [0.2, None]]}


def test_ba_counts_reproduce_the_seed_figures():
    assert ba_counts(4096, 8) == {"lora": 65_536, "full": 16_777_216, "ratio": 256.0}


def test_inlined_json_cannot_close_the_script_tag():
    text = _json_for_script({"name": "</script><script>alert(1)</script>"})
    assert "</script>" not in text and json.loads(text)["name"].startswith("</script>")


def _check_page(html: str, adapter_dir) -> dict:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html), "the page refers to a network resource"
    assert "<link" not in html and "<script src" not in html
    data = inlined_data(html)
    expected = expected_rank_k(adapter_dir)
    modules = {m["module"]: m for m in data["adapter"]["modules"]}
    assert set(modules) == set(expected)
    for name, rows in expected.items():
        table = modules[name]["rank_k"]
        assert len(table) == len(rows) == modules[name]["r"]
        for row, (energy, error) in zip(table, rows):
            assert row["energy_kept"] == pytest.approx(energy, rel=1e-9)
            assert row["rel_error"] == pytest.approx(error, rel=1e-6, abs=1e-9)
            assert row["bound"] == row["rel_error"]
    return data


def test_report_on_a_run_with_model(report_run, causal_lm_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "report.html"
    assert main(["report", str(report_run), "--model", str(causal_lm_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = _check_page(out.read_text(encoding="utf-8"), report_run / "adapter")
    assert data["kind"] == "run"
    curves = data["curves"]
    assert [s for s, _ in curves["loss"]] == list(range(1, RUN_STEPS + 1))
    assert [s for s, _ in curves["lr"]] == list(range(1, RUN_STEPS + 1))
    assert [s for s, _ in curves["eval"]["eval_loss"]] == [4, 8]
    assert [s for s, _ in curves["diagnostics"]["update_ratio_median"]] == [4, 8]
    assert len(curves["update_ratio"]) == len(data["adapter"]["modules"])
    grid = data["adapter"]["heatmap"]
    assert grid["rows"] == ["0", "1"] and "self_attn.q_proj" in grid["cols"]
    assert all(v is not None and v > 0 for row in grid["cells"] for v in row)
    assert data["checkpoints"]["steps"] == [4, 8]
    final = {m["module"]: m["ratio_to_weight"] for m in data["adapter"]["modules"]}
    for module, ratios in data["checkpoints"]["modules"].items():
        assert ratios[-1] == pytest.approx(final[module])  # the step-8 checkpoint is the final adapter


def test_report_on_a_peft_adapter(peft_adapter, tmp_path, capsys):
    out = tmp_path / "peft.html"
    assert main(["report", str(peft_adapter), "--out", str(out)]) == 0
    data = _check_page(out.read_text(encoding="utf-8"), peft_adapter)
    assert data["kind"] == "adapter" and data["curves"] is None and data["adapter"]["heatmap"] is None
    assert {m["r"] for m in data["adapter"]["modules"]} == {4}


def test_render_escapes_text():
    data = {"kind": "adapter", "source": "<b>x</b>", "model_dir": None, "curves": None, "checkpoints": None,
            "adapter": None}
    html = render(data)
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "neither an adapter directory"),
])
def test_bad_directory_is_one_line_exit_2(tmp_path, capsys, make, message):
    assert main(["report", str(make(tmp_path)), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit: error:") and message in err and "\n" not in err
    assert not (tmp_path / "r.html").exists()
