"""PiSSA and OLoRA: factors from W0, the residual left in the base, and the two ways to save them.

The factor tests check the math against the SVD / QR definitions. The model tests use tiny Llama (Linear)
and GPT-2 (Conv1D) models: the output is unchanged by the attach; after a few training steps a converted file
loaded by the real `peft` onto the ORIGINAL base reproduces lorakit's logits; an unconverted file is refused on
the original base and accepted on the residual one; PEFT's own PiSSA / OLoRA init gives the same A, B.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from conftest import max_abs_diff, tiny_gpt2, tiny_llama, token_ids
from lorakit.io.residual import FINGERPRINT_KEY, RESIDUAL_KEY
from lorakit.layers import LoraLayer
from lorakit.ops.residual_init import exact_svd, olora_factors, pissa_factors, randomized_svd

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


# -- the factors -------------------------------------------------------------------------------------------
def _decaying(d: int, k: int, decay: float = 0.6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W = U diag(S) Vᵀ with S_i = decay^i, and S."""
    gen = torch.Generator().manual_seed(seed)
    m = min(d, k)
    u = torch.linalg.qr(torch.randn(d, m, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(k, m, generator=gen)).Q
    s = decay ** torch.arange(m, dtype=torch.float32)
    return u @ torch.diag(s) @ v.t(), s


def test_exact_pissa_is_the_truncated_svd() -> None:
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    scale = 2.5
    lora_A, lora_B = pissa_factors(weight, 5, scale)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    top = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    assert lora_A.shape == (5, 16) and lora_B.shape == (24, 5)
    assert max_abs_diff(scale * lora_B @ lora_A, top) < 1e-5
    # A's rows and B's columns share the energy: ||B_i|| = ||A_i|| = sqrt(S_i / s)
    assert torch.allclose(lora_B.norm(dim=0), (s[:5] / scale).sqrt(), atol=1e-5)
    assert torch.allclose(lora_A.norm(dim=1), (s[:5] / scale).sqrt(), atol=1e-5)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_randomized_pissa_close_to_exact_for_a_decaying_spectrum(shape: tuple[int, int]) -> None:
    weight, s = _decaying(*shape)
    lora_A, lora_B = pissa_factors(weight, 6, 1.5, niter=2, generator=torch.Generator().manual_seed(1))
    lora_A0, lora_B0 = pissa_factors(weight, 6, 1.5)
    top = 1.5 * lora_B0 @ lora_A0
    assert (1.5 * lora_B @ lora_A - top).norm() / top.norm() < 1e-4
    _, s_fast, _ = randomized_svd(weight, 6, niter=2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(s_fast, s[:6], rtol=1e-4)


def test_randomized_svd_without_power_iterations_is_worse_on_a_flat_spectrum() -> None:
    weight, _ = _decaying(80, 80, decay=0.97)
    exact = exact_svd(weight, 4)[1]
    err = {n: (randomized_svd(weight, 4, n, oversample=2, generator=torch.Generator().manual_seed(0))[1] - exact)
           .abs().max().item() for n in (0, 6)}
    assert err[6] < err[0]


def test_olora_factors_come_from_the_qr() -> None:
    weight = torch.randn(20, 12, generator=torch.Generator().manual_seed(5))
    lora_A, lora_B = olora_factors(weight, 4)
    assert torch.allclose(lora_B.t() @ lora_B, torch.eye(4), atol=1e-5)  # B = Q_r: orthonormal columns
    assert torch.equal(lora_A, lora_A.triu())  # A = R_r: upper triangular
    # R upper triangular => the first r columns of W are Q_r R_r's: B A reproduces them exactly
    assert max_abs_diff((lora_B @ lora_A)[:, :4], weight[:, :4]) < 1e-5


def test_factor_rank_above_min_dim_is_refused() -> None:
    with pytest.raises(ValueError, match=r"r=9"):
        pissa_factors(torch.randn(8, 20), 9, 1.0)


# -- attach ------------------------------------------------------------------------------------------------
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _weights_dk(layer: LoraLayer) -> torch.Tensor:
    return layer.kind.to_weight_layout(layer.base_layer.weight.detach()).float()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_attach_keeps_the_output_and_leaves_the_residual(kind: str, init: str) -> None:
    ids = token_ids()
    original = BUILDERS[kind]()
    model = BUILDERS[kind]()
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[kind], init=init)
    lorakit.attach(model, cfg)
    assert max_abs_diff(_logits(model, ids), _logits(original, ids)) <= 1e-5
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        adapter = layer.adapters["default"]
        w0 = original.get_submodule(layer.path).weight.detach()
        w0 = w0.t() if kind == "gpt2" else w0  # (d, k)
        assert max_abs_diff(_weights_dk(layer), w0 - adapter.scale * adapter.lora_B @ adapter.lora_A) < 1e-6
        assert adapter.lora_B.abs().max() > 0  # not LoRA's zero start
        assert torch.equal(adapter.initial_A, adapter.lora_A) and torch.equal(adapter.initial_B, adapter.lora_B)
        assert "initial_A" not in adapter.state_dict()  # non-persistent


@pytest.mark.parametrize("target, match", [(["embed_tokens", "q_proj"], "embed_tokens"), (["q_proj"], "r=40")])
def test_unsupported_target_is_refused_before_any_weight_changes(target: list[str], match: str) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.ConfigError, match=match):
        lorakit.attach(model, lorakit.LoraConfig(r=40 if match == "r=40" else 4, target_modules=target, init="pissa"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- training, saving, loading -----------------------------------------------------------------------------
def _train(model: nn.Module, steps: int = 6, seed: int = 0) -> None:
    torch.manual_seed(seed)
    ids = token_ids(batch=4, length=9, seed=seed + 7)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    model.eval()  # no transformers dropout: deterministic steps
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _trained(kind: str, init: str, **kw) -> nn.Module:
    model = BUILDERS[kind]()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[kind], init=init, **kw))
    _train(model)
    return model


