"""FSDP2 sharding of the frozen base under real torchrun (2 gloo processes on the CPU): each rank holds ~1/N of
the frozen weights, the losses and the saved adapter (LoRA + a modules_to_save copy of lm_head) equal a single
process on the whole batch."""

from __future__ import annotations

import json

import pytest
import torch
from f_launch import LR, PER_RANK, f_lora_config, global_batch, run_torchrun

import lorakit
from conftest import max_abs_diff, tiny_llama
from lorakit.distributed.fsdp import adapter_state_dict, block_classes, shard_model
from lorakit.errors import ConfigError

STEPS = 3
SAVED = ["lm_head"]  # as f_child_fsdp.py: a modules_to_save copy trains beside the adapters


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_torchrun("f_child_fsdp.py", str(out), str(STEPS))
    return out, json.loads((out / "result.json").read_text())


def _single_process(world: int):
    model = lorakit.attach(tiny_llama().train(), f_lora_config(SAVED))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):
        ids = global_batch(step, PER_RANK * world)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_frozen_base_is_split_across_ranks(fsdp_run):
    _, result = fsdp_run
    world, whole = result["world"], result["unsharded"]
    per_rank = result["sharded_per_rank"]
    assert sum(r["frozen"] for r in per_rank) == whole["frozen"]
    for r in per_rank:
        assert abs(r["frozen"] - whole["frozen"] / world) <= 0.05 * whole["frozen"]
        assert r["trainable"] < whole["trainable"]


def test_losses_and_saved_adapter_equal_single_process(fsdp_run):
    out, result = fsdp_run
    reference, losses = _single_process(result["world"])
    assert result["losses"] == pytest.approx(losses, abs=1e-5)
    loaded = lorakit.load_adapter(tiny_llama(), out / "adapter")
    ids = global_batch(99, 3)
    with torch.no_grad():
        assert max_abs_diff(loaded(ids).logits, reference(ids).logits) < 1e-5
        assert max_abs_diff(loaded(ids).logits, tiny_llama()(ids).logits) > 1e-3  # the adapter trained


def test_adapter_state_dict_holds_adapter_tensors_only():
    model = lorakit.attach(tiny_llama(), f_lora_config(SAVED))
    state = adapter_state_dict(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in state.values()) == trainable
    assert all(".adapters." in k or ".copies." in k for k in state)
    assert any(".copies." in k for k in state)


def test_shard_model_refuses_without_a_process_group():
    model = lorakit.attach(tiny_llama(), f_lora_config(SAVED))
    assert block_classes(model) == {"LlamaDecoderLayer"}
    with pytest.raises(ConfigError, match="no torch.distributed process group"):
        shard_model(model)
