"""LoRA-FA (Zhang et al. 2023): A frozen at its random init, only B trains, and backward does not keep x.

Checked here: which factors train (and stay frozen through training and set_trainable), the gradients of
B and x against an autograd reference and against plain LoRA with the same dropout draw, that the op saves
exactly x's bytes less than LoRA's and lets x be freed, and that the file is a plain LoRA file PEFT loads.
"""

from __future__ import annotations

import copy
import json
import weakref

import pytest
import torch
from torch import nn

import lorakit
from conftest import max_abs_diff, tiny_llama, token_ids
from lorakit.layers import LoraLayer
from lorakit.ops.lora import lora_linear, lora_linear_add


def _adapters(model: nn.Module, name: str = "default"):
    return [(m.path, m.adapters[name]) for m in model.modules() if isinstance(m, LoraLayer) and name in m.adapters]


def _fa_config(**kw) -> lorakit.LoraConfig:
    values = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], lora_fa=True)
    values.update(kw)
    return lorakit.LoraConfig(**values)


def test_only_b_is_trainable_and_embeddings_freeze_their_random_factor():
    model = lorakit.attach(tiny_llama(), _fa_config())
    adapters = _adapters(model)
    assert {p.rsplit(".", 1)[-1] for p, _ in adapters} == {"q_proj", "v_proj", "down_proj", "embed_tokens"}
    for path, adapter in adapters:
        if adapter.kind.name == "embedding":  # A starts at zero there: the random B stays frozen instead
            assert adapter.lora_A.requires_grad and not adapter.lora_B.requires_grad, path
        else:
            assert not adapter.lora_A.requires_grad and adapter.lora_B.requires_grad, path
    trainable, _ = lorakit.trainable_parameters(model)
    expected = sum((a.lora_A if a.kind.name == "embedding" else a.lora_B).numel() for _, a in adapters)
    assert trainable == expected


def test_set_trainable_keeps_a_frozen():
    model = lorakit.attach(tiny_llama(), _fa_config(target_modules=["q_proj"]))
    lorakit.set_trainable(model, "default", False)
    assert all(not p.requires_grad for _, a in _adapters(model) for p in a.parameters())
    lorakit.set_trainable(model, "default", True)
    for _, adapter in _adapters(model):
        assert not adapter.lora_A.requires_grad and adapter.lora_B.requires_grad