def _residual_base(model: nn.Module, kind: str) -> nn.Module:
    """A plain copy of the base model as the adapted model now holds it (the residual weights)."""
    fresh = BUILDERS[kind]()
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}
    fresh.load_state_dict(state, strict=True)
    return fresh


CONVERT_CASES = [
    ("llama", "pissa", {}),
    ("llama", "olora", {}),
    ("gpt2", "pissa", {}),
    ("gpt2", "olora", {}),
    ("llama", "pissa_niter_2", {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 5}}),
    ("llama", "pissa", {"use_dora": True}),
]


@pytest.mark.parametrize("kind, init, kw", CONVERT_CASES, ids=[f"{k}-{i}-{'-'.join(kw)}" for k, i, kw in CONVERT_CASES])
def test_converted_file_loads_in_peft_onto_the_original_base(tmp_path, kind: str, init: str, kw: dict) -> None:
    peft = pytest.importorskip("peft")
    ids = token_ids()
    model = _trained(kind, init, **kw)
    expected = _logits(model, ids)
    assert max_abs_diff(expected, _logits(BUILDERS[kind](), ids)) > 1e-3  # training changed the outputs
    lorakit.save_adapter(model, tmp_path, convert_to_lora=True)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True and written["r"] == 8
    assert written["lora_alpha"] == pytest.approx(8 * (2**0.5 if kw.get("use_rslora") else 2))
    assert written["rank_pattern"] == {k: 2 * v for k, v in kw.get("rank_pattern", {}).items()}
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        assert RESIDUAL_KEY not in (handle.metadata() or {})

    pm = peft.PeftModel.from_pretrained(BUILDERS[kind](), str(tmp_path)).eval()
    assert max_abs_diff(_logits(pm, ids), expected) <= 1e-4
    reloaded = lorakit.load_adapter(BUILDERS[kind](), tmp_path)  # lorakit reads it onto the original base too
    assert max_abs_diff(_logits(reloaded, ids), expected) <= 1e-4


@pytest.mark.parametrize("kind, init", [("llama", "pissa"), ("llama", "olora"), ("gpt2", "olora")])
def test_unconverted_file_needs_the_residual_base(tmp_path, kind: str, init: str) -> None:
    ids = token_ids()
    model = _trained(kind, init)
    expected = _logits(model, ids)
    lorakit.save_adapter(model, tmp_path, convert_to_lora=False)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata[RESIDUAL_KEY] == init and set(json.loads(metadata[FINGERPRINT_KEY])) == {
        m.path for m in model.modules() if isinstance(m, LoraLayer)
    }

    original = BUILDERS[kind]()
    with pytest.raises(lorakit.AdapterFileError, match=r"needs the residual base.*convert_to_lora=True"):
        lorakit.load_adapter(original, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in original.modules())  # nothing attached, nothing changed
    assert max_abs_diff(_logits(original, ids), _logits(BUILDERS[kind](), ids)) == 0.0

    residual = lorakit.load_adapter(_residual_base(model, kind), tmp_path)
    assert max_abs_diff(_logits(residual, ids), expected) <= 1e-5
    # re-saving the loaded adapter keeps the marker; converting it needs the initial factors it does not have
    lorakit.save_adapter(residual, tmp_path / "again", convert_to_lora=False)
    with pytest.raises(lorakit.AdapterFileError, match="needs the residual base"):
        lorakit.load_adapter(BUILDERS[kind](), tmp_path / "again")
    with pytest.raises(lorakit.ConfigError, match="convert_to_lora=True needs the initial"):
        lorakit.save_adapter(residual, tmp_path / "converted", convert_to_lora=True)


