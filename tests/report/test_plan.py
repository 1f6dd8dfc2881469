"""`lorakit plan` and lorakit.report.plan: the seeds' figures (a 4096 x 4096 layer at r = 8, GPT-3 175B's 75.5 M
adapter parameters, a 7B model's base in bf16 and NF4, 100 task adapters against 100 copies), the NF4 byte count
against lorakit.quant.nf4's own tensors, the estimate against the measured peak of a real training step, and the
command's table, JSON and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from lorakit.cli.main import main
from lorakit.quant.nf4 import quantize_nf4
from lorakit.report.plan import lora_params, make_plan, nf4_bytes, savings_ratio
from lorakit.report.plan_model import model_shapes

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_a_4096_square_layer_at_rank_8():
    assert lora_params(4096, 4096, 8) == 65_536
    assert 4096 * 4096 == 16_777_216
    assert savings_ratio(4096, 4096, 8) == 256.0


def test_gpt3_175b_with_rank_8_on_the_four_attention_matrices():
    assert 4 * 96 * lora_params(12288, 12288, 8) == 75_497_472  # the LoRA paper's "about 75.5 M"
    # Llama-shaped (separate q, k, v, o), its gated MLP 8h/3 wide so that the layers hold GPT-3's 12 h^2 each
    config = transformers.LlamaConfig(hidden_size=12288, intermediate_size=32768, num_hidden_layers=96,
                                      num_attention_heads=96, vocab_size=50257, tie_word_embeddings=True)
    shapes = model_shapes(config, r=8, target_modules=ATTENTION)  # on the meta device: no memory
    plan = make_plan(shapes, r=8, target_modules=ATTENTION, dtype="fp16")
    assert plan.trainable == 75_497_472
    assert plan.trainable_by_type == {name: 96 * 8 * 2 * 12288 for name in ATTENTION}
    assert plan.total_params == pytest.approx(175e9, rel=0.02)


@pytest.fixture(scope="module")
def llama_7b():
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, vocab_size=32000, tie_word_embeddings=False)
    return model_shapes(config, r=8, target_modules=["q_proj", "v_proj"], name="llama-7b")


def test_a_7b_base_in_bf16_and_nf4(llama_7b):
    plan = make_plan(llama_7b, r=8, target_modules=["q_proj", "v_proj"], dtype="bf16", quantize="nf4")
    assert plan.total_params == 6_738_415_616  # "6.74 B"
    assert plan.base_bytes["bf16"] == 2 * 6_738_415_616  # 13.5 GB
    linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # NF4: 0.5 byte + block statistics; the rest bf16
    assert plan.base_bytes["nf4"] == pytest.approx(linears * (0.5 + 1 / 64) + (6_738_415_616 - linears) * 2,
                                                   rel=1e-3)
    assert 3.8e9 < plan.base == plan.base_bytes["nf4"] < 3.95e9
    assert plan.trainable == 4_194_304 and plan.adapter == plan.gradients == 4 * 4_194_304
    assert plan.adamw == 8 * 4_194_304
    assert plan.ddp["lora"] == 4 * 4_194_304 and plan.ddp["full"] == 2 * 6_738_415_616


def test_100_tasks_on_a_7b_model(llama_7b):
    plan = make_plan(llama_7b, r=8, target_modules=["q_proj", "v_proj"], dtype="bf16", tasks=100)
    store = plan.storage
    assert store["full_copies"] == 100 * 13_476_831_232  # 1.35 TB
    assert store["adapters"] == 100 * 16_777_216  # 1.68 GB
    assert store["base_plus_adapters"] == 13_476_831_232 + 1_677_721_600
    assert store["full_copies"] / store["base_plus_adapters"] > 88


@pytest.mark.parametrize("numel", [64, 100, 4096 * 11008, 64 * 256 * 3 + 5])
def test_nf4_bytes_are_those_quantize_nf4_stores(numel):
    state = quantize_nf4(torch.randn(numel))
    assert nf4_bytes(numel) == sum(t.numel() * t.element_size() for t in state.tensors())


def test_gpt2_conv1d_layers_are_counted_from_their_kind():
    config = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=100)
    shapes = model_shapes(config, r=4, target_modules=["c_attn"])
    assert make_plan(shapes, r=4, target_modules=["c_attn"]).trainable == 3 * 4 * (64 + 3 * 64)


# -- the estimate against a real step --------------------------------------------------------------------
MEASURED = {"config": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                           tie_word_embeddings=False),
            "batch": 4, "seq_len": 128, "r": 8, "target_modules": ["q_proj", "v_proj"]}


def test_the_estimate_is_within_20_percent_of_a_measured_training_step():
    """Peak RSS of one forward + backward + AdamW step of a tiny Llama (fp32, CPU) in a fresh process, minus the
    RSS before the model was built, against the plan's base + adapter + gradients + AdamW + activations. The
    smallest of three runs: the allocator's slack varies between runs (totals of 64-79 MB were seen) and only
    ever adds to what the step needs."""
    script = Path(__file__).with_name("step_memory.py")
    runs = []
    for _ in range(3):
        done = subprocess.run([sys.executable, str(script), json.dumps(MEASURED)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    measured = min(runs, key=lambda run: run["total"])
    assert measured["attention"] == "sdpa"  # the estimate's attention: no a x s x s scores kept
    shapes = model_shapes(transformers.LlamaConfig(**MEASURED["config"]), r=8, target_modules=["q_proj", "v_proj"])
    plan = make_plan(shapes, r=8, target_modules=["q_proj", "v_proj"], dtype="fp32", batch=4, seq_len=128)
    assert plan.base + plan.adapter == measured["param_bytes"]  # the weights exactly
    assert 0.8 <= plan.total / measured["total"] <= 1.2, (plan.to_dict(), measured)


# -- the command -----------------------------------------------------------------------------------------
def test_plan_prints_a_table(causal_lm_dir, capsys):
    assert main(["plan", "--model", str(causal_lm_dir), "--r", "4", "--target-modules", "q_proj,v_proj",
                 "--dtype", "bf16", "--quantize", "nf4", "--tasks", "10", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    for text in ("trainable parameters", "q_proj", "v_proj", "NF4", "AdamW state", "activations (estimate)",
                 "full fine-tuning", "ring all-reduce over 4 ranks", "storage of 10 task models"):
        assert text in out, text


def test_plan_json_parses_and_reads_the_config_only(causal_lm_dir, capsys, monkeypatch):
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        lambda *a, **k: pytest.fail("plan must not load weights"))
    assert main(["plan", "--model", str(causal_lm_dir), "--target-modules", "all-linear", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    config = json.loads((causal_lm_dir / "config.json").read_text())
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    assert data["dtype"] == "fp32" and data["r"] == 8  # the checkpoint's dtype; the default rank
    assert data["trainable_by_type"]["q_proj"] == layers * 8 * (h + h)
    assert data["total"] == data["base"] + data["adapter"] + data["gradients"] + data["adamw"] + data["activations"]


@pytest.mark.parametrize("argv, needle", [
    (["--r", "0"], "--r"),
    (["--target-modules", "nothing_here"], "--target-modules"),
    (["--target-modules", "q_proj,,v_proj"], "--target-modules"),
    (["--batch-size", "-1"], "--batch-size"),
])
def test_a_bad_flag_is_one_error_line_with_exit_2(argv, needle, causal_lm_dir, capsys):
    code = _status(["plan", "--model", str(causal_lm_dir), *argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_a_missing_model_is_one_error_line_with_exit_2(tmp_path, capsys):
    for argv, needle in ((["plan"], "--model"), (["plan", "--model", str(tmp_path / "absent")], "absent")):
        code = _status(argv)
        lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines


def _status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as done:
        return int(done.code or 0)
