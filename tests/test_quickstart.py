"""The README's main-job command: a short run of the quickstart and the CLI around it."""

from __future__ import annotations

import json

import pytest

from lorakit.cli.main import main
from lorakit.quickstart import run


def test_quickstart_short_run_trains_saves_reloads_and_merges(tmp_path, capsys):
    result = run(out_dir=tmp_path, steps=40, log_every=10)
    assert result["last_loss"] < result["first_loss"] - 0.2  # the loss falls
    assert result["reload_diff"] <= 1e-5  # the saved adapter reproduces the trained model
    assert result["merge_diff"] <= 1e-4  # merged weights give the same logits
    assert 0 < result["trainable"] < 0.15 * result["total"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    out = capsys.readouterr().out
    assert "trainable of" in out and "step   10" in out


def test_cli_help_lists_quickstart(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "quickstart" in capsys.readouterr().out


def test_cli_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
