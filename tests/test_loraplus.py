"""LoRA+ (Hayou et al. 2024): parameter groups with B at ratio x A's learning rate, embeddings at their own rate.

Checked: which parameter lands in which group (with a classifier head, biases, an embedding adapter, LoRA-FA's
frozen A and a second, frozen adapter), that one SGD step moves A by lr * grad and B by ratio * lr * grad,
that any torch optimizer class works, and the errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_bert, tiny_llama, token_ids
from lorakit.layers import LoraLayer


def _adapters(model: nn.Module, name: str = "default"):
    return [m.adapters[name] for m in model.modules() if isinstance(m, LoraLayer) and name in m.adapters]


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _groups_by_name(groups):
    return {g["name"]: g for g in groups}


def test_groups_hold_the_right_parameters_with_the_right_rates():
    cfg = lorakit.LoraConfig(r=4, target_modules=["query", "value", "word_embeddings"], bias="lora_only",
                             modules_to_save=["classifier"])
    model = lorakit.attach(tiny_bert(), cfg)
    groups = _groups_by_name(lorakit.loraplus_param_groups(model, lr=1e-3, ratio=8.0, lr_embedding=1e-5,
                                                           weight_decay=0.1))
    assert set(groups) == {"lora_A", "lora_B", "embedding", "other", "other_no_decay"}
    adapters = _adapters(model)
    linear = [a for a in adapters if a.kind.name != "embedding"]
    embedding = [a for a in adapters if a.kind.name == "embedding"]
    assert len(linear) == 4 and len(embedding) == 1
    assert _ids(groups["lora_A"]["params"]) == _ids(a.lora_A for a in linear)
    assert _ids(groups["lora_B"]["params"]) == _ids(a.lora_B for a in linear)
    assert _ids(groups["embedding"]["params"]) == _ids([embedding[0].lora_A, embedding[0].lora_B])
    head = model.classifier.copies["default"]
    assert _ids(groups["other"]["params"]) == {id(head.weight)}
    lora_biases = [m.base_layer.bias for m in model.modules()
                   if isinstance(m, LoraLayer) and m.kind.name != "embedding"]
    assert _ids(groups["other_no_decay"]["params"]) == _ids(lora_biases) | {id(head.bias)}
    rates = {name: (g["lr"], g["weight_decay"]) for name, g in groups.items()}
    assert rates == {"lora_A": (1e-3, 0.1), "lora_B": (8e-3, 0.1), "embedding": (1e-5, 0.1),
                     "other": (1e-3, 0.1), "other_no_decay": (1e-3, 0.0)}
    # every trainable parameter is in exactly one group, and nothing frozen is
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == _ids(p for p in model.parameters() if p.requires_grad)


def test_frozen_parameters_are_left_out_lora_fa_and_frozen_adapters():
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_fa=True))
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), name="other")
    lorakit.set_trainable(model, "other", False)
    groups = _groups_by_name(lorakit.loraplus_param_groups(model, lr=1e-3))
    assert set(groups) == {"lora_B"}  # A is frozen (LoRA-FA), "other" is frozen, the base is frozen
    assert _ids(groups["lora_B"]["params"]) == _ids(a.lora_B for a in _adapters(model))
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3)  # the default ratio is 16


def test_one_sgd_step_moves_b_ratio_times_faster_than_a():
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"))
    lr, ratio = 1e-2, 4.0
    opt = lorakit.loraplus_optimizer(model, torch.optim.SGD, lr=lr, ratio=ratio)
    assert isinstance(opt, torch.optim.SGD)
    ids = token_ids(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    adapters = _adapters(model)
    before = [(a.lora_A.detach().clone(), a.lora_B.detach().clone()) for a in adapters]
    grads = [(a.lora_A.grad.clone(), a.lora_B.grad.clone()) for a in adapters]
    opt.step()
    for adapter, (a0, b0), (ga, gb) in zip(adapters, before, grads):
        assert ga.abs().max() > 0 and gb.abs().max() > 0
        torch.testing.assert_close(adapter.lora_A.detach(), a0 - lr * ga, rtol=0, atol=1e-7)
        torch.testing.assert_close(adapter.lora_B.detach(), b0 - ratio * lr * gb, rtol=0, atol=1e-7)
        step_a = (adapter.lora_A.detach() - a0).norm() / ga.norm()
        step_b = (adapter.lora_B.detach() - b0).norm() / gb.norm()
        assert step_b / step_a == pytest.approx(ratio, rel=1e-3)


def test_optimizer_kwargs_pass_through_and_adamw_is_the_default():
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    opt = lorakit.loraplus_optimizer(model, lr=1e-3, betas=(0.8, 0.9), weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.8, 0.9) and g["weight_decay"] == 0.05 for g in opt.param_groups)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3, 16e-3])


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.0}, "ratio must be a finite number > 0, got 0.0"),
    ({"ratio": -2.0}, "ratio must be a finite number > 0"),
    ({"ratio": float("nan")}, "ratio must be a finite number > 0"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
    ({"lr_embedding": -1.0}, "lr_embedding must be a finite number >= 0"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
])
def test_invalid_rates_are_config_errors(kwargs, message):
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match=message):
        lorakit.loraplus_optimizer(model, **{"lr": 1e-3, **kwargs})


def test_no_trainable_adapter_parameters_is_an_error():
    plain = tiny_llama()
    with pytest.raises(lorakit.ConfigError, match="no trainable adapter parameters"):
        lorakit.loraplus_param_groups(plain, lr=1e-3)
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.set_trainable(model, "default", False)
    with pytest.raises(lorakit.ConfigError, match="no trainable adapter parameters"):
        lorakit.loraplus_optimizer(model, lr=1e-3)
