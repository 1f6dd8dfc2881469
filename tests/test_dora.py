"""DoRA: the op against a naive reference that materialises W' (the definition), zero rows, merge, dropout.

The naive reference is the paper's formula with the norm detached (section 4.3):
    W' = m ⊙ (W0 + s B A) / sg(||W0 + s B A||_row),    y = x W'ᵀ + b
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.ops.dora import dora_linear, dora_norm, row_norms_sq
from lorakit.variants.dora import DoraAdapter

torch.set_default_dtype(torch.float32)


def naive_dora(x, w_dk, bias, a, b, m, s):  # noqa: ANN001
    """y = x W'ᵀ + b with W' = m ⊙ V / sg(||V||_row), V = W0 + s B A; all (d, k) layout."""
    v = w_dk + s * (b @ a)
    n = torch.linalg.vector_norm(v, dim=1).detach()
    w_prime = (m / n)[:, None] * v
    y = x @ w_prime.t()
    return y if bias is None else y + bias


def _tensors(d=12, k=10, r=3, seed=0, dtype=torch.float64, zero_row=None):  # noqa: ANN001
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, k, generator=gen, dtype=dtype)
    if zero_row is not None:
        w[zero_row] = 0
    bias = torch.randn(d, generator=gen, dtype=dtype)
    a = torch.randn(r, k, generator=gen, dtype=dtype) * 0.3
    b = torch.randn(d, r, generator=gen, dtype=dtype) * 0.3
    m = torch.linalg.vector_norm(w + 0.7 * (b @ a), dim=1) * (1 + 0.2 * torch.randn(d, generator=gen, dtype=dtype))
    x = torch.randn(2, 5, k, generator=gen, dtype=dtype)
    return x, w, bias, a, b, m


def test_low_rank_norm_equals_the_materialised_norm() -> None:
    x, w, bias, a, b, m = _tensors()
    n = dora_norm(row_norms_sq(w, "dk"), w, "dk", a, b, 0.7)
    want = torch.linalg.vector_norm(w + 0.7 * (b @ a), dim=1)
    torch.testing.assert_close(n, want, rtol=1e-10, atol=1e-10)
    # GPT-2 layout: the weight stored (k, d)
    n_kd = dora_norm(row_norms_sq(w.t(), "kd"), w.t(), "kd", a, b, 0.7)
    torch.testing.assert_close(n_kd, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_output_and_gradients_equal_the_definition(transposed: bool, with_bias: bool) -> None:
    x, w, bias, a, b, m = _tensors()
    bias = bias if with_bias else None
    s = 0.7
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, m)]
    xr, ar, br, mr = leaves
    want = naive_dora(xr, w, bias, ar, br, mr, s)
    want.square().sum().backward()

    xg, ag, bg, mg = (t.clone().requires_grad_(True) for t in (x, a, b, m))
    weight = w.t().contiguous() if transposed else w
    layout = "kd" if transposed else "dk"
    norm = dora_norm(row_norms_sq(weight, layout), weight, layout, ag, bg, s).double()
    got = dora_linear(xg, weight, bias, ag, bg, mg, norm, s, 0.0, transposed=transposed)
    got.square().sum().backward()

    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for mine, ref in zip((xg, ag, bg, mg), leaves):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-6, atol=1e-6)


def test_zero_weight_row_gives_no_nan_in_output_or_gradients() -> None:
    """PEFT issue 2049: a row of zeros in W0 made the norm 0 and the output NaN."""
    layer = nn.Linear(10, 6)
    with torch.no_grad():
        layer.weight[2] = 0
    net = nn.Sequential(layer)
    lorakit.attach(net, lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"], use_dora=True))
    adapter = net[0].adapters["default"]
    assert adapter.lora_magnitude_vector[2].item() == 0
    x = torch.randn(4, 10)
    out = net(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    for p in adapter.parameters():
        assert torch.isfinite(p.grad).all()
    # B now non-zero: the zero row gets a direction, magnitude still 0, still finite
    with torch.no_grad():
        adapter.lora_B.normal_()
    out2 = net(x)
    out2.sum().backward()
    assert torch.isfinite(out2).all() and torch.isfinite(adapter.lora_magnitude_vector.grad).all()
    torch.testing.assert_close(out2[:, 2], layer.bias.detach()[2].expand(4))  # m = 0: only the bias


def test_zero_magnitude_row_gradient_is_rebuilt_from_x() -> None:
    """m_i = 0 makes c_i = 0; the op then rebuilds that row's z from x for dm_i. Check against the definition."""
    x, w, bias, a, b, m = _tensors()
    m[4] = 0
    leaves = [t.clone().requires_grad_(True) for t in (a, b, m)]
    naive_dora(x, w, bias, *leaves[:2], leaves[2], 0.7).square().sum().backward()
    ag, bg, mg = (t.clone().requires_grad_(True) for t in (a, b, m))
    norm = dora_norm(row_norms_sq(w, "dk"), w, "dk", ag, bg, 0.7).double()
    dora_linear(x, w, bias, ag, bg, mg, norm, 0.7, 0.0).square().sum().backward()
    torch.testing.assert_close(mg.grad, leaves[2].grad, rtol=1e-6, atol=1e-6)
    assert mg.grad[4].abs().item() > 0


