"""lorakit.experiments.core / cells: the task from --model / --data, one training run through the loop (metrics,
checkpoints, a caller's own trainable parameters), the resumable cell store and the progress line."""

from __future__ import annotations

import io
import json

import pytest
import torch
from experiment_helpers import tiny_task, write_classification_jsonl, write_text_jsonl
from safetensors.torch import load_file

from lorakit.errors import ConfigError, DataError
from lorakit.experiments.cells import CellStore, Progress, duration, run_cell, settings_difference
from lorakit.experiments.core import load_task, train_run


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return write_classification_jsonl(tmp_path_factory.mktemp("data") / "cls.jsonl", n=40)


def test_task_from_model_and_data(classifier_dir, causal_lm_dir, cls_data, tmp_path):
    task = load_task(str(classifier_dir), str(cls_data), quick=True, seed=0, device="cpu")
    assert (task.kind, task.metric, task.higher_is_better) == ("classification", "eval_accuracy", True)
    assert task.labels == ["negative", "positive"]
    assert (len(task.train_records), len(task.eval_records)) == (32, 8)  # 20% held out
    everything = [json.loads(line) for line in cls_data.read_text().splitlines()]
    key = lambda r: (r["text"], r["label"])  # noqa: E731
    assert sorted(task.train_records + task.eval_records, key=key) == sorted(everything, key=key)  # a split
    again = load_task(str(classifier_dir), str(cls_data), quick=True, seed=0, device="cpu")
    assert again.eval_records == task.eval_records  # the split is fixed by the seed
    assert task.settings["steps"] >= 10 and task.settings["device"] == "cpu"

    lm = load_task(str(causal_lm_dir), str(write_text_jsonl(tmp_path / "lm.jsonl")), quick=True, device="cpu")
    assert (lm.kind, lm.metric, lm.higher_is_better) == ("causal-lm", "eval_loss", False)


def test_task_needs_model_and_data_together(cls_data, classifier_dir, tmp_path):
    with pytest.raises(ConfigError, match="--model needs --data"):
        load_task(str(classifier_dir), None, quick=True)
    with pytest.raises(ConfigError, match="--data needs --model"):
        load_task(None, str(cls_data), quick=True)
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "good", "label": "a"}\n')
    with pytest.raises(DataError, match="too few"):
        load_task(str(classifier_dir), str(one), quick=True)


def test_fresh_model_head_is_seeded_without_touching_global_rng(classifier_dir, cls_data, tmp_path):
    task = tiny_task(classifier_dir, cls_data, steps=2)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    a, b, c = task.fresh_model(0), task.fresh_model(0), task.fresh_model(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert torch.equal(a.bert.embeddings.word_embeddings.weight, c.bert.embeddings.word_embeddings.weight)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    train_run(task, "lora", seed=0, out_dir=tmp_path / "run", r=2)  # the loop seeds torch: restored afterwards
    assert torch.equal(torch.get_rng_state(), before)


def test_train_run_writes_metrics_and_all_checkpoints(classifier_dir, cls_data, tmp_path):
    task = tiny_task(classifier_dir, cls_data, steps=4)
    run = train_run(task, "lora", seed=0, out_dir=tmp_path / "run", r=4, save_steps=1)
    assert 0.0 <= run.metric <= 1.0 and run.metric == run.metrics["eval_accuracy"]
    assert run.metrics["steps"] == 4 and run.trainable < run.total
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in records)
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == [f"step-{i:07d}" for i in (1, 2, 3, 4)]  # every checkpoint kept, not only the last 2
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "adapter" / "adapter_model.safetensors").is_file()
    assert run.saved_dir == tmp_path / "run" / "adapter" and run.model is not None
    run.release()
    assert run.model is None
    again = train_run(task, "lora", seed=0, out_dir=tmp_path / "run", r=4)  # a rerun replaces the directory
    assert again.metric == pytest.approx(run.metric)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_configure_freezes_what_the_caller_chooses(classifier_dir, cls_data, tmp_path):
    task = tiny_task(classifier_dir, cls_data)
    plain = train_run(task, "lora", seed=0, out_dir=tmp_path / "plain", r=2)
    frozen = {}

    def frozen_random_b(model):
        gen = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.requires_grad_(False)
                p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                frozen[name] = p.detach().clone()

    run = train_run(task, "lora", seed=0, out_dir=tmp_path / "frozen", r=2, configure=frozen_random_b)
    assert frozen and run.trainable == plain.trainable - sum(t.numel() for t in frozen.values())
    params = dict(run.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())  # B did not move
    assert (tmp_path / "frozen" / "adapter" / "adapter_model.safetensors").is_file()


