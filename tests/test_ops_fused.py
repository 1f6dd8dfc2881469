"""The fused op (base GEMM + one adapter, ops.lora.lora_linear) against the unfused path and autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.ops import native
from lorakit.ops.lora import effective_weight_pays, lora_linear


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_fused(transposed, p, with_bias):
    torch.manual_seed(0)
    n, k, d, r = 5, 4, 3, 2
    x = torch.randn(2, n, k, dtype=torch.float64, requires_grad=True)
    weight = torch.randn((k, d) if transposed else (d, k), dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d, dtype=torch.float64, requires_grad=True) if with_bias else None
    a = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, r, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, a, b, *bias_):
        torch.manual_seed(7)  # the same dropout mask at every evaluation
        return lora_linear(x, weight, bias_[0] if bias_ else None, a, b, 0.5, p, transposed)

    inputs = (x, weight, a, b) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(fn, inputs)


def test_fused_forward_equals_the_naive_formula():
    torch.manual_seed(1)
    x = torch.randn(3, 6, 8, requires_grad=True)
    weight, bias = torch.randn(5, 8), torch.randn(5)
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    out = lora_linear(x, weight, bias, a, b, 0.25)
    expected = x @ weight.t() + bias + 0.25 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_fused_path_falls_back_where_it_does_not_apply():
    x = torch.randn(2, 8)
    weight = torch.randn(5, 8)
    a, b = torch.randn(4, 8), torch.randn(5, 4)
    assert lora_linear(x.bfloat16(), weight, None, a, b, 1.0) is None  # mixed dtypes
    with torch.no_grad():
        assert lora_linear(x, weight, None, a, b, 1.0) is None  # inference on 2 tokens: the add path pays


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_large_batch_inference_uses_a_transient_effective_weight(transposed, with_bias):
    torch.manual_seed(2)
    k, d, r = 12, 10, 3
    x = torch.randn(4, 16, k)  # 64 tokens: building W0 + s B A moves fewer values than the branch
    weight = torch.randn((k, d) if transposed else (d, k))
    bias = torch.randn(d) if with_bias else None
    a, b = torch.randn(r, k), torch.randn(d, r)
    w0 = weight.clone()
    assert effective_weight_pays(64, k, d) and not effective_weight_pays(2, k, d)
    with torch.no_grad():
        out = lora_linear(x, weight, bias, a, b, 0.5, transposed=transposed)
    w_dk = weight.t() if transposed else weight
    expected = x @ w_dk.t() + 0.5 * (x @ a.t()) @ b.t() + (bias if with_bias else 0.0)
    assert out is not None and out.shape == (4, 16, d)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight, w0)  # the model's weight is not modified


def test_large_batch_eval_forward_of_a_model_equals_the_add_path():
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], init="random")
    model = lorakit.attach(_net(), cfg).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(256, 8)
    with torch.no_grad():
        out = model(x)
        with lorakit.disabled(model):
            base_only = model(x)
        lorakit.merge(model)
        merged = model(x)
    assert not torch.allclose(out, base_only, atol=1e-3)
    torch.testing.assert_close(out, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_weight_function_equals_the_weight_and_is_called_once_per_pass(transposed, p):
    """A quantised base passes W0 as a function (QLoRA): same values and gradients, W0 made in forward and again
    in backward (nothing dense saved in between), and no gradient for it."""
    torch.manual_seed(4)
    k, d, r = 12, 10, 3
    weight, bias = torch.randn((k, d) if transposed else (d, k)), torch.randn(d)
    calls = []

    def weight_fn():
        calls.append(1)
        return weight.clone()

    results = []
    for w in (weight, weight_fn):
        x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        a = torch.randn(r, k, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        b = torch.randn(d, r, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        torch.manual_seed(8)
        saved: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(tuple(t.shape)) or t,
                                                      lambda t: t):
            out = lora_linear(x, w, bias, a, b, 0.5, p, transposed, weight_dtype=torch.float32)
        out.square().sum().backward()
        results.append((out, x.grad, a.grad, b.grad, saved))
    assert len(calls) == 2
    assert tuple(weight.shape) not in results[1][4]
    for got, ref in zip(results[1][:4], results[0][:4]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # inference on 64 tokens: one GEMM with the sum made in the fresh W0
        x = torch.randn(4, 16, k)
        out = lora_linear(x, weight_fn, bias, a, b, 0.5, 0.0, transposed, weight_dtype=torch.float32)
        w_dk = weight.t() if transposed else weight
        torch.testing.assert_close(out, x @ w_dk.t() + bias + 0.5 * (x @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight_dtype"):
        lora_linear(x, weight_fn, bias, a, b, 0.5)


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_layer_fused_and_unfused_paths_agree_in_values_and_grads(p):
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], init="random", dropout=p)
    fused, hooked = lorakit.attach(_net(), cfg), lorakit.attach(_net(), cfg)
    for module in hooked.modules():  # a forward hook on the base layer turns the fused path off
        if isinstance(module, lorakit.layers.LoraLayer):
            module.base_layer.register_forward_hook(lambda m, i, o: None)
    x = torch.randn(6, 8)
    results = []
    for model in (fused, hooked):
        model.train()
        torch.manual_seed(11)
        xi = x.clone().requires_grad_(True)
        model(xi).square().sum().backward()
        grads = {n: q.grad for n, q in model.named_parameters() if q.requires_grad}
        results.append((xi.grad, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_cpu_keep_mask_drops_at_rate_p_in_every_slot(p):
    """The CPU mask carves four 16-bit uniforms out of each 64-bit draw: every slot must drop at rate p."""
    from lorakit.ops.lora import draw_keep_mask, realised_drop_probability

    torch.manual_seed(0)
    x = torch.empty(512, 1000)
    keep, keep_prob = draw_keep_mask(x, p)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert keep_prob == pytest.approx(1 - realised_drop_probability(p)) and abs(keep_prob - (1 - p)) < 1e-4
    dropped = (~keep).double().flatten()
    for slot in range(4):  # the 4 int16 lanes of each int64 draw
        rate = dropped[slot::4].mean().item()
        sigma = (p * (1 - p) / dropped[slot::4].numel()) ** 0.5
        assert abs(rate - p) < 5 * sigma, (slot, rate)
    assert (~keep).any(dim=1).all()  # no structured all-kept rows


@pytest.mark.skipif(native.library() is None, reason="no C compiler: only the stored-mask path exists")
@pytest.mark.parametrize("needs_x_grad", [True, False])
def test_fused_dropout_stores_no_mask_and_equals_the_stored_mask_path(monkeypatch, needs_x_grad):
    """fp32 on the CPU: the mask is drawn and applied in one pass and made again in backward from its key, so
    nothing mask-sized is saved; values and gradients equal the stored-mask path's under the same seed."""
    torch.manual_seed(5)
    k, d, r = 96, 80, 4
    weight, bias = torch.randn(d, k), torch.randn(d)
    x0, a0, b0 = torch.randn(3, 50, k), torch.randn(r, k), torch.randn(d, r)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(native, "fused_dropout_applies", lambda x: False)
        x = x0.clone().requires_grad_(needs_x_grad)
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        saved: list[torch.Tensor] = []
        torch.manual_seed(6)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            out = lora_linear(x, weight, bias, a, b, 0.5, 0.3)
        out.square().sum().backward()
        masks = [t for t in saved if t.dtype == torch.int16]
        assert (not masks) if fused else masks  # the stored path keeps 2 bytes per element of x
        results.append((out, x.grad, a.grad, b.grad))
    for got, ref in zip(*results):
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_keep_mask_is_none_without_dropout():
    from lorakit.ops.lora import draw_keep_mask

    assert draw_keep_mask(torch.ones(3, 3), 0.0) == (None, 1.0)


@pytest.mark.parametrize("p", [1 / 65536, 0.05, 0.1, 0.5, 65535 / 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keep_mask_arithmetic_equals_the_threshold_test_for_every_int16_draw(p, dtype):
    """keep_mask computes u >= level - 32768 with float arithmetic: check it on all 65536 possible draws."""
    from lorakit.ops.lora import keep_mask, realised_drop_probability

    draws = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    keep_prob = 1 - realised_drop_probability(p)
    level = round((1 - keep_prob) * 65536)
    mask = keep_mask(draws, keep_prob, dtype)
    assert mask.dtype == dtype
    torch.testing.assert_close(mask.float(), (draws.int() >= level - 32768).float(), rtol=0, atol=0)
    assert mask.float().sum().item() == 65536 - level  # exactly P(keep) of the draws are kept