def test_a_never_changes_under_training_and_b_does():
    model = lorakit.attach(tiny_llama(), _fa_config(dropout=0.1))
    model.train()
    before = {p: (a.lora_A.detach().clone(), a.lora_B.detach().clone()) for p, a in _adapters(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = token_ids(4, 9)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for path, adapter in _adapters(model):
        a0, b0 = before[path]
        if adapter.kind.name == "embedding":
            assert torch.equal(adapter.lora_B, b0) and not torch.equal(adapter.lora_A, a0), path
        else:
            assert torch.equal(adapter.lora_A, a0) and adapter.lora_A.grad is None, path
            assert not torch.equal(adapter.lora_B, b0), path


def _factors(k: int = 12, d: int = 10, r: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d, k, generator=gen)
    bias = torch.randn(d, generator=gen)
    a = torch.randn(r, k, generator=gen)
    b = torch.randn(d, r, generator=gen)
    x = torch.randn(2, 5, k, generator=gen)
    return weight, bias, a, b, x


def _run(op: str, x, weight, bias, a, b, scale, p, seed=7):
    """(out, grad x, grad A, grad B) through one of the two ops, with a fixed dropout draw."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    if op == "fused":
        out = lora_linear(x, weight, bias, a, b, scale, p)
    else:
        out = lora_linear_add(torch.nn.functional.linear(x, weight, bias), x, a, b, scale, p)
    gen = torch.Generator().manual_seed(3)
    out.backward(torch.randn(out.shape, generator=gen))
    return out.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("op", ["fused", "add"])
def test_gradients_of_b_and_x_match_an_autograd_reference(op):
    weight, bias, a, b, x = _factors()
    scale = 0.5
    out, gx, ga, gb = _run(op, x, weight, bias, a, b.requires_grad_(True), scale, 0.0)
    assert ga is None
    # reference: plain autograd with A a constant
    xr = x.detach().clone().requires_grad_(True)
    br = b.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(xr, weight, bias) + scale * (xr @ a.t()) @ br.t()
    ref.backward(torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)))
    assert max_abs_diff(out, ref) < 1e-5
    assert max_abs_diff(gx, xr.grad) < 1e-5
    assert max_abs_diff(gb, br.grad) < 1e-5


@pytest.mark.parametrize("op", ["fused", "add"])
def test_with_dropout_b_and_x_gradients_equal_plain_loras(op):
    weight, bias, a, b, x = _factors(seed=1)
    fa = _run(op, x, weight, bias, a.clone(), b.clone().requires_grad_(True), 0.7, 0.25)
    plain = _run(op, x, weight, bias, a.clone().requires_grad_(True), b.clone().requires_grad_(True), 0.7, 0.25)
    assert plain[2] is not None and fa[2] is None
    for got, want in ((fa[0], plain[0]), (fa[1], plain[1]), (fa[3], plain[3])):
        assert torch.equal(got, want)  # the same draw and the same arithmetic: bit-identical


class _Net(nn.Module):
    def __init__(self, k: int = 64, d: int = 48) -> None:
        super().__init__()
        self.proj = nn.Linear(k, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _net(lora_fa: bool, adapters: int) -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    cfg = lorakit.LoraConfig(r=4, target_modules=["proj"], dropout=0.1, lora_fa=lora_fa)
    for i in range(adapters):
        lorakit.attach(net, cfg, name=f"a{i}")
    lorakit.set_active(net, [f"a{i}" for i in range(adapters)])  # 2 active adapters: the add path
    for i in range(adapters):
        lorakit.set_trainable(net, f"a{i}", True)
    return net.train()


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> tuple[int, bool]:
    """Bytes of the tensors autograd saves in net's forward, and whether x's storage is among them."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        net(x)
    keeps_x = any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    return sum(t.nelement() * t.element_size() for t in saved), keeps_x


@pytest.mark.parametrize("adapters", [1, 2], ids=["fused", "add"])
def test_the_op_saves_exactly_x_less_than_lora(adapters):
    x = torch.randn(6, 16, 64).requires_grad_(True)
    lora_bytes, lora_keeps_x = _saved_bytes(_net(False, adapters), x)
    fa_bytes, fa_keeps_x = _saved_bytes(_net(True, adapters), x)
    assert lora_keeps_x and not fa_keeps_x
    x_bytes = x.nelement() * x.element_size()
    assert fa_bytes < lora_bytes
    if adapters == 1:  # the fused op is the only saver: x is exactly the difference
        assert lora_bytes - fa_bytes == x_bytes


@pytest.mark.parametrize("adapters", [1, 2], ids=["fused", "add"])
def test_x_is_freed_after_forward_with_lora_fa_only(adapters):
    def alive_after_forward(lora_fa: bool) -> bool:
        net = _net(lora_fa, adapters)
        leaf = torch.randn(4, 8, 64, requires_grad=True)
        x = leaf * 2.0  # a non-leaf activation (multiplying by a number saves nothing)
        ref = weakref.ref(x)
        out = net(x)
        del x
        alive = ref() is not None
        out.sum().backward()  # backward still works without x
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
        return alive

    assert alive_after_forward(False)
    assert not alive_after_forward(True)


def test_lora_fa_adapter_is_a_plain_lora_file_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = lorakit.attach(copy.deepcopy(base), _fa_config(target_modules=["q_proj", "v_proj", "o_proj"]))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = token_ids(2, 8)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] is False
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    assert max_abs_diff(got, want) <= 1e-5
    assert max_abs_diff(want, base_logits) > 1e-3  # the adapter trained to something visible
