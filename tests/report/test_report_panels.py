"""`lorakit report`'s sections for what only some runs have: DoRA's magnitude per output row, the NF4 error per
module of a quantised base, and `lorakit plan`'s estimate next to the memory a `lorakit train` run measured.
Each figure is checked against an independent computation (dense matrices, the NF4 base lorakit.load_model
actually builds, plan_model called directly)."""

from __future__ import annotations

import json

import pytest
import torch
from browser_helpers import chromium, console_lines, skip_without_chromium
from report_helpers import LM_RECORDS, build_peft_adapter, inlined_data

from lorakit.cli.main import main
from lorakit.report.data import gather
from lorakit.report.page import render

peft_adapter = pytest.fixture(build_peft_adapter, scope="module", name="peft_adapter")


def build_dora_adapter(tmp_path_factory, causal_lm_dir):
    """A DoRA adapter (r=4, q_proj / v_proj) saved by the real peft, lora_B and the magnitude moved off their
    start values."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(causal_lm_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    use_dora=True, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * torch.rand(param.shape, generator=gen))
    out = tmp_path_factory.mktemp("dora_adapter")
    pm.save_pretrained(str(out))
    return out


dora_adapter = pytest.fixture(build_dora_adapter, scope="module", name="dora_adapter")


def test_dora_magnitude_and_direction_per_row(dora_adapter, causal_lm_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = gather(dora_adapter, model_dir=str(causal_lm_dir))
    tensors = load_file(dora_adapter / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(causal_lm_dir).double()
    modules = data["adapter"]["modules"]
    assert modules and all(m.get("dora") for m in modules)
    for m in modules:
        key = f"base_model.model.{m['module']}"
        mag = tensors[f"{key}.lora_magnitude_vector"].double()
        w0 = base.get_submodule(m["module"]).weight.detach()
        v = w0 + 2.0 * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()  # s = 8/4
        dora = m["dora"]
        assert dora["magnitude"] == pytest.approx(mag.tolist(), rel=1e-6)
        assert dora["magnitude_change"] == pytest.approx((mag - w0.norm(dim=1)).tolist(), rel=1e-5, abs=1e-6)
        cos = (v * w0).sum(1) / (v.norm(dim=1) * w0.norm(dim=1))
        assert dora["direction_change"] == pytest.approx((1 - cos).tolist(), rel=1e-4, abs=1e-6)
        assert dora["mean_abs_magnitude_change"] == pytest.approx(float((mag - w0.norm(dim=1)).abs().mean()), rel=1e-5)
        assert max(dora["direction_change"]) > 0  # the update turned the rows
    html = render(data)
    assert 'id="dora"' in html and "mean |m_i" in html
    assert inlined_data(html)["adapter"]["modules"][0]["dora"]["magnitude"] == pytest.approx(modules[0]["dora"]["magnitude"])


def test_dora_without_a_model_shows_the_magnitude_only(dora_adapter):
    data = gather(dora_adapter)
    dora = data["adapter"]["modules"][0]["dora"]
    assert dora["magnitude"] and dora["magnitude_change"] is None and dora["direction_change"] is None
    assert "--model DIR" in render(data).split('id="dora"')[1]


def test_no_dora_section_for_plain_lora(peft_adapter):
    data = gather(peft_adapter)
    assert not any("dora" in m for m in data["adapter"]["modules"])
    assert 'id="dora"' not in render(data)


def test_nf4_error_per_module_is_what_the_quantised_base_holds(peft_adapter, causal_lm_dir):
    import lorakit
    from lorakit.quant import NF4Linear

    data = gather(peft_adapter, model_dir=str(causal_lm_dir), quantize="nf4")
    errors = data["nf4"]["modules"]
    dense = lorakit.load_model(str(causal_lm_dir), dtype="fp32")
    quantised = lorakit.load_model(str(causal_lm_dir), dtype="fp32", quantize="nf4")
    nf4_paths = [p for p, m in quantised.named_modules() if isinstance(m, NF4Linear)]
    assert sorted(errors) == sorted(nf4_paths) and "lm_head" not in errors
    for path in nf4_paths:
        w = dense.get_submodule(path).weight.detach().double()
        q = quantised.get_submodule(path).dequantize(torch.float32).double()
        assert errors[path] == pytest.approx(float((w - q).norm() / w.norm()), rel=1e-5)
        assert 0.0 < errors[path] < 0.2
    assert data["nf4"]["heatmap"]["rows"] == ["0", "1"]
    assert 'id="nf4"' in render(data)
    assert gather(peft_adapter, model_dir=str(causal_lm_dir))["nf4"] is None  # only with --quantize nf4


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, causal_lm_dir):
    root = tmp_path_factory.mktemp("cli_run")
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in LM_RECORDS) + "\n")
    out = root / "run"
    assert main(["train", "--model", str(causal_lm_dir), "--data", str(data), "--out", str(out), "--max-steps", "4",
                 "--per-device-train-batch-size", "4", "--max-length", "16", "--no-progress"]) == 0
    return out


def test_lorakit_train_writes_memory_json(cli_run):
    measured = json.loads((cli_run / "memory.json").read_text())
    assert measured["peak_rss_bytes"] >= measured["start_rss_bytes"] > 0
    assert measured["peak_rss_growth_bytes"] == measured["peak_rss_bytes"] - measured["start_rss_bytes"]
    assert "training" in measured["covers"]


def test_report_shows_the_plan_next_to_the_measured_peak(cli_run, causal_lm_dir, tmp_path):
    from lorakit.report.plan_model import plan_model

    out = tmp_path / "r.html"
    assert main(["report", str(cli_run), "--out", str(out)]) == 0
    data = inlined_data(out.read_text(encoding="utf-8"))
    memory = data["memory"]
    cfg = __import__("yaml").safe_load((cli_run / "train_config.yaml").read_text())
    plan = plan_model(str(causal_lm_dir), r=cfg["r"], target_modules=cfg["target_modules"], dtype="auto",
                      batch=4, seq_len=16, task=cfg["task"])
    rows = dict((name, nbytes) for name, nbytes in memory["rows"])
    assert rows["total"] == plan.total and rows["activations (estimate)"] == plan.activations
    measured = json.loads((cli_run / "memory.json").read_text())
    assert memory["measured_bytes"] == measured["peak_rss_growth_bytes"]
    assert memory["ratio"] == pytest.approx(plan.total / measured["peak_rss_growth_bytes"])
    assert 'id="memory-plan"' in out.read_text(encoding="utf-8")


def test_a_run_without_memory_json_has_no_memory_section(cli_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(cli_run, copy)
    (copy / "memory.json").unlink()
    data = gather(copy)
    assert data["memory"] is None and 'id="memory"' not in render(data)


@skip_without_chromium
def test_panels_load_in_headless_chromium(dora_adapter, cli_run, causal_lm_dir, tmp_path):
    pages = {"dora": gather(dora_adapter, model_dir=str(causal_lm_dir), quantize="nf4"), "memory": gather(cli_run)}
    for name, data in pages.items():
        page = tmp_path / f"{name}.html"
        page.write_text(render(data), encoding="utf-8")
        run = chromium(["--dump-dom", page.as_uri()], tmp_path)
        assert run.returncode == 0 and console_lines(run.stderr) == [], run.stderr[-2000:]
        assert 'data-ready="1"' in run.stdout, f"{name}: the page's script did not finish"
    assert 'id="dora"' in (tmp_path / "dora.html").read_text() and 'id="nf4"' in (tmp_path / "dora.html").read_text()


def test_markdown_table_of_the_demo():
    from lorakit.report.demo_dir import markdown_table

    text = "| method | acc |\n|---|:-:|\n| LoRA r=8 | 82.5% |\n| full | 85.0% |\n\nChance: 50%.\n\nLoRA reaches 97%.\n"
    assert markdown_table(text) == {"head": ["method", "acc"], "rows": [["LoRA r=8", "82.5%"], ["full", "85.0%"]],
                                    "after": "Chance: 50%.\n\nLoRA reaches 97%."}
    assert markdown_table("no table")["rows"] == []


def test_a_run_uses_its_own_model_without_model_flag(cli_run, causal_lm_dir):
    data = gather(cli_run)
    assert data["model_from_run"] is True and data["model_dir"] == str(causal_lm_dir)
    assert data["adapter"]["heatmap"] is not None
    assert "the run's own, from train_config.yaml" in render(data)
