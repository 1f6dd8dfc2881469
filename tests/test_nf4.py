"""NF4 storage (QLoRA): bit-compatibility with bitsandbytes both ways, NF4Linear's math and memory, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.quant import (
    DYNAMIC_CODE,
    NF4_CODEBOOK,
    NF4Linear,
    NF4State,
    dequantize_nf4,
    quantize,
    quantize_nf4,
)
from lorakit.quant.nf4 import unpack_nibbles

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (out, in): in a multiple of 64; in not a multiple of 64 (blocks run across rows); > 256 blocks (several
# second-level blocks, the last one short); an odd element count (a short last block and a padding nibble)
SHAPES = ((96, 128), (64, 100), (1000, 67), (7, 13))


def _bnb():
    return pytest.importorskip("bitsandbytes", minversion="0.50.2")  # 0.50's CPU 8-bit quantiser (a 65536 LUT)


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _bnb_state(state: NF4State, dtype: torch.dtype):
    """A bitsandbytes QuantState built from lorakit's tensors (flat shape: see test_bnb_cpu_dequant_note)."""
    from bitsandbytes.functional import QuantState

    nested = QuantState(absmax=state.absmax_scale, code=DYNAMIC_CODE.clone(), blocksize=256, dtype=torch.float32)
    return QuantState(absmax=state.absmax, shape=torch.Size([state.shape.numel()]), code=NF4_CODEBOOK.clone(),
                      blocksize=state.blocksize, quant_type="nf4", dtype=dtype, offset=state.absmax_offset,
                      state2=nested)