def test_custom_run_trains_only_the_callers_parameters(classifier_dir, cls_data, tmp_path):
    task = tiny_task(classifier_dir, cls_data)
    model = task.fresh_model(0)
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = train_run(task, "custom", seed=0, out_dir=tmp_path / "custom", model=model, save_steps=3)
    assert run.trainable == model.classifier.weight.numel()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved == ["classifier.weight"]
    saved = load_file(str(tmp_path / "custom" / "trainable" / "trainable.safetensors"))
    assert list(saved) == ["classifier.weight"] and torch.equal(saved["classifier.weight"], model.classifier.weight)
    assert (tmp_path / "custom" / "checkpoints" / "step-0000003" / "trainable.safetensors").is_file()
    with pytest.raises(ConfigError, match="custom"):
        train_run(task, "custom", seed=0, out_dir=tmp_path / "none")


def test_cell_store_resumes_without_running_a_cell_again(tmp_path):
    calls = []

    def cell(value):
        def fn():
            calls.append(value)
            return {"value": value, "nan": float("nan")}
        return fn

    settings = {"task": {"steps": 3, "labels": ("a", "b")}, "seeds": None}
    store = CellStore(tmp_path, "rank-sweep", settings)
    assert store.run("r1-seed0", cell(1))["value"] == 1 and store.run("r2-seed0", cell(2))["value"] == 2
    again = CellStore(tmp_path, "rank-sweep", settings)  # tuples and lists are the same setting
    results = [again.run("r1-seed0", cell(10)), again.run("r2-seed0", cell(20)), again.run("r4-seed0", cell(4))]
    assert calls == [1, 2, 4] and [r["value"] for r in results] == [1, 2, 4]
    assert again.reused == ["r1-seed0", "r2-seed0"] and again.computed == ["r4-seed0"]

    with pytest.raises(ConfigError, match=r"task\.steps=3; this run has task\.steps=5.*--restart"):
        CellStore(tmp_path, "rank-sweep", {**settings, "task": {"steps": 5, "labels": ["a", "b"]}})
    with pytest.raises(ConfigError, match="holds the experiment 'rank-sweep', not 'variants'"):
        CellStore(tmp_path, "variants", settings)
    fresh = CellStore(tmp_path, "rank-sweep", {**settings, "seeds": 3}, restart=True)
    assert fresh.run("r1-seed0", cell(100))["value"] == 100 and calls[-1] == 100
    with pytest.raises(ConfigError, match="cell key"):
        fresh.run("../escape", cell(0))


def test_settings_difference_names_the_first_key():
    assert settings_difference({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2}}) is None
    assert settings_difference({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == ("b.c", 2, 3)
    assert settings_difference({"a": 1}, {"a": 1, "z": 0}) == ("z", None, 0)


def test_progress_lines_and_eta(tmp_path, monkeypatch):
    stream = io.StringIO()
    clock = iter([0.0, 10.0, 10.0, 30.0, 30.0, 30.0])
    monkeypatch.setattr("lorakit.experiments.cells.time.perf_counter", lambda: next(clock))
    progress = Progress(4, "rank-sweep", stream)
    store = CellStore(tmp_path, "rank-sweep", {})
    store.run("done-before", lambda: {"x": 0})
    run_cell(store, progress, "a", "r=1 seed 0", lambda: {"x": 1}, note=lambda c: f"x {c['x']}")
    run_cell(store, progress, "b", "r=2 seed 0", lambda: {"x": 2})
    run_cell(store, progress, "done-before", "r=4 seed 0", lambda: {"x": 9})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[0/4 ---------- 0%] rank-sweep r=1 seed 0 ..."
    assert lines[1] == "[1/4 ##-------- 25%] rank-sweep r=1 seed 0: x 1 ... 10.0 s, ETA 30s"
    assert lines[3] == "[2/4 #####----- 50%] rank-sweep r=2 seed 0 ... 20.0 s, ETA 30s"  # mean 15 s x 2 left
    assert lines[5].endswith("r=4 seed 0 ... resumed (finished before), ETA 15s")
    assert duration(75.2) == "1m15s" and duration(float("nan")) == "?"
