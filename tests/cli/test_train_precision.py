"""`lorakit train --mixed-precision bf16 | fp16` and `--dtype auto | bf16 | ...` end to end on the tiny model
directories: a few steps each, a finite and falling loss, an fp32 adapter that reloads onto the base."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli.main import main

LM_RECORDS = [
    {"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(6) for b in range(6)
]
IDS = torch.tensor([[2, 10, 11, 12, 13, 14]])


@pytest.fixture(scope="module")
def bf16_lm_dir(causal_lm_dir, tmp_path_factory):
    """The tiny Llama saved in bf16 (config dtype bfloat16), with its tokenizer."""
    path = tmp_path_factory.mktemp("bf16_lm")
    AutoModelForCausalLM.from_pretrained(causal_lm_dir, dtype=torch.bfloat16).save_pretrained(path)
    for name in causal_lm_dir.iterdir():
        if "token" in name.name or name.name == "chat_template.jinja":
            shutil.copy(name, path / name.name)
    return path


def run_train(tmp_path, model_dir, *flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in LM_RECORDS) + "\n")
    out = tmp_path / "out"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", "10",
                 "--batch-size", "4", "--lr", "5e-3", "--logging-steps", "1", "--lora-dropout", "0",
                 "--warmup-steps", "1", "--diagnostics-steps", "0", "--progress", "false", *flags])
    assert code == 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [x for x in steps if "loss" in x]


def reload_logits(model_dir, adapter_dir, dtype):
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)(IDS).logits
        adapted = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                                       adapter_dir)(IDS).logits
    return base, adapted


@pytest.mark.parametrize("flags, base_dtype, scaling", [
    (["--mixed-precision", "bf16"], "fp32", False),
    (["--mixed-precision", "fp16"], "fp32", True),
    (["--dtype", "bf16"], "bf16", False),
    (["--dtype", "bf16", "--mixed-precision", "bf16"], "bf16", False),
], ids=["mp-bf16", "mp-fp16", "dtype-bf16", "both-bf16"])
def test_cli_precision_trains_and_saves_an_fp32_adapter_that_reloads(tmp_path, causal_lm_dir, capsys, flags,
                                                                     base_dtype, scaling):
    out, steps = run_train(tmp_path, causal_lm_dir, *flags)
    err = capsys.readouterr().err
    assert f"base {base_dtype}" in err and ("loss scaling on" in err) is scaling
    losses = [x["loss"] for x in steps]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) < sum(losses[:3])
    assert ("loss_scale" in steps[0]) is scaling
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # adapters stay fp32
    dtype = torch.bfloat16 if base_dtype == "bf16" else torch.float32
    base, adapted = reload_logits(causal_lm_dir, out / "adapter", dtype)
    assert torch.isfinite(adapted).all() and (adapted.float() - base.float()).abs().max() > 1e-3


def test_cli_dtype_auto_keeps_the_checkpoints_bf16_and_fp32_upcasts(tmp_path, bf16_lm_dir, capsys):
    run_train(tmp_path / "auto", bf16_lm_dir, "--max-steps", "2")
    assert "base bf16" in capsys.readouterr().err  # the default: the checkpoint's own dtype, no fp32 copy
    run_train(tmp_path / "fp32", bf16_lm_dir, "--max-steps", "2", "--dtype", "fp32")
    assert "base fp32" in capsys.readouterr().err


def test_cli_bad_dtype_exits_2_naming_the_field(tmp_path, causal_lm_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(LM_RECORDS[0]) + "\n")
    code = main(["train", "--model", str(causal_lm_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--dtype", "float8"])
    err = capsys.readouterr().err
    assert code == 2 and "dtype must be one of auto, fp32, bf16, fp16; got 'float8'" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
