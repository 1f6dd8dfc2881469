"""variants: every method of the family trains on a tiny model; the table's rows, their numbers and files."""

from __future__ import annotations

import json

import pytest
from experiment_helpers import tiny_task, write_classification_jsonl

from lorakit.experiments import variants
from lorakit.experiments.cells import CellStore


def test_method_settings_follow_the_family_and_the_steps():
    assert variants.method_settings("lora", 100, 500)["r"] == 8
    vera = variants.method_settings("vera", 100, 500)
    assert vera["r"] == 256 and vera["method_options"] == {"d_initial": 0.1}
    ada = variants.method_settings("adalora", 200, 500)["method_options"]
    assert (ada["tinit"], ada["tfinal"], ada["deltaT"]) == (20, 40, 2)  # 10% / 20% / 1% of 200 steps
    delta = variants.method_settings("delta_lora", 200, 500)
    assert delta["method_options"]["update_start_step"] == 50 and delta["lora_dropout"] == 0.0


def test_quick_variants_on_a_tiny_model(classifier_dir, tmp_path, capsys):
    data = write_classification_jsonl(tmp_path / "cls.jsonl", n=40)
    task = tiny_task(classifier_dir, data, steps=3)
    out = tmp_path / "out"
    results = variants.run(task, out, quick=True, seeds=None,
                           store=CellStore(out, variants.NAME, {"task": task.describe(), "seeds": None}))
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == list(variants.METHODS)
    assert rows["full"]["trainable"] == rows["full"]["total"] and rows["full"]["vs_full"] == pytest.approx(1.0)
    assert rows["lora_fa"]["trainable"] < rows["lora"]["trainable"] < rows["dora"]["trainable"]  # A frozen / + m
    assert rows["vera"]["trainable"] < rows["lora"]["trainable"]
    for row in rows.values():
        assert 0.0 <= row["mean"] <= 1.0 and row["seconds"] > 0 and row["saved_bytes"] > 0
        assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] > 0
    assert rows["lora"]["saved"] == "adapter" and rows["full"]["saved"] == "model"
    saved = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in saved["results"]["rows"]] == list(variants.METHODS)
    table = (out / "table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| method | trainable params |") and len(lines) == 1 + len(variants.METHODS)
    assert "LoRA-FA r=8" in capsys.readouterr().out and (out / "page.html").is_file()
