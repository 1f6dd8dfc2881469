"""`lorakit experiment`: --list, an unknown name, a missing --out or half of --model / --data (one line, exit 2), and a
quick run on a tiny model that a second invocation resumes; other settings in the same --out are refused by name."""

from __future__ import annotations

import json

import pytest
from experiment_helpers import write_classification_jsonl

from lorakit.cli.main import main
from lorakit.experiments import EXPERIMENTS


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error: ")
    return err[0]


def test_list_names_every_experiment(capsys):
    assert main(["experiment", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["rank-sweep", "intrinsic-dim", "lora-vs-full",
                                                    "magnitude-direction", "variants"]
    assert list(EXPERIMENTS) == [line.split()[0] for line in lines]
    assert all(len(line.split()) > 3 for line in lines)  # a description on each line


@pytest.mark.parametrize("argv, expected", [
    (["experiment", "rank-swep", "--out", "x"], "unknown experiment 'rank-swep'; expected one of: rank-sweep, "
                                                "intrinsic-dim, lora-vs-full, magnitude-direction, variants"),
    (["experiment", "rank-sweep"], "--out DIR is required"),
    (["experiment", "--out", "x"], "give an experiment NAME"),
])
def test_mistakes_are_one_line_exit_2(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "x").exists()  # nothing written


def test_half_of_model_and_data_is_refused(classifier_dir, tmp_path, capsys):
    assert main(["experiment", "rank-sweep", "--model", str(classifier_dir), "--out", str(tmp_path / "o")]) == 2
    assert "--model needs --data" in _error_line(capsys)


def test_quick_run_and_resume(classifier_dir, tmp_path, capsys):
    data = write_classification_jsonl(tmp_path / "cls.jsonl", n=24)
    out = tmp_path / "out"
    argv = ["experiment", "rank-sweep", "--model", str(classifier_dir), "--data", str(data), "--quick",
            "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "| r | trainable params |" in first.out and "[4/4 ##########" in first.err
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["ranks"] == [1, 4, 16] and len(list((out / "cells").glob("*.json"))) == 4

    assert main(argv) == 0  # resumed: every cell read back
    assert capsys.readouterr().err.count("resumed (finished before)") == 4

    assert main([*argv, "--seeds", "2"]) == 2
    assert "seeds=None; this run has seeds=2" in _error_line(capsys)
    assert main([*argv, "--seeds", "2", "--restart"]) == 0  # the old cells discarded, 2 seeds trained
    assert json.loads((out / "results.json").read_text())["results"]["seeds"] == [0, 1]