def test_unconverted_file_on_another_model_is_refused(tmp_path) -> None:
    model = _trained("llama", "pissa")
    lorakit.save_adapter(model, tmp_path, convert_to_lora=False)
    other = _residual_base(model, "llama")
    with torch.no_grad():
        other.model.layers[1].self_attn.v_proj.weight.mul_(1.05)
    with pytest.raises(lorakit.AdapterFileError, match=r"layers.1.self_attn.v_proj.*differ from the residual base"):
        lorakit.load_adapter(other, tmp_path)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_gives_the_fine_tuned_weights(kind: str) -> None:
    ids = token_ids()
    original = BUILDERS[kind]()
    model = _trained(kind, "pissa")
    expected = _logits(model, ids)
    deltas = {}
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        a = layer.adapters["default"]
        deltas[layer.path] = a.scale * (a.lora_B @ a.lora_A - a.initial_B @ a.initial_A)  # (d, k)
    merged = lorakit.merge_and_unload(model)
    assert max_abs_diff(_logits(merged, ids), expected) <= 1e-5
    for path, delta in deltas.items():  # W0 + s (B A - B0 A0)
        w0, w = original.get_submodule(path).weight.detach(), merged.get_submodule(path).weight.detach()
        if kind == "gpt2":
            w0, w = w0.t(), w.t()
        assert max_abs_diff(w, w0 + delta) < 1e-5


# -- agreement with PEFT's own init ------------------------------------------------------------------------
# PEFT's OLoRA factors GPT-2 Conv1D weights in their stored (in, out) layout, so its A, B come out with the shapes
# of the transposed layer; lorakit factors W0 (out, in) as for Linear. Only the cases PEFT does as the paper are
# compared.
@pytest.mark.parametrize("kind, init", [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "olora")])
def test_factors_and_residual_match_peft(kind: str, init: str) -> None:
    peft = pytest.importorskip("peft")
    ours = BUILDERS[kind]()
    lorakit.attach(ours, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[kind], init=init))
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=init,
                               fan_in_fan_out=kind == "gpt2")
    theirs = peft.get_peft_model(BUILDERS[kind](), peft_cfg)
    layers = [m for m in ours.modules() if isinstance(m, LoraLayer)]
    assert layers
    for layer in layers:
        module = theirs.base_model.model.get_submodule(layer.path)
        a, b = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
        a_peft, b_peft = module.lora_A["default"].weight, module.lora_B["default"].weight
        sign = torch.sign((a * a_peft).sum(dim=1))  # singular vectors are unique up to a sign per pair
        assert max_abs_diff(a, sign[:, None] * a_peft) < 1e-4
        assert max_abs_diff(b, b_peft * sign[None, :]) < 1e-4
        assert max_abs_diff(layer.base_layer.weight, module.base_layer.weight) < 1e-5


def test_file_without_fingerprint_loads_with_a_warning(tmp_path) -> None:
    ids = token_ids()
    model = _trained("llama", "pissa")
    lorakit.save_adapter(model, tmp_path, convert_to_lora=False)
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as another tool writes it
    with pytest.warns(UserWarning, match="cannot be checked"):
        loaded = lorakit.load_adapter(_residual_base(model, "llama"), tmp_path)
    assert max_abs_diff(_logits(loaded, ids), _logits(model, ids)) <= 1e-5


def test_convert_to_lora_leaves_a_plain_adapter_unchanged(tmp_path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="random"))
    lorakit.save_adapter(model, tmp_path / "plain", convert_to_lora=False)
    lorakit.save_adapter(model, tmp_path / "converted", convert_to_lora=True)
    config = "adapter_config.json"
    assert (tmp_path / "plain" / config).read_text() == (tmp_path / "converted" / config).read_text()
    plain, converted = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("plain", "converted"))
    assert plain.keys() == converted.keys() and all(torch.equal(plain[k], converted[k]) for k in plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_the_weights_to_its_precision(dtype: torch.dtype) -> None:
    original = tiny_llama().to(dtype)
    model = tiny_llama().to(dtype)
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS["llama"], init="pissa",
                                             adapter_dtype="base"))
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        adapter = layer.adapters["default"]
        assert adapter.lora_A.dtype == dtype and layer.base_layer.weight.dtype == dtype
        w0 = original.get_submodule(layer.path).weight.float()
        rebuilt = layer.base_layer.weight.float() + adapter.delta_weight(layer.base_layer)
        assert (rebuilt - w0).norm() / w0.norm() < 1e-2
