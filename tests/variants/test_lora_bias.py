"""PEFT's lora_bias=True in lorakit (LoraConfig.lora_bias): a trained bias b on B, out = base(x) + s · (B A x + b),
merged into the base bias; its refusals; and files both ways with the real peft on Llama, GPT-2 and BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import max_abs_diff, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from lorakit.errors import ConfigError, MergeError, TargetError
from lorakit.layers import LoraLayer

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's notes on bias-less layers, 1-D lora_B.bias
ATOL = 1e-5


class Net(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _layers() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        ("linear", nn.Linear(6, 5), torch.randn(3, 4, 6)),
        ("conv1d_gpt2", Conv1D(5, 6), torch.randn(3, 4, 6)),
        ("conv", nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 6, 6)),
    ]


def _expected(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """base(x) + s · (ΔW x via the merged weight + b), computed independently of the adapter's forward."""
    adapter = layer.adapters["default"]
    base = layer.base_layer
    with torch.no_grad():
        delta = adapter.delta_weight(base)
        bias = adapter.lora_B_bias * adapter.scale
        if isinstance(base, nn.Conv2d):
            out = nn.functional.conv2d(x, base.weight + delta, base.bias, padding=base.padding)
            return out + bias.view(1, -1, 1, 1)
        weight = base.weight + delta if isinstance(base, nn.Linear) else (base.weight + delta).t()
        return nn.functional.linear(x, weight, base.bias) + bias


@pytest.mark.parametrize("index", range(3), ids=["linear", "conv1d_gpt2", "conv"])
def test_forward_adds_scaled_bias_on_each_kind_fused_and_unfused(index: int) -> None:
    name, layer, x = _layers()[index]
    net = Net(layer)
    lorakit.attach(net, lorakit.LoraConfig(r=2, alpha=6, target_modules=["layer"], lora_bias=True, init="random"))
    wrapped = net.layer
    assert wrapped.kind.name == name and wrapped.adapters["default"].lora_B_bias.abs().sum() > 0
    want = _expected(wrapped, x)
    assert max_abs_diff(net(x), want) < ATOL  # the fused path where the kind has one
    wrapped.base_layer.register_forward_hook(lambda *a: None)  # a hook: base layer, then add_to_output
    assert max_abs_diff(net(x), want) < ATOL


def test_bias_starts_at_zero_and_trains_with_gradient_s_times_sum_of_g() -> None:
    torch.manual_seed(0)
    net = Net(nn.Linear(6, 5))
    before = net(torch.ones(1, 6)).detach()
    lorakit.attach(net, lorakit.LoraConfig(r=2, alpha=4, target_modules=["layer"], lora_bias=True))
    adapter = net.layer.adapters["default"]
    assert torch.equal(adapter.lora_B_bias, torch.zeros(5)) and adapter.lora_B_bias.requires_grad
    assert max_abs_diff(net(torch.ones(1, 6)), before) == 0.0
    x, g = torch.randn(3, 4, 6), torch.randn(3, 4, 5)
    (net(x) * g).sum().backward()
    assert max_abs_diff(adapter.lora_B_bias.grad, adapter.scale * g.sum((0, 1))) < ATOL
    assert adapter.param_groups()["other"] == [adapter.lora_B_bias]


def test_merge_adds_s_b_into_the_base_bias_and_unmerge_restores_it() -> None:
    model = tiny_llama(attention_bias=True)
    ids = token_ids()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True,
                                             init="random"))
    q = model.model.layers[0].self_attn.q_proj
    bias0 = q.base_layer.bias.detach().clone()
    with torch.no_grad():
        want = model(ids).logits
        lorakit.merge(model)
        assert max_abs_diff(q.base_layer.bias, bias0 + q.adapters["default"].scale * q.adapters["default"].lora_B_bias) < 1e-6
        assert max_abs_diff(model(ids).logits, want) < ATOL
        lorakit.unmerge(model)
        assert max_abs_diff(q.base_layer.bias, bias0) < 1e-6
        merged = lorakit.merge_and_unload(model)
        assert max_abs_diff(merged(ids).logits, want) < ATOL


def test_merge_into_a_base_without_bias_is_refused_by_name_and_changes_nothing() -> None:
    model = tiny_llama()  # Llama's projections have no bias: PEFT trains lora_bias there but cannot merge it
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_bias=True, init="random"))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match=r"model.layers.0.self_attn.q_proj.*lora_bias=True.*no bias"):
        lorakit.merge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(not layer.merged for layer in model.modules() if isinstance(layer, LoraLayer))


