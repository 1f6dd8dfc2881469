"""`lorakit inspect ADAPTER --check vllm [--max-lora-rank N] [--json]`: the verdict, one reason per line, exit status
0 (loads and computes as trained), 1 (not), 2 (not an adapter / bad flags)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.cli.main import main


def _adapter(path, **config) -> str:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(**{"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}))
    randomize_adapters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lorakit.io.vllm.VllmWarning)
        lorakit.save_adapter(model, path)
    return str(path)


def test_a_plain_adapter_passes(tmp_path, capsys) -> None:
    adapter = _adapter(tmp_path)
    assert main(["inspect", adapter, "--check", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "will load this adapter and compute as trained" in out and "max_lora_rank=16" in out


def test_every_reason_is_printed_one_per_line(tmp_path, capsys) -> None:
    adapter = _adapter(tmp_path, r=32, alpha=32, use_dora=True, alpha_pattern={"v_proj": 8})
    assert main(["inspect", adapter, "--check", "vllm"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert "vLLM will refuse this adapter" in lines[0]
    reasons = [line.strip() for line in lines[1:]]
    assert any(r.startswith("refused: r: r=32 is above max_lora_rank=16") for r in reasons)
    assert any(r.startswith("refused: use_dora:") for r in reasons)
    assert any(r.startswith("refused: base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector")
               for r in reasons)
    wrong = [r for r in reasons if r.startswith("wrong:")]
    assert [r.split(":")[1].strip() for r in wrong] == [f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)]


def test_max_lora_rank_and_json(tmp_path, capsys) -> None:
    adapter = _adapter(tmp_path, r=32, alpha=64)
    assert main(["inspect", adapter, "--check", "vllm", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["loads"] is False and report["max_lora_rank"] == 16
    assert report["findings"] == [{"severity": "refused", "code": "rank", "where": "r",
                                   "message": report["findings"][0]["message"]}]
    assert "r=32" in report["findings"][0]["message"]
    assert main(["inspect", adapter, "--check", "vllm", "--max-lora-rank", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["findings"] == [] and report["max_lora_rank"] == 32


def test_silently_wrong_file_loads_but_fails_the_check(tmp_path, capsys) -> None:
    adapter = _adapter(tmp_path, alpha_pattern={"q_proj": 4})
    assert main(["inspect", adapter, "--check", "vllm", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["loads"] is True and report["ok"] is False
    assert {f["code"] for f in report["findings"]} == {"per_module_scale"}


def test_bad_input_is_a_one_line_error(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path), "--check", "vllm"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    adapter = _adapter(tmp_path / "a")
    assert main(["inspect", adapter, "--max-lora-rank", "8"]) == 2
    assert "--max-lora-rank applies to --check vllm only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", adapter, "--check", "vllm", "--max-lora-rank", "0"])
    assert "expected a positive integer, found '0'" in capsys.readouterr().err


def test_exit_status_of_the_command(tmp_path) -> None:
    good, bad = _adapter(tmp_path / "good"), _adapter(tmp_path / "bad", r=32, alpha=32)
    run = [sys.executable, "-m", "lorakit.cli.main", "inspect"]
    assert subprocess.run([*run, good, "--check", "vllm"], capture_output=True).returncode == 0
    done = subprocess.run([*run, bad, "--check", "vllm"], capture_output=True, text=True)
    assert done.returncode == 1 and "refused: r: r=32 is above max_lora_rank=16" in done.stdout
