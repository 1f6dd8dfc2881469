"""Bytes all-reduced per DDP step under real torchrun (2 gloo processes): exactly the adapter's gradient bytes,
and the hook averages as DDP does (the gradients equal the single-process gradient of the whole batch)."""

from __future__ import annotations

import json

import pytest
import torch
from f_launch import global_batch, run_torchrun

import lorakit
from conftest import max_abs_diff, tiny_llama
from lorakit.distributed.comm import install_byte_counter, square_layer_ratio, trainable_bytes
from lorakit.errors import ConfigError

STEPS = 3


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun("f_child_ddp.py", str(out), str(STEPS))
    return out


def test_bytes_all_reduced_per_step_equal_trainable_bytes(ddp_run):
    result = json.loads((ddp_run / "result.json").read_text())
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=0.0))
    expected = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert result["trainable_bytes"] == expected
    assert result["bytes_per_step"] == [expected] * STEPS
    assert result["full_bytes"] > 2 * expected  # the frozen base never travels


def test_no_sync_micro_batch_sends_nothing(ddp_run):
    result = json.loads((ddp_run / "result.json").read_text())
    assert result["after_no_sync"] == result["synced_before"] == STEPS
    assert result["steps"] == STEPS + 1


def test_hook_gradients_equal_single_process_average(ddp_run):
    world = json.loads((ddp_run / "result.json").read_text())["world"]
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=0.0))
    ids = global_batch(0, 2 * world)
    model(input_ids=ids, labels=ids).loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for rank in range(world):
        grads = torch.load(ddp_run / f"grads_rank{rank}.pt")
        assert grads.keys() == reference.keys()
        assert max(max_abs_diff(grads[n], reference[n]) for n in reference) < 1e-5
        assert any(g.abs().sum() > 0 for g in grads.values())


def test_two_processes_train_as_one_on_the_whole_batch(ddp_run):
    world = json.loads((ddp_run / "result.json").read_text())["world"]
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=0.0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for step in range(STEPS):
        ids = global_batch(step, 2 * world)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert json.loads((ddp_run / "result.json").read_text())["losses"] == pytest.approx(losses, abs=1e-5)
    for rank in range(world):
        trained = torch.load(ddp_run / f"trained_rank{rank}.pt")
        reference = dict(model.named_parameters())
        assert max(max_abs_diff(t, reference[n]) for n, t in trained.items()) < 1e-5


def test_a_second_hook_is_refused(ddp_run):
    second = json.loads((ddp_run / "result.json").read_text())["second_hook"]
    assert second.startswith("ConfigError: install_byte_counter: DDP refused the hook")


def test_install_byte_counter_refuses_a_plain_module():
    with pytest.raises(ConfigError, match="DistributedDataParallel, found LlamaForCausalLM"):
        install_byte_counter(tiny_llama())


def test_square_layer_ratio_is_d_over_2r():
    assert square_layer_ratio(4096, 8) == 256.0
    with pytest.raises(ConfigError, match="r=0"):
        square_layer_ratio(64, 0)
    assert trainable_bytes(tiny_llama()) > 0