def _dora_model(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 24, bias=bias), nn.Tanh(), nn.Linear(24, 8, bias=bias))
    lorakit.attach(net, lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=True, init="random"))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in (net[0], net[2]):
            mag = layer.adapters["default"].lora_magnitude_vector
            mag.mul_(1 + 0.3 * torch.randn(mag.shape, generator=gen))
    return net


def test_fused_and_fallback_paths_agree_with_dropout() -> None:
    """Same seed -> same dropout draw: the fused op and the generic (autograd) path must agree, grads too."""
    results = []
    for fused in (True, False):
        net = _dora_model().train()
        for layer in (net[0], net[2]):
            layer.adapters["default"].dropout = 0.3
            if not fused:
                layer.adapters["default"].fused_forward = lambda *_: None  # force the generic path
        x = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
        torch.manual_seed(123)
        out = net(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_merge_is_exact_and_unmerge_restores() -> None:
    net = _dora_model().eval()
    w0 = [net[i].base_layer.weight.detach().clone() for i in (0, 2)]
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = net(x)
        lorakit.merge(net)
        merged = net(x)
        lorakit.unmerge(net)
        again = net(x)
    assert (merged - want).abs().max().item() <= 1e-5
    assert (again - want).abs().max().item() <= 1e-5
    for i, w in zip((0, 2), w0):
        assert (net[i].base_layer.weight - w).abs().max().item() <= 1e-5


def test_inference_fast_path_equals_training_path() -> None:
    net = _dora_model()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        fast = net.eval()(x)
    slow = net.train()(x)  # dropout 0: same function, through the autograd op
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("tokens", [2, 5])  # 2 x 2 tokens: the add path; 2 x 5: the transient effective weight
def test_inference_paths_equal_the_definition(transposed: bool, tokens: int) -> None:
    from lorakit.ops.lora import effective_weight_pays

    x, w, bias, a, b, m = _tensors()
    x = x[:, :tokens]
    assert effective_weight_pays(2 * tokens, 10, 12) == (tokens == 5)
    weight = w.t().contiguous() if transposed else w
    layout = "kd" if transposed else "dk"
    with torch.no_grad():
        norm = dora_norm(row_norms_sq(weight, layout), weight, layout, a, b, 0.7)
        got = dora_linear(x, weight, bias, a, b, m, norm, 0.7, 0.0, transposed=transposed)
    torch.testing.assert_close(got, naive_dora(x, w, bias, a, b, m, 0.7), rtol=1e-10, atol=1e-10)
    assert torch.equal(weight, w.t() if transposed else w)  # the base weight is untouched


def test_norm_follows_in_place_changes_of_the_base_weight() -> None:
    """||W0_i||² is cached per weight version: an in-place edit of W0 must be seen."""
    layer = nn.Linear(8, 5)
    adapter = DoraAdapter(lorakit.layer_kinds.LINEAR, layer, 2, 1.0, 0.0, "random", torch.float32)
    before = adapter.norm(layer).clone()
    with torch.no_grad():
        layer.weight.mul_(2.0)
    after = adapter.norm(layer)
    want = torch.linalg.vector_norm(layer.weight + 1.0 * adapter.lora_B @ adapter.lora_A, dim=1)
    torch.testing.assert_close(after, want.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after)


def test_inference_norm_is_kept_until_w0_a_b_or_the_scale_change() -> None:
    """Without autograd n is cached; every in-place change of A, B or W0, and a new scale, must be seen."""
    layer = nn.Linear(8, 5)
    adapter = DoraAdapter(lorakit.layer_kinds.LINEAR, layer, 2, 1.0, 0.0, "random", torch.float32)

    def want() -> torch.Tensor:
        delta = adapter.scale * adapter.lora_B @ adapter.lora_A
        return torch.linalg.vector_norm(layer.weight + delta, dim=1).detach()

    with torch.inference_mode():
        first = adapter.norm(layer)
        assert adapter.norm(layer) is first  # unchanged: the cached tensor
    for change in (lambda: adapter.lora_B.add_(0.5), lambda: adapter.lora_A.mul_(-2.0),
                   lambda: layer.weight.add_(0.25), lambda: setattr(adapter, "scale", 3.0)):
        with torch.no_grad():
            change()
            torch.testing.assert_close(adapter.norm(layer), want(), rtol=1e-5, atol=1e-6)
    assert adapter.norm(layer).requires_grad is False  # with autograd on: computed afresh, and still constant


def test_training_changes_magnitude_and_direction() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    lorakit.attach(net, lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"], use_dora=True))
    adapter = net[0].adapters["default"]
    m0 = adapter.lora_magnitude_vector.detach().clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    losses = []
    for _ in range(20):
        loss = (net(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.allclose(adapter.lora_magnitude_vector, m0)
    assert adapter.lora_B.abs().max().item() > 0
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names == {"0.adapters.default.lora_A", "0.adapters.default.lora_B",
                     "0.adapters.default.lora_magnitude_vector"}
