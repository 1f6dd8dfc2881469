"""`--model` (a directory or a model ID), `--dtype` and `--quantize` on every command that takes a base model:
generate, merge, combine, inspect (train: tests/cli/test_train_precision.py, tests/test_qlora.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import lorakit
from lorakit.cli.main import main


def _adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"))
    lorakit.save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def bf16_dir(causal_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    transformers.AutoModelForCausalLM.from_pretrained(causal_lm_dir, dtype=torch.bfloat16).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(causal_lm_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("command", ["generate", "merge", "combine", "inspect"])
def test_every_model_command_has_the_model_flags(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--dtype", "--quantize", "ORG/NAME[@REV]", "nf4", "bf16"):
        assert flag in text, (command, flag)


def test_merge_dtype_auto_keeps_bf16_and_quantize_merges_into_the_nf4_base(tmp_path, causal_lm_dir, bf16_dir):
    adapter = _adapter(causal_lm_dir, tmp_path / "adapter")
    assert main(["merge", "--model", str(bf16_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").dtype == torch.bfloat16

    # --quantize nf4: the adapter is merged into the dequantised NF4 base, the weights it sees in QLoRA training
    assert main(["merge", "--model", str(causal_lm_dir), "--adapter", str(adapter), "--out", str(tmp_path / "q"),
                 "--quantize", "nf4", "--dtype", "fp32"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    qlora = lorakit.load_model(causal_lm_dir, quantize="nf4", dtype="fp32")
    lorakit.load_adapter(qlora, adapter)
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, qlora(ids).logits, atol=1e-4)
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)(ids).logits
    assert not torch.allclose(merged(ids).logits, plain, atol=1e-3)  # NF4's rounding is really there


def test_inspect_ratio_with_dtype_and_quantize(tmp_path, causal_lm_dir, capsys):
    adapter = _adapter(causal_lm_dir, tmp_path / "adapter")
    ratios = {}
    for flags in ([], ["--dtype", "bf16"], ["--quantize", "nf4"]):
        assert main(["inspect", str(adapter), "--model", str(causal_lm_dir), "--json", *flags]) == 0
        report = json.loads(capsys.readouterr().out)
        ratios[" ".join(flags)] = [m["ratio_to_weight"] for m in report["modules"]]
        assert report["totals"]["full_ft_params"] > 0
    for key in ("--dtype bf16", "--quantize nf4"):
        for exact, other in zip(ratios[""], ratios[key]):
            assert other == pytest.approx(exact, rel=0.05), key


def test_combine_and_generate_take_dtype(tmp_path, causal_lm_dir, bf16_dir, capsys):
    a = _adapter(causal_lm_dir, tmp_path / "a", seed=1)
    b = _adapter(causal_lm_dir, tmp_path / "b", seed=2)
    assert main(["combine", "--model", str(bf16_dir), "--adapter", f"{a}:0.5", "--adapter", f"{b}:0.5",
                 "--out", str(tmp_path / "mix")]) == 0
    assert (tmp_path / "mix" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(bf16_dir), "--adapter", str(a), "--prompt", "one two",
                 "--max-new-tokens", "3", "--quantize", "nf4"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(bf16_dir), "--prompt", "one", "--dtype", "fp8"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
