"""LoftQ initialisation (ops.loftq, lorakit.loftq; `LoraConfig(init="loftq")`): the alternation's error, agreement with
PEFT's algorithm, what attach leaves in the base, exact NF4 storage afterwards, refusals, and files both ways with
the real peft on Llama, GPT-2 and BERT (base + adapter, logits to 1e-5)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import lorakit
from conftest import max_abs_diff, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer
from lorakit.loftq import nf4_round_trip
from lorakit.ops.loftq import approximation_error, loftq_factors, low_rank_factors

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes", minversion="0.50.2")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ATOL = 1e-5


def _weight(d: int = 96, k: int = 128, seed: int = 0) -> torch.Tensor:
    """A weight with a heavy-ish tail and some low-rank structure, as trained weights have."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, k, generator=g) * 0.02 + torch.randn(d, 4, generator=g) @ torch.randn(4, k, generator=g) * 0.01


def peft_loftq_cpu(weight: torch.Tensor, r: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's `loftq_init` (peft.utils.loftq_utils, 4 bits) step for step, with bitsandbytes' CPU quantiser in place of
    the CUDA one PEFT hard-codes, on the flat tensor (bitsandbytes' CPU dequantiser blocks 2-D shapes per row), and
    PEFT's own `_low_rank_decomposition`. Returns (Q, lora_A, lora_B) as PEFT sets them."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = weight.float()
    res = weight.clone()
    for i in range(iters):
        packed, state = bnb.functional.quantize_4bit(res.reshape(-1), blocksize=64, compress_statistics=False,
                                                     quant_type="nf4")
        dequantized = bnb.functional.dequantize_4bit(packed, state).view(weight.shape)
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=r)
        if i + 1 == iters:
            break
        res = weight - out["L"] @ out["R"]
    return dequantized, out["R"], out["L"]


# -- the math ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_error_decreases_with_iterations_and_beats_plain_nf4(scale: float) -> None:
    w = _weight()
    plain = float(torch.linalg.matrix_norm(w - nf4_round_trip(w)))
    errors = []
    for iters in (1, 2, 3, 5):
        q, a, b = loftq_factors(w, 8, scale, iters, nf4_round_trip)
        assert torch.equal(nf4_round_trip(q), q)  # Q is on the NF4 grid
        errors.append(approximation_error(w, q, a, b, scale))
    assert errors[0] < 0.9 * plain
    assert all(later <= earlier * (1 + 1e-4) for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_low_rank_factors_are_the_truncated_svd_over_s() -> None:
    m = _weight(40, 30, seed=2)
    a, b = low_rank_factors(m, 5, 2.5)
    u, s, vh = torch.linalg.svd(m)
    assert a.shape == (5, 30) and b.shape == (40, 5)
    assert max_abs_diff(2.5 * b @ a, u[:, :5] @ torch.diag(s[:5]) @ vh[:5]) < 1e-6


@pytest.mark.parametrize("iters", [1, 3])
def test_same_q_and_update_as_peft_at_scale_one(iters: int) -> None:
    w = _weight(seed=4)
    q, a, b = loftq_factors(w, 8, 1.0, iters, nf4_round_trip)
    q_peft, a_peft, b_peft = peft_loftq_cpu(w, 8, iters)
    assert (q != q_peft).float().mean() < 1e-3  # the same NF4 grid points (a value on a midpoint may differ)
    assert max_abs_diff(b @ a, b_peft @ a_peft) < 1e-4 * (1 + float((b_peft @ a_peft).abs().max()))


def test_config_defaults_refusals_and_peft_file_fields() -> None:
    cfg = lorakit.LoraConfig(r=4, init="loftq")
    assert cfg.loftq_config == {"loftq_bits": 4, "loftq_iter": 1} and cfg.init_from_weights
    assert lorakit.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 3}).loftq_config["loftq_iter"] == 3
    assert lorakit.LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}  # ignored unless init="loftq" (PEFT)
    for bad, match in [({"loftq_bits": 8}, "loftq_bits'] must be 4"), ({"loftq_iter": 0}, "loftq_iter'] must be"),
                       ({"loftq_iters": 2}, "unknown key 'loftq_iters'"), ([4], "must be a mapping")]:
        with pytest.raises(ConfigError, match=match):
            lorakit.LoraConfig(init="loftq", loftq_config=bad)
    peft_dict = cfg.to_peft_dict()  # PEFT must not run LoftQ again when it loads the file (its own advice)
    assert peft_dict["init_lora_weights"] is True and peft_dict.get("loftq_config", {}) == {}


# -- attach ---------------------------------------------------------------------------------------------------------
def test_attach_leaves_q_in_the_base_and_q_plus_sba_closer_to_w_than_nf4() -> None:
    model = tiny_llama()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="loftq",
                                             loftq_config={"loftq_iter": 2}))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14
    for layer in layers:
        w = original[f"{layer.path}.weight"]
        adapter = layer.adapters["default"]
        q = layer.base_layer.weight.detach()
        assert torch.equal(nf4_round_trip(q), q)
        loftq = approximation_error(w, q, adapter.lora_A, adapter.lora_B, adapter.scale)
        assert loftq < 0.95 * float(torch.linalg.matrix_norm(w - nf4_round_trip(w))), layer.path
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_gpt2_conv1d_is_blocked_in_its_stored_layout() -> None:
    model = tiny_gpt2()
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (k, d)
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["c_attn"], init="loftq"))
    layer = model.transformer.h[0].attn.c_attn
    q = layer.base_layer.weight.detach()
    assert torch.equal(nf4_round_trip(q), q)
    adapter = layer.adapters["default"]
    assert approximation_error(w.t(), q.t(), adapter.lora_A, adapter.lora_B, adapter.scale) < float(
        torch.linalg.matrix_norm(w - nf4_round_trip(w)))


