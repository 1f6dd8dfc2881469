"""lorakit.experiments.subspace: θ = θ0 + c P z with only z trained (and the head), restored afterwards; and LoRA with
a frozen random B (only A trains)."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from conftest import tiny_bert, tiny_gpt2, token_ids
from lorakit.errors import ConfigError
from lorakit.experiments.subspace import (
    DENSE_LIMIT,
    SUBSPACE_MODULE,
    attach_subspace,
    detach_subspace,
    freeze_random_b,
    lora_adapters,
    orthonormal_columns,
    projection_for,
    subspace_gain,
    subspace_of,
)
from lorakit.ops.fastfood import fastfood_apply

TARGETS = [f"bert.encoder.layer.{i}.{name}" for i in range(2)
           for name in ("attention.self.query", "attention.self.value", "intermediate.dense")]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _step(model, ids, optimizer):
    model.train()
    loss = model(input_ids=ids, labels=torch.tensor([0, 1])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def _p_times(sub, z):
    """P z from the projection alone (dense matrix or the Fastfood map), independently of sub.delta()."""
    return sub.matrix @ z if sub.projection == "dense" else fastfood_apply(sub.fastfood(), z)


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_only_z_and_the_head_train_and_z0_is_the_base_model(projection):
    model, ids = tiny_bert(), token_ids()
    before = _logits(model, ids)
    names_before = {n for n, _ in model.named_parameters()}
    sub = attach_subspace(model, TARGETS, d=12, seed=0, projection=projection, gain=2.0, train_also=("classifier",))
    assert sub.projection == projection and sub.D == 2 * (32 * 32 * 2 + 64 * 32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{SUBSPACE_MODULE}.z", "classifier.weight", "classifier.bias"}
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)
    # the weights are no longer Parameters of their modules (they are written from θ0 + c P z before each forward)
    assert not any(n.startswith(TARGETS[0] + ".weight") for n, _ in model.named_parameters())
    assert names_before - {n for n, _ in model.named_parameters()} == {t + ".weight" for t in TARGETS}


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_a_step_changes_the_weights_only_through_p_z(projection):
    model, ids = tiny_bert(), token_ids()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not n.startswith("classifier") and n not in {t + ".weight" for t in TARGETS}}
    theta0 = {t: model.get_submodule(t).weight.detach().clone() for t in TARGETS}
    sub = attach_subspace(model, TARGETS, d=9, seed=3, projection=projection, gain=1.5, train_also=("classifier",))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        _step(model, ids, optimizer)
    assert sub.z.detach().abs().min() > 0  # every coordinate of z moved
    _logits(model, ids)  # a forward writes the weights
    delta = 1.5 * _p_times(sub, sub.z.detach())
    for i, t in enumerate(TARGETS):
        expected = theta0[t] + delta[sub.offsets[i]:sub.offsets[i + 1]].view_as(theta0[t])
        torch.testing.assert_close(model.get_submodule(t).weight.detach(), expected)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n


@pytest.mark.parametrize("merge", [True, False])
def test_detach_restores_the_parameters_and_flags(merge):
    model, ids = tiny_bert(), token_ids()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a flag that must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    theta0 = {t: model.get_submodule(t).weight.detach().clone() for t in TARGETS}
    base_logits = _logits(model, ids)
    sub = attach_subspace(model, TARGETS, d=5, seed=1, projection="fastfood", train_also=("classifier",))
    optimizer = torch.optim.Adam([sub.z], lr=0.1)
    _step(model, ids, optimizer)
    trained_logits = _logits(model, ids)
    assert not torch.allclose(trained_logits, base_logits)
    updates = detach_subspace(model, merge=merge)
    assert not hasattr(model, SUBSPACE_MODULE) and not model._forward_pre_hooks
    assert set(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for t in TARGETS:
        weight = model.get_submodule(t)._parameters["weight"]
        assert isinstance(weight, torch.nn.Parameter)
        torch.testing.assert_close(weight.detach(), theta0[t] + updates[t] if merge else theta0[t], rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, ids), trained_logits if merge else base_logits)


def test_one_adam_step_moves_theta_by_about_gain_lr_sqrt_d():
    # Adam's first step is lr · sign(g): z moves by lr in every coordinate, θ by c · ||P z|| ≈ c · lr · sqrt(d)
    d, D, lr_full, lr = 16, 2 * (32 * 32 * 2 + 64 * 32), 1e-4, 1e-3
    gain = subspace_gain(d, D, lr_full, lr)
    assert gain == pytest.approx(0.1 * math.sqrt(D / d))
    model, ids = tiny_bert(), token_ids()
    sub = attach_subspace(model, TARGETS, d=d, seed=0, projection="dense", gain=gain)
    _step(model, ids, torch.optim.Adam([sub.z], lr=lr))
    moved = torch.cat([u.flatten() for u in sub.updates().values()]).norm().item()
    assert moved == pytest.approx(lr_full * math.sqrt(D), rel=0.15)  # full fine-tuning's step length
    assert subspace_gain(D, D, lr_full, lr_full) == 1.0
    assert subspace_gain(d, D, lr_full, lr, factor=30.0) == pytest.approx(30 * gain)
    with pytest.raises(ConfigError, match="d = 0"):
        subspace_gain(0, D, lr_full, lr)
    with pytest.raises(ConfigError, match="factor = -1"):
        subspace_gain(d, D, lr_full, lr, factor=-1.0)


def test_no_grad_forwards_reuse_p_z_until_z_changes():
    model = tiny_bert()
    sub = attach_subspace(model, TARGETS, d=4, seed=0, projection="dense")
    with torch.no_grad():
        first = sub.delta()
        assert sub.delta() is first
        sub.z.add_(1.0)  # an in-place update (as an optimizer step) bumps z's version
        assert not torch.equal(sub.delta(), first)


def test_projection_choice_and_errors():
    assert projection_for(10, DENSE_LIMIT // 10) == "dense"
    assert projection_for(10, DENSE_LIMIT // 10 + 1) == "fastfood"
    assert projection_for(10, 20, "fastfood") == "fastfood"
    with pytest.raises(ConfigError, match="'gaussian'"):
        projection_for(10, 20, "gaussian")
    model = tiny_bert()
    with pytest.raises(ConfigError, match="no module 'bert.nope'"):
        attach_subspace(model, ["bert.nope"], d=3, seed=0)
    with pytest.raises(ConfigError, match="no weight Parameter"):
        attach_subspace(model, ["bert.encoder"], d=3, seed=0)
    with pytest.raises(ConfigError, match="given twice"):
        attach_subspace(model, [TARGETS[0], TARGETS[0]], d=3, seed=0)
    with pytest.raises(ConfigError, match="'head'"):
        attach_subspace(model, TARGETS, d=3, seed=0, train_also=("head",))
    with pytest.raises(ConfigError, match="d must be >= 1"):
        attach_subspace(model, TARGETS, d=0, seed=0)
    attach_subspace(model, TARGETS, d=3, seed=0)
    with pytest.raises(ConfigError, match="has a subspace already"):
        attach_subspace(model, TARGETS, d=3, seed=0)
    detach_subspace(model)
    with pytest.raises(ConfigError, match="no random subspace"):
        subspace_of(model)
    with pytest.raises(ConfigError, match="tied"):
        attach_subspace(tiny_gpt2(), ["lm_head"], d=3, seed=0)  # GPT-2's lm_head shares wte's weight


# -- (a): LoRA with a frozen random B --------------------------------------------------------------------
def test_orthonormal_columns():
    q = orthonormal_columns(20, 6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.T @ q, torch.eye(6, dtype=torch.float64))
    with pytest.raises(ConfigError, match="at least 7 rows"):
        orthonormal_columns(5, 7, torch.Generator())


def test_frozen_random_b_only_a_trains_and_b_never_changes():
    model, ids = tiny_bert(), token_ids()
    before = _logits(model, ids)
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], dropout=0.0,
                                             modules_to_save=["classifier"]))
    d = freeze_random_b(model, seed=0, gain=0.5)
    adapters = lora_adapters(model)
    assert len(adapters) == 4 and d == 4 * 4 * 32  # 4 modules x r x k
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)  # A = 0: the base model
    b_before = [a.lora_B.detach().clone() for _, a in adapters]
    for _, adapter in adapters:  # gain · Q / s with orthonormal Q: (s B)ᵀ (s B) = gain² I
        sb = adapter.scale * adapter.lora_B.detach().double()
        torch.testing.assert_close(sb.T @ sb, 0.25 * torch.eye(4, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_A" in n or "classifier" in n for n in trainable) and any("lora_A" in n for n in trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for _ in range(2):
        _step(model, ids, optimizer)
    for (_, adapter), b in zip(adapters, b_before):
        assert torch.equal(adapter.lora_B, b)
        assert adapter.lora_A.detach().abs().sum() > 0
    # ΔW = s B A = gain · Q A: an isometry from A (up to the gain)
    adapter = adapters[0][1]
    delta = adapter.scale * adapter.lora_B.detach() @ adapter.lora_A.detach()
    assert delta.norm().item() == pytest.approx(0.5 * adapter.lora_A.detach().norm().item(), rel=1e-4)


def test_frozen_random_b_needs_lora_and_is_seeded():
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        freeze_random_b(tiny_bert(), seed=0)
    bs = []
    for seed in (0, 0, 1):
        model = tiny_bert()
        lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["query"]))
        freeze_random_b(model, seed=seed)
        bs.append(lora_adapters(model)[0][1].lora_B.detach().clone())
    assert torch.equal(bs[0], bs[1]) and not torch.equal(bs[0], bs[2])
