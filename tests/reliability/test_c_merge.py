"""Merging (issue 15, sections 3 and 4): a merge is checked in the dtype it writes (an fp16 overflow to inf is an
error naming the module, nothing written), and `lorakit merge --force` never replaces a directory holding its own
inputs."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import lorakit
from conftest import tiny_llama, token_ids
from lorakit import hf
from lorakit.cli.main import main

MODULE = "model.layers.0.self_attn.q_proj"


def _overflowing(model: torch.nn.Module, value: float = 300.0) -> None:
    """Attach a rank-1 adapter on MODULE whose ΔW[0, 0] = value² (90000 > 65504, fp16's largest; fine in fp32)."""
    lorakit.attach(model, lorakit.LoraConfig(r=1, alpha=1, target_modules=[MODULE]))
    adapter = model.get_submodule(MODULE).adapters["default"]
    with torch.no_grad():
        adapter.lora_A.zero_()[0, 0] = value
        adapter.lora_B.zero_()[0, 0] = value


def _tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (what a refused call must leave as it was)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dirs(causal_lm_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(model dir, adapter dir, overflowing adapter dir), copies private to the test (a failure may not harm others)."""
    model_dir = tmp_path / "base"
    shutil.copytree(causal_lm_dir, model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    adapter = lorakit.save_adapter(model, tmp_path / "runs" / "adapter")
    big = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    _overflowing(big)
    overflowing = lorakit.save_adapter(big, tmp_path / "runs" / "big", vllm_check=False)
    return model_dir, adapter, overflowing


# -- the target dtype ---------------------------------------------------------------------------------------
def test_safe_merge_checks_the_merged_weight_in_the_weights_dtype() -> None:
    model = tiny_llama(layers=1).half()
    _overflowing(model)
    before = model.get_submodule(MODULE).base_layer.weight.clone()
    with pytest.raises(lorakit.MergeError, match=rf"module '{MODULE}'.*inf or NaN in float16.*65504"):
        lorakit.merge(model, safe=True)
    layer = model.get_submodule(MODULE)
    assert layer.merged == [] and torch.equal(layer.base_layer.weight, before)  # nothing merged
    with pytest.raises(lorakit.MergeError, match=MODULE):
        lorakit.merge_and_unload(model, safe=True)
    assert lorakit.adapter_names(model) == ["default"]  # still attached, unmerged


def test_safe_merge_checks_a_requested_dtype_and_passes_what_fits() -> None:
    model = tiny_llama(layers=1)  # fp32: 90000 is fine there
    _overflowing(model)
    with pytest.raises(lorakit.MergeError, match=rf"'{MODULE}'.*float16"):
        lorakit.merge(model, safe=True, dtype=torch.float16)
    lorakit.merge(model, safe=True, dtype=torch.bfloat16)  # bf16 reaches 3.4e38
    assert model.get_submodule(MODULE).merged == ["default"]
    assert torch.isfinite(model.get_submodule(MODULE).base_layer.weight).all()


def test_cli_merge_fp16_overflow_is_an_error_naming_the_module_and_writes_nothing(capsys, dirs, tmp_path) -> None:
    model_dir, _, big = dirs
    out = tmp_path / "merged16"
    before = set(os.listdir(tmp_path))
    code = main(["merge", "--model", str(model_dir), "--adapter", str(big), "--out", str(out), "--dtype", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and MODULE in err and "float16" in err and "Traceback" not in err
    assert not out.exists() and set(os.listdir(tmp_path)) == before  # no out, no temporary directory
    code = main(["merge", "--model", str(model_dir), "--adapter", str(big), "--out", str(out), "--dtype", "fp32"])
    assert code == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert float(merged.get_submodule(MODULE).weight.abs().max()) > 65504
    assert torch.isfinite(merged(token_ids()).logits).all()


# -- --out against the inputs -------------------------------------------------------------------------------
def _overlapping_outs(model_dir: Path, adapter: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    link = tmp_path / "link-to-adapter"
    link.symlink_to(adapter, target_is_directory=True)
    return [
        (adapter, "is the --adapter"), (adapter.parent, "contains the --adapter"), (model_dir, "is the --model"),
        (adapter / "sub", "is inside the --adapter"), (link, "is the --adapter"), (tmp_path, "contains the --model"),
    ]


def test_merge_to_dir_refuses_an_out_that_is_contains_or_lies_in_an_input(dirs, tmp_path: Path) -> None:
    model_dir, adapter, _ = dirs
    inputs = {p: _tree(p) for p in (model_dir, adapter)}
    for out, relation in _overlapping_outs(model_dir, adapter, tmp_path):
        with pytest.raises(lorakit.ConfigError, match=relation):
            hf.merge_to_dir(model_dir, [adapter], out, force=True)
        assert {p: _tree(p) for p in inputs} == inputs, out  # inputs untouched
        assert not (adapter / "sub").exists()


def test_cli_merge_force_refuses_to_replace_its_own_inputs(capsys, dirs, tmp_path: Path) -> None:
    model_dir, adapter, _ = dirs
    inputs = {p: _tree(p) for p in (model_dir, adapter)}
    for out, relation in _overlapping_outs(model_dir, adapter, tmp_path):
        code = main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(out), "--force"])
        err = capsys.readouterr().err
        assert code == 2 and relation in err and "Traceback" not in err, (out, err)
        assert {p: _tree(p) for p in inputs} == inputs, out
    out = tmp_path / "merged"  # beside the inputs: fine
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    assert (out / "config.json").is_file()


def test_combine_dirs_refuses_an_out_that_is_contains_or_lies_in_an_input(capsys, dirs, tmp_path: Path) -> None:
    model_dir, adapter, _ = dirs
    inputs = {p: _tree(p) for p in (model_dir, adapter)}
    for out, relation in _overlapping_outs(model_dir, adapter, tmp_path):
        code = main(["combine", "--model", str(model_dir), "--adapter", f"{adapter}:0.5", "--out", str(out),
                     "--force"])
        err = capsys.readouterr().err
        assert code == 2 and relation in err and "Traceback" not in err, (out, err)
        assert {p: _tree(p) for p in inputs} == inputs, out
