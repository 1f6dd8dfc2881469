"""`layers_to_transform` with every kind of target: applied to names and to "all-linear", refused (as PEFT
refuses it) with a regex; an all-linear adapter on one layer saved by lorakit loads in real PEFT on that layer."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import max_abs_diff, randomize_adapters, tiny_gpt2, tiny_llama, token_ids
from lorakit.errors import ConfigError
from lorakit.model import lora_layers

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def wrapped(model) -> list[str]:
    return sorted(layer.path for layer in lora_layers(model))


def llama_layer_linears(*indices: int) -> list[str]:
    return sorted(f"model.layers.{i}.{name}" for i in indices for name in LLAMA_LINEARS)


@pytest.mark.parametrize("layers, pattern", [([1], None), (1, None), ([1], "layers"), ([0, 2], "layers")])
def test_all_linear_with_layers_to_transform_wraps_only_those_layers(layers, pattern) -> None:
    model = tiny_llama(layers=3)
    config = lorakit.LoraConfig(r=2, target_modules="all-linear", layers_to_transform=layers, layers_pattern=pattern)
    lorakit.attach(model, config)
    indices = [layers] if isinstance(layers, int) else layers
    assert wrapped(model) == llama_layer_linears(*indices)


def test_all_linear_with_layers_on_gpt2_conv1d() -> None:
    model = lorakit.attach(tiny_gpt2(layers=3), lorakit.LoraConfig(r=2, target_modules="all-linear",
                                                                    layers_to_transform=[2], layers_pattern="h"))
    assert wrapped(model) == sorted(f"transformer.h.2.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                       "mlp.c_proj"))


@pytest.mark.parametrize("selection", [dict(layers_to_transform=[1]), dict(layers_to_transform=[1],
                                                                           layers_pattern="layers")])
def test_a_regex_with_a_layer_selection_is_refused_with_a_way_out(selection) -> None:
    with pytest.raises(ConfigError, match=r"cannot restrict a regex target_modules.*put the layer in it"):
        lorakit.LoraConfig(r=2, target_modules=r".*\.(q_proj|v_proj)", **selection)
    with pytest.raises(ConfigError, match=r"adapter_config.json: .*regex"):
        lorakit.LoraConfig.from_peft_dict({"target_modules": ".*q_proj", **selection})


def test_the_regex_form_of_a_layer_selection_works() -> None:
    model = lorakit.attach(tiny_llama(layers=3), lorakit.LoraConfig(r=2, target_modules=r".*\.layers\.1\..*_proj"))
    assert wrapped(model) == llama_layer_linears(1)


def test_layers_pattern_without_indices_is_refused() -> None:
    with pytest.raises(ConfigError, match="layers_pattern='layers' needs layers_to_transform"):
        lorakit.LoraConfig(r=2, target_modules=["q_proj"], layers_pattern="layers")


def test_layer_indices_must_be_integers() -> None:
    with pytest.raises(ConfigError, match=r"layers_to_transform must be layer indices.*'1'"):
        lorakit.LoraConfig(r=2, target_modules="all-linear", layers_to_transform=["1"])


def test_all_linear_on_one_layer_round_trips_through_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    model = lorakit.attach(tiny_llama(layers=3), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                                                    layers_to_transform=[1]))
    randomize_adapters(model)
    x = token_ids()
    with torch.no_grad():
        want = model(x).logits
        base = tiny_llama(layers=3)(x).logits
    assert max_abs_diff(want, base) > 1e-3  # the adapter changes the output: the comparison means something
    lorakit.save_adapter(model, tmp_path)

    peft_model = peft.PeftModel.from_pretrained(tiny_llama(layers=3), str(tmp_path)).eval()
    prefix = "base_model.model."
    peft_wrapped = sorted(n[len(prefix):] for n, m in peft_model.named_modules() if isinstance(m, PeftLoraLayer))
    assert peft_wrapped == llama_layer_linears(1)
    with torch.no_grad():
        assert max_abs_diff(peft_model(x).logits, want) < 1e-5

    reloaded = lorakit.load_adapter(tiny_llama(layers=3), tmp_path)
    assert wrapped(reloaded) == llama_layer_linears(1)
