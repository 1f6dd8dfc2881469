"""`lorakit experiment lora-vs-full` on a tiny classifier: the quick path end to end (results, invariants, files,
resume), ΔW* against the saved full model, and the adapter reading."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from experiment_helpers import run_quietly, tiny_task, write_classification_jsonl
from safetensors.torch import load_file

from lorakit.experiments import lora_vs_full as L
from lorakit.experiments.cells import CellStore

STEPS = 4


@pytest.fixture(scope="module")
def done(classifier_dir, tmp_path_factory):
    """One quick run (4 steps, checkpoints every step): (task, out dir, results, printed text)."""
    root = tmp_path_factory.mktemp("lvf")
    task = tiny_task(classifier_dir, write_classification_jsonl(root / "cls.jsonl", n=40), steps=STEPS)
    out = root / "out"
    results, printed = run_quietly(L, task, out)
    return task, out, results, printed


def test_results_structure_and_the_bound_invariant(done):
    task, out, results, printed = done
    assert results["r"] == L.RANK and results["steps"] == STEPS and results["seeds"] == [0]
    modules = results["modules"]
    lora_run = results["runs"][0]["lora_run"]
    assert len(modules) == len(lora_run["modules"]) > 0
    for m in modules:
        assert m["achieved"] >= m["bound"] - 1e-9 * m["fro_norm"]  # Eckart-Young: never below the bound
        assert m["scaled_error"] >= m["bound"] - 1e-9 * m["fro_norm"]
        assert m["scaled_error"] <= m["achieved"] + 1e-9 * m["fro_norm"]  # c = 1 is one of the scalars tried
        assert 0.0 <= m["energy_top_r"] <= 1.0
        assert m["bound_rel"] == pytest.approx(math.sqrt(1 - m["energy_top_r"]), abs=1e-9)
        sv = m["singular_values"]
        assert sv == sorted(sv, reverse=True) and len(sv) == min(m["d"], m["k"], L.TOP_SINGULAR_VALUES)
        curve = [m["bound_curve"][str(k)] for k in L.BOUND_RANKS]
        assert curve == sorted(curve, reverse=True)  # the bound falls with the rank
        steps = [a["step"] for a in m["alignment"]]
        assert steps == list(range(1, STEPS + 1))  # quick: a checkpoint every step here; the last is the adapter
        for a in m["alignment"]:
            for side in ("left", "right"):
                assert a[side] is None or 0.0 <= a[side] <= 1.0
        assert m["chance_alignment"] == {"left": L.RANK / m["d"], "right": L.RANK / m["k"]}
    overall = results["overall"]
    assert overall["modules"] == len(modules) and overall["bound_holds"] == len(modules)
    assert {row["type"] for row in results["by_type"]} == {m["type"] for m in modules}
    assert "| all modules |" in printed and "achieved >= bound in" in printed


def test_files_written_and_a_rerun_resumes(done):
    task, out, results, _ = done
    record = json.loads((out / "results.json").read_text())
    assert record["experiment"] == L.NAME and record["results"]["r"] == L.RANK
    page = (out / "page.html").read_text()
    assert page.count("<svg") >= 4 and "Spectrum of full fine-tuning" in page
    assert (out / "table.md").read_text().startswith("| module type |")
    store = CellStore(out, L.NAME, {"seeds": None})
    again = L.run(task, out, quick=True, seeds=None, store=store, progress_stream=io.StringIO())
    assert store.computed == [] and sorted(store.reused) == ["analysis-seed0", "full-seed0", "lora-seed0"]
    assert again["overall"] == results["overall"]


def test_delta_is_the_saved_full_model_minus_the_start(done):
    task, out, results, _ = done
    deltas = load_file(str(out / "runs" / "full-seed0" / L.DELTA_FILE))
    saved = load_file(str(out / "runs" / "full-seed0" / "model" / "model.safetensors"))
    start = task.fresh_model(0)
    assert set(deltas) == set(results["runs"][0]["lora_run"]["modules"])
    for path, delta in deltas.items():
        w0 = start.get_submodule(path).weight.detach()
        assert torch.allclose(delta, saved[f"{path}.weight"] - w0, atol=1e-6)
        assert float(delta.abs().max()) > 0  # full fine-tuning moved it


def test_read_factors_match_the_trained_adapter(done):
    _, out, results, _ = done
    factors = L.read_factors(out / "runs" / "lora-seed0" / "adapter")
    module = results["modules"][0]
    a, b, s = factors[module["module"]]
    assert a.shape == (L.RANK, module["k"]) and b.shape == (module["d"], L.RANK)
    assert s == pytest.approx(module["scale"]) and s == pytest.approx(2.0)  # alpha = 2 r
    assert L.lora_checkpoints(out / "runs" / "lora-seed0", STEPS)[-1] == (STEPS, out / "runs" / "lora-seed0" / "adapter")


def test_module_type_and_checkpoint_spacing():
    assert L.module_type("bert.encoder.layer.3.attention.self.query") == "attention.self.query"
    assert L.module_type("model.layers.11.mlp.down_proj") == "mlp.down_proj"
    assert L.module_type("bert.pooler.dense") == "bert.pooler.dense"
    assert L.checkpoint_every(48, 8) == 6 and L.checkpoint_every(12, 3) == 4 and L.checkpoint_every(2, 8) == 1
