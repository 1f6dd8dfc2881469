"""transformers' Trainer under real torchrun (2 gloo processes, use_cpu=True): a model with lorakit adapters
trains with DDP, save_model writes the adapter from rank 0 only, and that adapter reloads to the trained logits."""

from __future__ import annotations

import json

import torch
from f_launch import global_batch, run_torchrun

import lorakit
from conftest import max_abs_diff, tiny_llama


def test_trainer_ddp_trains_and_rank0_saves_the_adapter(tmp_path):
    run_torchrun("f_child_trainer.py", str(tmp_path), timeout=120)
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["world"], result["args_world"], result["backend"]) == (2, 2, "gloo")
    assert result["ddp_wrapped"] and result["ranks_agree"]
    assert (tmp_path / "saved_by_rank0").exists() and not (tmp_path / "saved_by_rank1").exists()
    trained = torch.load(tmp_path / "logits.pt")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter").eval()
    ids = global_batch(99, 3)
    with torch.no_grad():
        assert max_abs_diff(loaded(ids).logits, trained) < 1e-5
        assert max_abs_diff(tiny_llama()(ids).logits, trained) > 1e-3  # training moved the adapter