def test_codebooks_equal_bitsandbytes():
    F = _bnb().functional
    assert torch.equal(NF4_CODEBOOK, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, F.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_bytes_equal_bitsandbytes(shape, dtype):
    F = _bnb().functional
    w = _weight(shape, dtype)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    state = quantize_nf4(w)
    assert torch.equal(state.packed, packed.reshape(-1))
    assert torch.equal(state.absmax, qs.absmax)
    assert torch.equal(state.absmax_scale, qs.state2.absmax)
    assert torch.equal(state.absmax_offset, qs.offset)


@pytest.mark.parametrize("shape", SHAPES[:3])  # an odd count sends bitsandbytes to torch.compile: slow, skipped
def test_dequantize_equal_both_ways(shape):
    F = _bnb().functional
    w = _weight(shape, torch.float32, seed=1)
    ours = quantize_nf4(w)
    packed, theirs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    from_bnb = NF4State(packed.reshape(-1), theirs.absmax, theirs.state2.absmax, theirs.offset, w.shape)
    for dtype in DTYPES:
        # lorakit quantises, bitsandbytes dequantises
        assert torch.equal(F.dequantize_4bit(ours.packed, _bnb_state(ours, dtype)).view(shape),
                           dequantize_nf4(ours, dtype))
        # bitsandbytes quantises, lorakit dequantises
        theirs.dtype, theirs.shape = dtype, torch.Size([w.numel()])
        assert torch.equal(dequantize_nf4(from_bnb, dtype), F.dequantize_4bit(packed, theirs).view(shape))


def test_bnb_cpu_dequant_note():
    """bitsandbytes 0.50.2's native CPU dequantize_4bit takes blocks per row when given a 2-D shape, but its
    quantize_4bit (and CUDA) block the flattened tensor: for in_features % 64 != 0 its own round trip is wrong
    on the CPU. With the flat shape it agrees with lorakit, and lorakit's round trip is right either way."""
    F = _bnb().functional
    w = _weight((64, 96), torch.float32)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = dequantize_nf4(quantize_nf4(w, double_quant=False))
    assert (ours - w).abs().max() <= 0.5 * w.abs().max()
    qs.shape = torch.Size([w.numel()])
    assert torch.equal(F.dequantize_4bit(packed, qs).view(w.shape), ours)


def test_gaussian_error_equals_bitsandbytes():
    F = _bnb().functional
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    qs.shape = torch.Size([w.numel()])
    mae_bnb = (F.dequantize_4bit(packed, qs).view(w.shape) - w).abs().mean()
    mae = (dequantize_nf4(quantize_nf4(w)) - w).abs().mean()
    assert mae == mae_bnb


def test_gaussian_error_pure():
    """N(0, 1) in blocks of 64: mean absolute error about 0.073 (0.0730 without double quantisation)."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    mae_dq = (dequantize_nf4(quantize_nf4(w)) - w).abs().mean().item()
    mae = (dequantize_nf4(quantize_nf4(w, double_quant=False)) - w).abs().mean().item()
    assert 0.065 < mae < 0.08 and 0 <= mae_dq - mae < 0.002


def test_packing_layout():
    """High nibble first; an odd count pads the low nibble with code 7 (0.0); values on the grid stay exact."""
    w = torch.tensor([-1.0, 1.0, 0.0, NF4_CODEBOOK[8].item(), 0.5 * (NF4_CODEBOOK[7] + NF4_CODEBOOK[8]).item()])
    state = quantize_nf4(w, double_quant=False)
    assert state.packed.tolist() == [0x0F, 0x78, 0x77]  # a midpoint takes the lower code
    assert unpack_nibbles(state.packed, 5).tolist() == [0, 15, 7, 8, 7]
    assert torch.equal(dequantize_nf4(state)[:4], w[:4])


@pytest.mark.parametrize("compute_dtype", (torch.float32, torch.bfloat16))
def test_nf4linear_forward_backward(compute_dtype):
    torch.manual_seed(0)
    dense = nn.Linear(128, 48)
    layer = NF4Linear.from_linear(dense, compute_dtype)
    w = dequantize_nf4(layer.state, compute_dtype)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    ref = nn.functional.linear(x_ref.to(compute_dtype), w, layer.bias).to(x.dtype)
    assert y.dtype == x.dtype and torch.equal(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    assert all(n < w.numel() for n in saved)  # nothing full-size kept for backward
    assert all(p.grad is None for p in layer.parameters()) and not any(b.requires_grad for b in layer.buffers())


def test_nf4linear_bias_gradient_when_enabled():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 8), torch.float32)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 64)
    layer(x).sum().backward()
    assert torch.allclose(layer.bias.grad, torch.full((8,), 4.0))


def test_quantize_model_memory_and_logits():
    model = tiny_llama(hidden=128)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    out = lorakit.quantize(model, "nf4", compute_dtype=torch.float32)
    assert out is model and isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, NF4Linear)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 2 * 7 and not any(type(m) is nn.Linear for m in model.model.layers.modules())
    held = sum(t.numel() * t.element_size() for m in layers for t in [*m.buffers(), *m.parameters()])
    params = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in layers)
    assert held / params <= 0.52
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).norm() / before.norm() < 0.2  # 4-bit weights: close, not equal


def test_memory_with_bias():
    layer = NF4Linear.from_linear(nn.Linear(1024, 256), torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in [*layer.buffers(), *layer.parameters()])
    assert held / (1024 * 256 + 256) <= 0.52


def test_model_to_dtype_keeps_statistics_fp32():
    layer = NF4Linear.from_linear(nn.Linear(512, 64), torch.bfloat16)
    before = layer.dequantize(torch.float32)
    wrapper = nn.Sequential(layer).to(torch.float16)
    assert layer.absmax_scale.dtype == torch.float32 and layer.absmax_offset.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and torch.equal(layer.dequantize(torch.float32), before)
    assert wrapper(torch.randn(2, 512, dtype=torch.float16)).dtype == torch.float16


def test_weight_property_and_skip():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    quantize(model, skip=("2",))
    assert isinstance(model[0], NF4Linear) and type(model[2]) is nn.Linear
    assert model[0].weight.shape == (64, 64) and model[0].weight.dtype == torch.bfloat16


def test_pure_pytorch_without_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch, lorakit\n"
        "from torch import nn\n"
        "m = lorakit.quantize(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)), compute_dtype=torch.float32)\n"
        "x = torch.randn(3, 64, requires_grad=True); m(x).sum().backward()\n"
        "assert x.grad is not None and 'bitsandbytes' not in [k for k, v in sys.modules.items() if v]\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_bad_inputs(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(lorakit.ConfigError, match="unknown format 'int4'"):
        quantize(model, "int4")
    with pytest.raises(lorakit.ConfigError, match="compute_dtype must be one of"):
        quantize(model, compute_dtype=torch.float64)
    with pytest.raises(lorakit.ConfigError, match="blocksize: expected one of"):
        quantize_nf4(torch.randn(64, 64), blocksize=48)
    with pytest.raises(lorakit.ConfigError, match="found torch.int64"):
        quantize_nf4(torch.ones(64, 64, dtype=torch.long))
    with pytest.raises(lorakit.TargetError, match="bare nn.Linear"):
        quantize(nn.Linear(64, 64))
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    lorakit.merge(model)  # quantising under attached adapters works (tests/test_qpissa.py), not under merged ones
    with pytest.raises(lorakit.TargetError, match="merged adapters"):
        quantize(model)

    real_linear = nn.functional.linear

    def no_fp16(x, w, b=None):
        if x.dtype == torch.float16:
            raise RuntimeError('"addmm" not implemented for \'Half\'')
        return real_linear(x, w, b)

    monkeypatch.setattr(nn.functional, "linear", no_fp16)  # a device without float16 matmul
    fresh = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(lorakit.ConfigError, match="float16 cannot be used on device cpu"):
        quantize(fresh, compute_dtype=torch.float16)
    assert type(fresh[0]) is nn.Linear  # nothing replaced
