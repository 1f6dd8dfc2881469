"""`lorakit experiment magnitude-direction`: the recorder's ΔM / ΔD against the definitions on explicit weights
(full fine-tuning, LoRA, DoRA), the correlations, and the quick path on a tiny classifier."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from experiment_helpers import run_quietly, tiny_task, write_classification_jsonl

import lorakit
from conftest import randomize_adapters, tiny_bert
from lorakit.experiments import magnitude_direction as MD
from lorakit.model import lora_layers

STEPS = 3
QUERY = "bert.encoder.layer.0.attention.self.query"


def _expected(w0: torch.Tensor, w1: torch.Tensor) -> tuple[float, float]:
    """The paper's definitions, row by row: mean |‖W1_i‖ - ‖W0_i‖| and mean 1 - cos(W1_i, W0_i)."""
    w0, w1 = w0.double(), w1.double()
    dm = (w1.norm(dim=1) - w0.norm(dim=1)).abs().mean()
    dd = (1 - torch.nn.functional.cosine_similarity(w1, w0, dim=1)).mean()
    return float(dm), float(dd)


def _recorded(model: torch.nn.Module, paths: list[str] | None = None) -> tuple[MD.MagnitudeDirectionRecorder, Any]:
    """A recorder that has seen the model's start, and a function giving its points by module."""
    recorder = MD.MagnitudeDirectionRecorder(every=1, paths=paths)
    recorder.on_train_begin(SimpleNamespace(model=model))
    return recorder, lambda: {p["module"]: p for p in recorder.points}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_changes_match_the_definitions(method: str):
    model = tiny_bert()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], method=method))
    recorder, points = _recorded(model)
    randomize_adapters(model, std=0.2)
    with torch.no_grad():  # DoRA: positive magnitudes, as training keeps them (m starts at ‖W0_i‖)
        for layer in lora_layers(model):
            m = getattr(layer.adapters["default"], "lora_magnitude_vector", None)
            if m is not None:
                m.abs_().add_(0.05)
    recorder.record(model, step=5)
    got = points()
    assert set(got) == {layer.path for layer in lora_layers(model)}
    for layer in lora_layers(model):
        adapter = layer.adapters["default"]
        w0 = layer.base_layer.weight.detach()
        v = w0 + adapter.scale * adapter.lora_B.detach() @ adapter.lora_A.detach()
        if method == "dora":  # W1_i = m_i V_i / ‖V_i‖
            v = adapter.lora_magnitude_vector.detach()[:, None] * v / v.norm(dim=1, keepdim=True)
        dm, dd = _expected(w0, v)
        point = got[layer.path]
        assert point["step"] == 5 and point["delta_m"] == pytest.approx(dm, rel=1e-5)
        assert point["delta_d"] == pytest.approx(dd, rel=1e-5) and dd > 0


def test_full_fine_tuning_changes_match_the_definitions():
    model = tiny_bert()
    recorder, points = _recorded(model, [QUERY])
    w0 = model.get_submodule(QUERY).weight.detach().clone()
    with torch.no_grad():
        model.get_submodule(QUERY).weight.mul_(1.5)  # magnitude only: ΔD = 0, ΔM = 0.5 mean ‖W0_i‖
    recorder.record(model, step=1)
    assert points()[QUERY]["delta_m"] == pytest.approx(0.5 * float(w0.norm(dim=1).mean()), rel=1e-6)
    assert points()[QUERY]["delta_d"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        model.get_submodule(QUERY).weight.add_(torch.randn(w0.shape, generator=torch.Generator().manual_seed(1)))
    recorder.record(model, step=2)
    dm, dd = _expected(w0, model.get_submodule(QUERY).weight.detach())
    assert points()[QUERY]["delta_m"] == pytest.approx(dm) and points()[QUERY]["delta_d"] == pytest.approx(dd)


def _points(pairs: list[tuple[float, float]], step: int = 1) -> list[dict]:
    return [{"delta_d": d, "delta_m": m, "step": step, "seed": 0, "type": "q", "module": f"m{i}"}
            for i, (d, m) in enumerate(pairs)]


def test_correlations_signs_counts_and_undefined_cases():
    up = MD.correlations(_points([(0.1, 1.0), (0.2, 2.0), (0.3, 3.5), (0.4, 3.9)]))
    assert up["pearson"] > 0.95 and up["spearman"] == pytest.approx(1.0) and up["points"] == 4
    down = MD.correlations(_points([(0.1, 4.0), (0.2, 3.0), (0.3, 2.5), (0.4, 1.0)]))
    assert down["pearson"] < -0.95 and down["final_pearson"] == pytest.approx(down["pearson"])
    two = MD.correlations(_points([(0.1, 1.0), (0.2, 2.0)]))
    assert two["pearson"] is None and two["points"] == 2  # two points always give +-1: not reported
    # both grow with the step while falling against each other within each step: pooled > 0, within < 0
    mixed = _points([(0.1, 1.1), (0.11, 1.0), (0.12, 0.9)], step=1) + _points([(1.0, 3.1), (1.01, 3.0), (1.02, 2.9)],
                                                                              step=2)
    c = MD.correlations(mixed)
    assert c["pearson"] > 0.9 and c["within_checkpoint_pearson"] == pytest.approx(-1.0)
    assert c["final_step"] == 2 and c["final_points"] == 3 and c["final_pearson"] == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def done(classifier_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("md")
    task = tiny_task(classifier_dir, write_classification_jsonl(root / "cls.jsonl", n=40), steps=STEPS)
    out = root / "out"
    results, printed = run_quietly(MD, task, out)
    return out, results, printed


def test_quick_path(done):
    out, results, printed = done
    every = results["checkpoint_every"]
    steps = sorted({s for s in range(every, STEPS + 1, every)} | {STEPS})
    cells = {c["method"]: c for c in results["cells"]}
    assert set(cells) == set(MD.METHODS)
    modules = cells["lora"]["modules"]
    for method, cell in cells.items():
        assert cell["modules"] == modules  # the same modules measured for every method
        assert len(cell["points"]) == len(modules) * len(steps)
        assert sorted({p["step"] for p in cell["points"]}) == steps  # no step-0 point
        assert all(p["delta_m"] >= 0 and p["delta_d"] >= 0 for p in cell["points"])
        summary = results["summary"][method]["all"]
        assert summary["points"] == len(cell["points"]) and summary["final_points"] == len(modules)
        for key in ("pearson", "spearman", "within_checkpoint_pearson", "final_pearson"):
            assert summary[key] is None or -1.0 <= summary[key] <= 1.0
        assert sum(c["points"] for c in results["summary"][method]["by_type"].values()) == summary["points"]
    assert any(p["delta_d"] > 0 for p in cells["full"]["points"])
    record = json.loads((out / "results.json").read_text())
    assert record["experiment"] == MD.NAME
    page = (out / "page.html").read_text()
    assert page.count("<svg") == 3 and "DoRA: ΔD against ΔM" in page
    assert "| full fine-tuning | all |" in printed and "The DoRA paper" in printed