def test_quantize_afterwards_stores_q_exactly() -> None:
    model = tiny_llama()
    ids = token_ids()
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init="loftq"))
    with torch.no_grad():
        want = model(ids).logits
    weights = {m.path: m.base_layer.weight.detach().clone() for m in model.modules() if isinstance(m, LoraLayer)}
    lorakit.quantize(model, compute_dtype=torch.float32, double_quant=False)  # lm_head (not adapted) skipped
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        assert isinstance(layer.base_layer, lorakit.NF4Linear)
        assert torch.equal(layer.base_layer.dequantize(torch.float32), weights[layer.path])
    with torch.no_grad():
        assert max_abs_diff(model(ids).logits, want) < ATOL


def test_quantised_target_and_rank_too_large_are_refused_before_any_change() -> None:
    model = lorakit.quantize(tiny_llama(), compute_dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"init='loftq' on a quantised layer"):
        lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init="loftq"))
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=r"init='loftq' needs r <= min\(out, in\) = 16"):
        lorakit.attach(model, lorakit.LoraConfig(r=20, target_modules=["q_proj", "k_proj"], init="loftq"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- files both ways with the real peft ---------------------------------------------------------------------------
CASES = {
    "llama": (tiny_llama, transformers.AutoModelForCausalLM, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, transformers.AutoModelForCausalLM, ["c_attn", "c_proj"]),
    "bert": (tiny_bert, transformers.AutoModelForSequenceClassification, ["query", "value"]),
}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_loftq_base_and_adapter_load_in_peft(case: str, tmp_path: Path) -> None:
    build, auto, targets = CASES[case]
    ids = token_ids()
    model = lorakit.attach(build(), lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, init="loftq",
                                                       loftq_config={"loftq_iter": 2}))
    want = _logits(model, ids)
    lorakit.save_adapter(model, tmp_path / "adapter")
    base = copy.deepcopy(model)
    lorakit.delete_adapter(base, "default")  # the plain model: its weights are LoftQ's Q
    base.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # PeftModel.from_pretrained must not run LoftQ again
    pm = peft.PeftModel.from_pretrained(auto.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    assert max_abs_diff(_logits(pm, ids), want) < ATOL


@pytest.mark.parametrize("init_in_file", ["loftq", True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loftq_base_and_adapter_load_in_lorakit(case: str, init_in_file, tmp_path: Path) -> None:
    """PEFT's LoftQ layout: the base saved with its Q weights (`unload()`), the adapter with init_lora_weights "loftq"
    as PEFT writes it after a LoftQ init, or True as PEFT's LoftQ example rewrites it before saving."""
    build, auto, targets = CASES[case]
    ids = token_ids()
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    with torch.no_grad():
        for module in pm.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                base = module.get_base_layer()
                transposed = module.fan_in_fan_out  # GPT-2's Conv1D: PEFT's own loftq_init mis-shapes A, B there
                w = base.weight.t() if transposed else base.weight
                q, lora_A, lora_B = peft_loftq_cpu(w, 4, 2)
                module.lora_A["default"].weight.copy_(lora_A)
                module.lora_B["default"].weight.copy_(lora_B)
                base.weight.copy_(q.t() if transposed else q)
    pm.eval()
    want = _logits(pm, ids)
    pm.peft_config["default"].init_lora_weights = init_in_file
    pm.peft_config["default"].loftq_config = {"loftq_bits": 4, "loftq_iter": 2}
    pm.save_pretrained(tmp_path / "adapter")
    pm.unload().save_pretrained(tmp_path / "base")
    model = lorakit.load_adapter(auto.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert lorakit.get_config(model).init == ("loftq" if init_in_file == "loftq" else "kaiming")
    assert max_abs_diff(_logits(model, ids), want) < ATOL


def test_a_loftq_run_saved_with_its_base_loads_in_peft_and_lorakit(tmp_path: Path) -> None:
    """What `lorakit train --init loftq` saves: lorakit.io.delta_lora.save_delta_lora(with_base=True) writes base/
    (Q, the weights the adapter needs), adapter/ and model/ (Q + s B A merged)."""
    from lorakit.io.delta_lora import save_delta_lora

    ids = token_ids()
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="loftq"))
    want = _logits(model, ids)
    save_delta_lora(model, tmp_path, with_base=True)
    auto = transformers.AutoModelForCausalLM
    pm = peft.PeftModel.from_pretrained(auto.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    assert max_abs_diff(_logits(pm, ids), want) < ATOL
    again = lorakit.load_adapter(auto.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert max_abs_diff(_logits(again, ids), want) < ATOL
    assert max_abs_diff(_logits(auto.from_pretrained(tmp_path / "model"), ids), want) < ATOL


def test_dora_starts_at_q_plus_sba_and_other_file_types_are_refused() -> None:
    ids = token_ids()
    cfg = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "init": "loftq"}
    lora = lorakit.attach(tiny_llama(), lorakit.LoraConfig(**cfg))
    dora = lorakit.attach(tiny_llama(), lorakit.LoraConfig(method="dora", **cfg))
    assert max_abs_diff(_logits(dora, ids), _logits(lora, ids)) < ATOL  # the magnitude is ||Q + s B A||: c = 1
    from test_contract import VARIANT_CONFIGS  # each registered method's minimal config

    for method in (m for m, cls in lorakit.variants.VARIANTS.items() if cls.peft_type != "LORA"):
        with pytest.raises(ConfigError, match=f"init='loftq'.*method '{method}'"):
            lorakit.LoraConfig(**VARIANT_CONFIGS[method], init="loftq")
