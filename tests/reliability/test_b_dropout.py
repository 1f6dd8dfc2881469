"""Dropout just below 1 (issue 15, section 4): the kept inputs are scaled by 1 / (1 - p), so lorakit refuses
p > MAX_DROPOUT (0.99: a scale of at most 100) at configuration time, in LoraConfig, TrainConfig, the CLI and
adapter_config.json; p = 0.99 itself trains with finite loss and gradients."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import tiny_llama, token_ids
from lorakit.cli.main import main
from lorakit.config import MAX_DROPOUT
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.train.config import TrainConfig

ACCEPTED = [0.0, 0.5, MAX_DROPOUT]
REFUSED = [math.nextafter(MAX_DROPOUT, 1.0), 0.9999999, 1 - 1e-12, math.nextafter(1.0, 0.0), 1.0, math.nan,
           math.inf, -0.01]


@pytest.mark.parametrize("p", ACCEPTED)
def test_dropout_up_to_the_bound_is_accepted(p: float) -> None:
    assert lorakit.LoraConfig(target_modules=["q_proj"], dropout=p).dropout == p
    assert TrainConfig(lora_dropout=p).lora_dropout == p


@pytest.mark.parametrize("p", REFUSED, ids=repr)
def test_dropout_above_the_bound_is_refused_at_configuration(p: float) -> None:
    with pytest.raises(ConfigError, match=r"LoraConfig.dropout.*\[0, 0.99\]"):
        lorakit.LoraConfig(target_modules=["q_proj"], dropout=p)
    with pytest.raises(ConfigError, match="lora_dropout"):
        TrainConfig(lora_dropout=p)


def test_the_cli_refuses_it_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--lora-dropout", "0.9999999", "--model", "m", "--data", "d.jsonl", "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and "lora_dropout" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_file_with_it_is_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    path = lorakit.save_adapter(model, tmp_path / "a")
    data = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**data, "lora_dropout": 0.9999999}))
    with pytest.raises(AdapterFileError, match="dropout"):
        lorakit.load_adapter(tiny_llama(), path)


def test_the_bound_itself_trains_finite() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=MAX_DROPOUT, init="random"))
    model.train()
    ids = token_ids(batch=4, length=16)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert math.isfinite(loss.item())
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p -= 1e-3 * p.grad
                    p.grad = None
