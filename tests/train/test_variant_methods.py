"""`lorakit train --method adalora | vera | delta_lora` end to end on a tiny Llama directory: the variant is attached
from the flags, its step hook runs inside lorakit's Trainer, and the run saves what the variant saves (PEFT's
ADALORA / VERA files; Delta-LoRA's merged model and changed base); a Delta-LoRA checkpoint resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli.main import main

RECORDS = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(4) for b in range(4)]
STEPS = 6


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return path


def _argv(model_dir, data, out, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", str(STEPS),
            "--batch-size", "4", "--learning-rate", "1e-2", "--progress", "false", "--logging-steps", "1",
            "--diagnostics-steps", "0", "--lora-dropout", "0", "--seed", "3", "--r", "4", *extra]


def _losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if "loss" in r]


def test_adalora_run_fills_total_step_and_saves_its_rank_pattern(tmp_path, causal_lm_dir, data_file):
    out = tmp_path / "adalora"
    assert main(_argv(causal_lm_dir, data_file, out, "--method", "adalora",
                      "--method-options", "target_r=2,tinit=1,tfinal=1,deltaT=1")) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == STEPS  # the run's steps, filled in
    assert config["rank_pattern"], "the allocation left no rank pattern"
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    assert sum(kept) <= 2 * len(kept) < 4 * len(kept)  # the budget fell from r=4 to target_r=2 per layer
    resolved = (out / "train_config.yaml").read_text()
    assert "total_step" not in resolved  # the run's own config keeps the options as given


def test_adalora_resumes_after_its_masking_at_the_uninterrupted_runs_losses_and_ranks(tmp_path, causal_lm_dir,
                                                                                      data_file):
    """A checkpoint taken after masks were set (its adapter file cut to the kept triplets, as PEFT saves) holds
    the allocator's state in step_hooks.pt: importance averages, masks, uncut factors. Resuming from it replays
    the rest of the run exactly: the same losses, the same rank pattern, the same final tensors."""
    out = tmp_path / "adalora"
    flags = ("--method", "adalora", "--method-options", "target_r=2,tinit=1,tfinal=1,deltaT=1", "--save-steps", "3")
    assert main(_argv(causal_lm_dir, data_file, out, *flags)) == 0
    step3 = out / "checkpoints" / "step-0000003"
    cut = json.loads((step3 / "adapter" / "adapter_config.json").read_text())
    assert cut["rank_pattern"] and not all(all(m) for m in cut["rank_pattern"].values())  # masked by step 3
    assert (step3 / "step_hooks.pt").is_file()
    resumed = tmp_path / "resumed"
    assert main(["train", "--resume", str(step3), "--out", str(resumed), "--progress", "false"]) == 0
    assert _losses(resumed) == pytest.approx(_losses(out)[3:], abs=1e-6)
    final, again = (json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (out, resumed))
    assert again["rank_pattern"] == final["rank_pattern"]
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_an_adalora_checkpoint_without_its_hook_state_is_refused_by_name(tmp_path, causal_lm_dir, data_file,
                                                                           capsys):
    out = tmp_path / "adalora"
    flags = ("--method", "adalora", "--method-options", "target_r=2,tinit=1,tfinal=1,deltaT=1", "--save-steps", "3",
             "--max-steps", "3")
    assert main(_argv(causal_lm_dir, data_file, out, *flags)) == 0
    step3 = out / "checkpoints" / "step-0000003"
    (step3 / "step_hooks.pt").unlink()
    assert main(["train", "--resume", str(step3), "--out", str(tmp_path / "r"), "--progress", "false",
                 "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "has shape" in err and "step_hooks.pt" in err


def test_vera_run_trains_only_the_scaling_vectors_and_reloads(tmp_path, causal_lm_dir, data_file):
    out = tmp_path / "vera"
    assert main(_argv(causal_lm_dir, data_file, out, "--method", "vera", "--target-modules", "q_proj,v_proj",
                      "--diagnostics-steps", "2")) == 0  # diagnostics of a non-low-rank update: ||ΔW|| / ||W0||
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA"
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lambdas = {k: v for k, v in tensors.items() if "vera_lambda" in k}
    assert lambdas and any(v.abs().max() > 0 for k, v in lambdas.items() if "lambda_b" in k)  # lambda_b left zero
    model = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(causal_lm_dir), out / "adapter")
    assert lorakit.get_config(model).method == "vera"


def test_delta_lora_run_saves_the_merged_model_and_resumes_with_its_moved_base(tmp_path, causal_lm_dir, data_file):
    out = tmp_path / "delta"
    flags = ("--method", "delta_lora", "--method-options", "update_start_step=1,delta_lambda=0.5",
             "--target-modules", "q_proj,v_proj", "--save-steps", "3")
    assert main(_argv(causal_lm_dir, data_file, out, *flags)) == 0
    original = AutoModelForCausalLM.from_pretrained(causal_lm_dir)
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], original.state_dict()[name])
    assert (out / "checkpoints" / "step-0000003" / "base_weights.safetensors").is_file()
    resumed = tmp_path / "resumed"
    assert main(["train", "--resume", str(out / "checkpoints" / "step-0000003"), "--out", str(resumed),
                 "--progress", "false"]) == 0
    assert _losses(resumed) == pytest.approx(_losses(out)[3:], abs=1e-6)  # steps 4..6 again, on the moved base
    again = AutoModelForCausalLM.from_pretrained(resumed / "model")
    for key, tensor in merged.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], tensor, atol=1e-6, rtol=0, msg=key)


def test_loftq_run_saves_its_q_base_beside_the_adapter(tmp_path, causal_lm_dir, data_file):
    out = tmp_path / "loftq"
    assert main(_argv(causal_lm_dir, data_file, out, "--init", "loftq", "--target-modules", "q_proj,v_proj")) == 0
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    original = AutoModelForCausalLM.from_pretrained(causal_lm_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.state_dict()[name], original.state_dict()[name])  # Q, not W0
    trained = lorakit.load_adapter(base, out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(trained(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_loftq_on_an_nf4_base_trains_on_q_and_saves_it_dense(tmp_path, causal_lm_dir, data_file):
    """--init loftq --quantize nf4: LoftQ factors the full-precision W0, the base is then stored in NF4 holding Q
    exactly (fp32 block scales: re-quantising Q gives Q's codes), and the run saves out/base dense (Q, and the
    other layers as the NF4 run saw them), out/adapter on it, out/model merged."""
    from lorakit.loftq import nf4_round_trip

    flags = ("--init", "loftq", "--target-modules", "q_proj,v_proj")
    plain, nf4 = tmp_path / "plain", tmp_path / "nf4"
    assert main(_argv(causal_lm_dir, data_file, plain, *flags)) == 0
    assert main(_argv(causal_lm_dir, data_file, nf4, *flags, "--quantize", "nf4")) == 0
    q_plain = AutoModelForCausalLM.from_pretrained(plain / "base").state_dict()
    base = AutoModelForCausalLM.from_pretrained(nf4 / "base")
    q_nf4 = base.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(q_nf4[name], q_plain[name], atol=1e-6, rtol=0, msg=name)  # Q survived NF4
    up = "model.layers.0.mlp.up_proj.weight"  # not targeted: its NF4 round trip, as the run saw it
    original = AutoModelForCausalLM.from_pretrained(causal_lm_dir).state_dict()[up]
    assert not torch.equal(q_nf4[up], original)
    torch.testing.assert_close(nf4_round_trip(q_nf4[up]), q_nf4[up], atol=1e-6, rtol=0)
    trained = lorakit.load_adapter(base, nf4 / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(nf4 / "model")
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(trained(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=0)
