"""The contract every (layer kind x variant) pair must keep.

The parametrization is built from the registries `lorakit.layer_kinds.LAYER_KINDS` and
`lorakit.variants.VARIANTS`, so a newly registered layer type or variant is covered automatically (and
fails loudly here until it has a layer factory / config below).

Each layer sits alone in a tiny container `Net` as attribute `layer`; the adapter targets "layer".
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from conftest import max_abs_diff
from lorakit.layer_kinds import LAYER_KINDS, HFConv1D
from lorakit.layers import LoraLayer
from lorakit.variants import VARIANTS, variant_for


@dataclass(frozen=True)
class LayerCase:
    make: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]
    float_input: bool = True  # False: integer ids (embeddings)


def _ids(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 20, (3, 5), generator=gen)


# One factory per registered module type. Adding a type to LAYER_KINDS without a factory here fails
# `test_every_registered_layer_type_has_a_factory` (and the contract tests for that type).
LAYER_CASES: dict[type, LayerCase] = {
    nn.Linear: LayerCase(lambda: nn.Linear(16, 12), lambda g: torch.randn(2, 3, 16, generator=g)),
    nn.Embedding: LayerCase(lambda: nn.Embedding(20, 12), _ids, float_input=False),
    nn.Conv1d: LayerCase(lambda: nn.Conv1d(4, 6, 3, padding=1), lambda g: torch.randn(2, 4, 10, generator=g)),
    nn.Conv2d: LayerCase(
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda g: torch.randn(2, 4, 7, 7, generator=g)
    ),
    nn.Conv3d: LayerCase(lambda: nn.Conv3d(3, 5, 2, padding=1), lambda g: torch.randn(2, 3, 4, 4, 4, generator=g)),
}
if HFConv1D is not None:
    LAYER_CASES[HFConv1D] = LayerCase(lambda: HFConv1D(12, 16), lambda g: torch.randn(2, 3, 16, generator=g))

# The LoraConfig fields that select each variant. Adding a variant to VARIANTS without an entry here fails
# `test_every_variant_has_a_config`.
VARIANT_CONFIGS: dict[str, dict] = {"lora": {}, "dora": {"use_dora": True}}
VARIANT_CONFIGS["delta_lora"] = {"method": "delta_lora"}
VARIANT_CONFIGS["vera"] = {"method": "vera"}
VARIANT_CONFIGS["adalora"] = {"method": "adalora", "options": {"total_step": 10}}

# Quantised bases (NF4Linear, bitsandbytes Linear4bit) keep another contract: merging into them is lossy by
# design (refused, or re-quantised on request; merge_and_unload gives nn.Linear). tests/test_qlora.py covers them.
LAYER_TYPES = [cls for cls, kind in LAYER_KINDS.items() if not kind.quantized]
VARIANT_NAMES = list(VARIANTS)


def _type_id(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def supports(variant: str, cls: type) -> bool:
    """Whether the variant declares the layer kind of `cls` (its `kinds`; None: every kind)."""
    kinds = VARIANTS[variant].kinds
    return kinds is None or LAYER_KINDS[cls].name in kinds


CASES = [
    pytest.param(cls, variant, id=f"{_type_id(cls)}-{variant}")
    for cls in LAYER_TYPES for variant in VARIANT_NAMES if supports(variant, cls)
]
UNSUPPORTED = [(cls, variant) for cls in LAYER_TYPES for variant in VARIANT_NAMES if not supports(variant, cls)]
LOW_RANK = [case for case in CASES if VARIANTS[case.values[1]].abilities.low_rank]


class Net(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _case(cls: type) -> LayerCase:
    if cls not in LAYER_CASES:
        pytest.fail(f"{cls.__name__} is registered in LAYER_KINDS but tests/test_contract.py has no factory for it")
    return LAYER_CASES[cls]


def _config(variant: str, **kw) -> lorakit.LoraConfig:
    if variant not in VARIANT_CONFIGS:
        pytest.fail(f"variant {variant!r} is registered in VARIANTS but tests/test_contract.py has no config for it")
    fields = dict(r=3, alpha=5.0, target_modules=["layer"])
    fields.update(VARIANT_CONFIGS[variant])
    fields.update(kw)
    config = lorakit.LoraConfig(**fields)
    assert variant_for(config) is VARIANTS[variant], "the config does not select the variant under test"
    return config


def build(cls: type, seed: int = 0) -> tuple[Net, torch.Tensor]:
    case = _case(cls)
    torch.manual_seed(seed)
    net = Net(case.make()).eval()
    assert type(net.layer) is cls
    x = case.make_input(torch.Generator().manual_seed(seed + 1))
    return net, x


def attach(net: Net, variant: str, name: str = "default", **kw) -> Net:
    lorakit.attach(net, _config(variant, **kw), name=name)
    assert isinstance(net.layer, LoraLayer)
    assert isinstance(net.layer.adapters[name], VARIANTS[variant])
    return net


def forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


def assert_changes(out: torch.Tensor, base: torch.Tensor) -> None:
    assert max_abs_diff(out, base) > 1e-4, "the random adapter does not change the output: the test is vacuous"


# ---------------------------------------------------------------------------------------------------------
# registry coverage
# ---------------------------------------------------------------------------------------------------------
def test_every_registered_layer_type_has_a_factory() -> None:
    missing = [cls.__name__ for cls, kind in LAYER_KINDS.items() if cls not in LAYER_CASES and not kind.quantized]
    assert not missing, f"add LAYER_CASES entries for {missing}"
    expected = {nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d}
    assert expected <= set(LAYER_KINDS)
    if HFConv1D is not None:
        assert HFConv1D in LAYER_KINDS


def test_an_undeclared_layer_kind_is_refused_by_name() -> None:
    for cls, variant in UNSUPPORTED:
        net, _ = build(cls)
        with pytest.raises(lorakit.TargetError, match=f"module 'layer' .*cannot take a {variant} adapter"):
            lorakit.attach(net, _config(variant))
        assert type(net.layer) is cls  # refused before the model changed


@pytest.mark.parametrize(("cls", "variant"), LOW_RANK)
def test_a_low_rank_variant_is_s_b_a_of_its_factors(cls: type, variant: str) -> None:
    """abilities.low_rank is what combine, mixed batches and vLLM rely on: delta_weight == s B A (weight layout)."""
    net, _ = build(cls)
    attach(net, variant, init="random")
    adapter = net.layer.adapters["default"]
    a, b = adapter.lora_A.detach().float(), adapter.lora_B.detach().float()
    expected = adapter.scale * (b.flatten(1) @ a.flatten(1))
    expected = net.layer.kind.to_weight_layout(expected.view(b.shape[0], *a.shape[1:]))
    torch.testing.assert_close(adapter.delta_weight(net.layer.base_layer), expected, atol=1e-6, rtol=1e-5)


def test_every_registered_variant_declares_the_protocol() -> None:
    from lorakit.variants.protocol import Abilities

    for name, variant in VARIANTS.items():
        assert variant.name == name and isinstance(variant.abilities, Abilities)
        assert variant.peft_type.isupper() and variant.file_keys
        assert all(hasattr(variant, hook) for hook in ("build", "prepare", "training_hook", "peft_config",
                                                         "config_from_peft", "shared_file_tensors"))


def test_every_variant_has_a_config() -> None:
    assert "lora" in VARIANTS
    missing = [name for name in VARIANTS if name not in VARIANT_CONFIGS]
    assert not missing, f"add VARIANT_CONFIGS entries for {missing}"


# ---------------------------------------------------------------------------------------------------------
# the contract
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "variant"), CASES)
def test_zero_init_leaves_output_unchanged(cls: type, variant: str) -> None:
    net, x = build(cls)
    base = forward(net, x)
    attach(net, variant, init="kaiming", dropout=0.25)
    assert torch.equal(forward(net, x), base)
    net.train()  # dropout on the adapter input must not matter either while the delta is zero
    assert torch.equal(forward(net, x), base)


@pytest.mark.parametrize("init", ["kaiming", "random"])
@pytest.mark.parametrize(("cls", "variant"), CASES)
def test_gradients_reach_exactly_the_adapter(cls: type, variant: str, init: str) -> None:
    net, x = build(cls)
    attach(net, variant, init=init)
    net.train()
    net(x).square().sum().backward()
    adapter_params = {id(p) for p in net.layer.adapters.parameters()}
    assert adapter_params
    for pname, p in net.named_parameters():
        if id(p) in adapter_params:
            assert p.requires_grad, pname
            assert p.grad is not None, f"no gradient reached adapter parameter {pname}"
            assert torch.isfinite(p.grad).all(), pname
        else:
            assert not p.requires_grad, f"base parameter {pname} is trainable"
            assert p.grad is None, f"base parameter {pname} received a gradient"
    grads = [p.grad for p in net.layer.adapters.parameters()]
    assert any(g.abs().sum() > 0 for g in grads), "every adapter gradient is zero: the adapter cannot learn"
    if init == "random":  # A and B both non-zero: both gradients are non-zero
        assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(("cls", "variant"), CASES)
def test_merge_matches_unmerged_and_unmerge_restores(cls: type, variant: str) -> None:
    net, x = build(cls)
    base = forward(net, x)
    w0 = net.layer.weight.detach().clone()
    attach(net, variant, init="random", dropout=0.3)  # eval mode: no dropout, so merging is exact
    want = forward(net, x)
    assert_changes(want, base)
    assert torch.equal(forward(net, x), want)

    lorakit.merge(net)
    assert net.layer.merged == ["default"]
    assert max_abs_diff(net.layer.base_layer.weight, w0) > 0, "merge did not change the base weight"
    assert max_abs_diff(forward(net, x), want) <= 1e-5

    lorakit.unmerge(net)
    assert net.layer.merged == []
    assert max_abs_diff(net.layer.base_layer.weight, w0) <= 1e-6
    assert max_abs_diff(forward(net, x), want) <= 1e-5


@pytest.mark.parametrize(("cls", "variant"), CASES)
def test_save_load_round_trip(cls: type, variant: str, tmp_path: Path) -> None:
    net, x = build(cls)
    fresh = copy.deepcopy(net)
    attach(net, variant, init="random")
    want = forward(net, x)
    assert_changes(want, forward(fresh, x))

    lorakit.save_adapter(net, tmp_path)
    lorakit.load_adapter(fresh, tmp_path)
    assert isinstance(fresh.layer, LoraLayer)
    assert torch.equal(forward(fresh, x), want)


@pytest.mark.parametrize(("cls", "variant"), CASES)
def test_two_active_adapters_sum(cls: type, variant: str) -> None:
    net, x = build(cls)
    base = forward(net, x)
    torch.manual_seed(1)
    attach(net, variant, name="a", init="random")
    torch.manual_seed(2)
    attach(net, variant, name="b", init="random", r=2, alpha=7.0)
    lorakit.set_active(net, ["a"])
    out_a = forward(net, x)
    lorakit.set_active(net, ["b"])
    out_b = forward(net, x)
    lorakit.set_active(net, ["a", "b"])
    out_ab = forward(net, x)
    assert_changes(out_a, base)
    assert_changes(out_b, base)
    assert max_abs_diff(out_ab - base, (out_a - base) + (out_b - base)) <= 1e-5


@pytest.mark.parametrize(("cls", "variant"), CASES)
def test_disabled_gives_the_base_output(cls: type, variant: str) -> None:
    net, x = build(cls)
    base = forward(net, x)
    attach(net, variant, init="random")
    with_adapter = forward(net, x)
    assert_changes(with_adapter, base)
    with lorakit.disabled(net):
        assert torch.equal(forward(net, x), base)
    assert torch.equal(forward(net, x), with_adapter)
    w0 = net.layer.base_layer.weight.detach().clone()
    lorakit.merge(net)  # merged adapters are taken out inside the block, and put back after it
    with lorakit.disabled(net):
        assert max_abs_diff(forward(net, x), base) <= 1e-5
        assert max_abs_diff(net.layer.base_layer.weight, w0) <= 1e-6
    assert net.layer.merged == ["default"]
    assert max_abs_diff(net.layer.base_layer.weight, w0) > 0
    assert max_abs_diff(forward(net, x), with_adapter) <= 1e-5


@pytest.mark.parametrize(("cls", "variant"), CASES)
def test_delete_last_adapter_restores_the_module(cls: type, variant: str) -> None:
    net, x = build(cls)
    original = net.layer
    base = forward(net, x)
    w0 = original.weight.detach().clone()
    attach(net, variant, name="a", init="random")
    attach(net, variant, name="b", init="random")
    out_b = forward(net, x)
    lorakit.set_active(net, ["a", "b"])
    lorakit.merge(net, ["a"])  # deleting a merged adapter takes it out of the weight first
    lorakit.delete_adapter(net, "a")
    assert isinstance(net.layer, LoraLayer), "the layer still has adapter 'b'"
    assert lorakit.adapter_names(net) == ["b"]
    assert lorakit.active_adapters(net) == ["b"]
    assert max_abs_diff(original.weight, w0) <= 1e-6
    assert max_abs_diff(forward(net, x), out_b) <= 1e-5
    lorakit.merge(net)  # deleting the last (merged) adapter restores the original weight too
    lorakit.delete_adapter(net, "b")
    assert type(net.layer) is cls
    assert net.layer is original
    assert lorakit.adapter_names(net) == []
    assert max_abs_diff(original.weight, w0) <= 1e-6
    assert max_abs_diff(forward(net, x), base) <= 1e-5


@pytest.mark.parametrize(("cls", "variant"), CASES)
def test_merge_and_unload(cls: type, variant: str) -> None:
    net, x = build(cls)
    base = forward(net, x)
    attach(net, variant, init="random")
    want = forward(net, x)
    assert_changes(want, base)
    out_model = lorakit.merge_and_unload(net)
    assert out_model is net
    assert type(net.layer) is cls
    assert not any(isinstance(m, LoraLayer) for m in net.modules())
    assert lorakit.adapter_names(net) == []
    assert max_abs_diff(forward(net, x), want) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# low-precision base weights with fp32 adapters
# ---------------------------------------------------------------------------------------------------------
def _base_runs_on_cpu(net: Net, x: torch.Tensor) -> str | None:
    """None if the plain base layer runs forward in its dtype on CPU, else the error."""
    try:
        with torch.no_grad():
            net(x)
    except (RuntimeError, NotImplementedError) as err:
        return str(err).splitlines()[0]
    return None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("cls", "variant"), CASES)
def test_low_precision_base_with_fp32_adapter(cls: type, variant: str, dtype: torch.dtype) -> None:
    net, x = build(cls)
    net = net.to(dtype)
    if _case(cls).float_input:
        x = x.to(dtype)
    error = _base_runs_on_cpu(net, x)
    if error is not None:
        pytest.skip(f"torch cannot run a plain {cls.__name__} in {dtype} on CPU ({error}); not a lorakit issue")
    attach(net, variant, init="random", adapter_dtype="float32")
    net.train()
    for p in net.layer.adapters.parameters():
        assert p.dtype == torch.float32
    assert net.layer.base_layer.weight.dtype == dtype
    out = net(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for p in net.layer.adapters.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    assert net.layer.base_layer.weight.grad is None
