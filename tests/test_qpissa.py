"""Quantising a model that already has adapters, and QPiSSA (PiSSA, Meng et al. 2024): attach with init="pissa"
to the full-precision model, then `lorakit.quantize`, so that only the residual W0 - s B A is stored in NF4."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(128, 96), nn.Tanh(), nn.Linear(96, 64))
    with torch.no_grad():  # a few strong directions, like pre-trained weights (PiSSA's premise)
        for layer in (net[0], net[2]):
            d, k = layer.weight.shape
            layer.weight.add_(2.0 * torch.randn(d, 4) @ torch.randn(4, k) / k**0.5)
    return net


def _nf4_error(w: torch.Tensor) -> float:
    return (dequantize_nf4(quantize_nf4(w), torch.float32) - w).norm().item()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_qpissa_quantisation_error_is_below_plain_nf4(init: str) -> None:
    """NF4(W0 - s B A) + s B A is closer to W0 than NF4(W0): the PiSSA paper's QPiSSA claim, on this weight."""
    dense = _net()
    w0 = {i: dense[i].weight.detach().clone() for i in (0, 2)}
    model = _net()
    lorakit.attach(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["0", "2"], init=init))
    lorakit.quantize(model, "nf4", compute_dtype=torch.float32, skip=())
    x = torch.randn(5, 128)
    for i, w in w0.items():
        layer = model[i]
        assert type(layer.base_layer).__name__ == "NF4Linear" and layer.kind.name == "nf4_linear"
        adapter = layer.adapters["default"]
        effective = layer.base_layer.dequantize(torch.float32) + adapter.scale * adapter.lora_B @ adapter.lora_A
        assert (effective - w).norm().item() < 0.8 * _nf4_error(w), i
    plain = lorakit.quantize(_net(), "nf4", compute_dtype=torch.float32, skip=())
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < (plain(x) - dense(x)).abs().max()


def test_attach_then_quantize_equals_quantize_then_attach_for_lora_and_dora() -> None:
    for use_dora in (False, True):
        cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], init="random", use_dora=use_dora)
        first = _net()
        torch.manual_seed(1)
        lorakit.attach(first, cfg)
        state = {k: v.clone() for k, v in first.state_dict().items() if "adapters" in k}
        lorakit.quantize(first, "nf4", compute_dtype=torch.float32, skip=())
        second = lorakit.quantize(_net(), "nf4", compute_dtype=torch.float32, skip=())
        lorakit.attach(second, cfg)
        second.load_state_dict(state, strict=False)
        x = torch.randn(6, 128)
        with torch.no_grad():
            if not use_dora:  # DoRA's magnitude came from the dense W0 in `first`: compare the LoRA case exactly
                torch.testing.assert_close(first(x), second(x), rtol=0, atol=1e-6)
            else:
                assert torch.isfinite(first(x)).all()
        first(x).sum().backward()  # trains on the NF4 base
        assert all(p.grad is not None for n, p in first.named_parameters() if p.requires_grad)


def test_qpissa_converted_save_is_exact_on_the_original_weights(tmp_path) -> None:
    """The converted file (rank 2r) is W0 + s (B A - B0 A0): on the dense original it differs from the trained
    NF4 model exactly by the residual's quantisation error, and on NF4(W0) by NF4(W0) - NF4(W_res) - s B0 A0."""
    def one_layer() -> nn.Module:
        return nn.Sequential(_net()[0])

    model = one_layer()
    lorakit.attach(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["0"], init="pissa"))
    w0 = one_layer()[0].weight.detach()
    lorakit.quantize(model, "nf4", compute_dtype=torch.float32, skip=())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(32, 128), torch.randn(32, 96)
    losses = []
    for _ in range(10):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    adapter = model[0].adapters["default"]
    residual_nf4 = model[0].base_layer.dequantize(torch.float32)
    b0a0 = adapter.scale * adapter.initial_B @ adapter.initial_A
    lorakit.save_adapter(model, tmp_path / "conv", convert_to_lora=True)
    dense, fresh = one_layer(), lorakit.quantize(one_layer(), "nf4", compute_dtype=torch.float32, skip=())
    lorakit.load_adapter(dense, tmp_path / "conv")
    lorakit.load_adapter(fresh, tmp_path / "conv")
    w0_nf4 = fresh[0].base_layer.dequantize(torch.float32)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(dense(x) - want, x @ (w0 - b0a0 - residual_nf4).t(), rtol=0, atol=1e-4)
        torch.testing.assert_close(fresh(x) - want, x @ (w0_nf4 - b0a0 - residual_nf4).t(), rtol=0, atol=1e-4)


def test_quantize_refuses_a_merged_adapter() -> None:
    model = _net()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    lorakit.merge(model)
    with pytest.raises(lorakit.TargetError, match="merged"):
        lorakit.quantize(model, "nf4", compute_dtype=torch.float32, skip=())


def test_lorakit_train_quantize_with_pissa_attaches_first_then_quantises(tmp_path, causal_lm_dir, monkeypatch) -> None:
    import json

    from lorakit.train import loop
    from lorakit.train.config import TrainConfig

    seen = {}
    quantize_base = loop.quantize_base

    def spy(model, cfg, task, device):
        seen["lora_layers_before_quantize"] = sum(isinstance(m, lorakit.layers.LoraLayer) for m in model.modules())
        quantize_base(model, cfg, task, device)
        seen["model"] = model

    monkeypatch.setattr(loop, "quantize_base", spy)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}"})
                              for a in range(5) for b in range(5)) + "\n")
    out = tmp_path / "run"
    result = loop.train(TrainConfig(model=str(causal_lm_dir), data=str(data), out=str(out), max_steps=4,
                                    per_device_train_batch_size=4, learning_rate=5e-3, progress=False, seed=3,
                                    quantize="nf4", init="pissa", r=2, target_modules=["q_proj", "v_proj"]))
    assert seen["lora_layers_before_quantize"] > 0  # PiSSA factored the full-precision weights first
    assert any(type(m).__name__ == "NF4Linear" for m in seen["model"].modules())
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["init_lora_weights"] is True  # converted for the original model
    assert len(result.losses) == 4