@pytest.mark.parametrize("kwargs, peft_kwargs, match", [
    ({"method": "dora"}, {"use_dora": True}, "method 'dora' has no bias on B"),
    ({"use_dora": True}, {"use_dora": True}, "method 'dora' has no bias on B"),
    ({"init": "gaussian"}, {"init_lora_weights": "gaussian"}, "lora_bias=True needs init 'kaiming' or 'random'"),
    ({"init": "pissa"}, {"init_lora_weights": "pissa"}, "found init='pissa'"),
    ({"init": "loftq"}, {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "found init='loftq'"),
])
def test_combinations_peft_refuses_are_refused(kwargs: dict, peft_kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        lorakit.LoraConfig(r=4, lora_bias=True, **kwargs)
    with pytest.raises(ValueError, match="lora_bias=True"):  # PEFT refuses the same ones
        peft.LoraConfig(r=4, lora_bias=True, **peft_kwargs)


def test_embedding_target_is_refused_by_name_before_any_change() -> None:
    model = tiny_llama()
    with pytest.raises(TargetError, match=r"model.embed_tokens.*\(embedding\).*lora_bias=True"):
        lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], lora_bias=True))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_instance_abilities_say_what_the_bias_rules_out() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert not adapter.abilities.low_rank and not adapter.abilities.mixed_batches and not adapter.abilities.combine
    assert type(adapter).abilities.low_rank  # the class (plain LoRA) is unchanged
    with pytest.raises(lorakit.LorakitError):
        model(token_ids(), adapter_names=["default", "__base__"])


# -- files both ways with the real peft ---------------------------------------------------------------------
CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], None),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], None),
    "bert": (tiny_bert, ["query", "value"], ["classifier"]),
}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_lora_bias_file_loads_in_lorakit(case: str, tmp_path: Path) -> None:
    build, targets, save = CASES[case]
    ids = token_ids()
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=True,
                                                      init_lora_weights=False, modules_to_save=save))
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                param.normal_(0.0, 0.1)  # as after training
    pm.eval()
    want = _logits(pm, ids)
    pm.save_pretrained(tmp_path)
    model = lorakit.load_adapter(build(), tmp_path)
    assert lorakit.get_config(model).lora_bias
    assert max_abs_diff(_logits(model, ids), want) < ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_lora_bias_file_loads_in_peft(case: str, tmp_path: Path) -> None:
    build, targets, save = CASES[case]
    ids = token_ids()
    model = lorakit.attach(build(), lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, lora_bias=True,
                                                       init="random", modules_to_save=save))
    want = _logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    assert pm.peft_config["default"].lora_bias
    assert max_abs_diff(_logits(pm, ids), want) < ATOL
    again = lorakit.load_adapter(build(), tmp_path)  # and back into lorakit
    assert max_abs_diff(_logits(again, ids), want) < ATOL


def test_swap_and_combine_refuse_a_lora_bias_adapter_by_name() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), name="biased")
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), name="plain")
    with pytest.raises(ConfigError, match="'biased'.*cannot be swapped in place"):
        lorakit.prepare_swap(model, 8, names="biased")
    with pytest.raises(ConfigError, match="'biased'.*cannot take as an input"):
        lorakit.combine(model, {"biased": 1.0, "plain": 1.0}, name="both")
    lorakit.prepare_swap(model, 8, names="plain")  # the plain LoRA beside it still can


def test_merge_after_quantising_the_base_is_refused_before_any_change() -> None:
    model = tiny_llama(attention_bias=True)
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init="random"))
    lorakit.quantize(model, compute_dtype=torch.float32)
    ids = token_ids()
    with torch.no_grad():
        want = model(ids).logits
    for merge in (lambda: lorakit.merge(model, requantize=True), lambda: lorakit.merge_and_unload(model)):
        with pytest.raises(MergeError, match=r"q_proj.*lora_bias=True on a nf4_linear base"):
            merge()
        with torch.no_grad():
            assert max_abs_diff(model(ids).logits, want) == 0.0


@pytest.mark.parametrize("change, error, match", [
    ("wrong_shape", "ShapeMismatchError", r"q_proj.*lora_B.bias has shape \(5,\)"),
    ("no_bias_in_config", "AdapterFileError", "unexpected key.*lora_B.bias"),
    ("no_bias_in_file", "AdapterFileError", "no tensor.*lora_B.bias"),
])
def test_inconsistent_lora_bias_files_are_refused_by_name(change: str, error: str, match: str, tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    lorakit.save_adapter(model, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    if change == "wrong_shape":
        weights[key] = torch.zeros(5)
    elif change == "no_bias_in_config":
        config["lora_bias"] = False
    else:
        del weights[key]
    save_file(weights, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny_llama()
    with pytest.raises(getattr(lorakit, error), match=match):
        lorakit.load_adapter(fresh, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in fresh.modules())
