"""Delta-LoRA's step (lorakit.variants.delta_lora, ops.delta_lora): W0 moves by exactly λ s (B'A' - BA) after each
optimizer step from update_start_step on, on every layer kind it declares; options, refusals, and its file."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import max_abs_diff, tiny_llama, token_ids
from lorakit.errors import ConfigError
from lorakit.io.delta_lora import base_model_state
from lorakit.ops.delta_lora import add_low_rank_


class Net(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _ids(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 20, (3, 5), generator=gen)


# layer factory, input, and ΔW (fp64) in the weight's layout from A, B, written out per layer type
LAYERS = {
    "linear": (lambda: nn.Linear(16, 12), lambda g: torch.randn(2, 3, 16, generator=g), lambda b, a: b @ a),
    "conv1d_gpt2": (lambda: Conv1D(12, 16), lambda g: torch.randn(2, 3, 16, generator=g), lambda b, a: (b @ a).t()),
    "embedding": (lambda: nn.Embedding(20, 12), _ids, lambda b, a: (b @ a).t()),
    "conv": (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda g: torch.randn(2, 4, 7, 7, generator=g),
             lambda b, a: (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])),
}


def adapted(kind: str, **options) -> tuple[Net, torch.Tensor]:
    make, make_input, _ = LAYERS[kind]
    torch.manual_seed(0)
    net = Net(make())
    config = lorakit.LoraConfig(r=3, alpha=5.0, target_modules=["layer"], method="delta_lora", init="random",
                                options=options)
    lorakit.attach(net, config).train()
    return net, make_input(torch.Generator().manual_seed(1))


def sgd_step(net: Net, x: torch.Tensor, lr: float = 1.0) -> None:
    params = [p for p in net.parameters() if p.requires_grad]
    net(x).float().square().mean().backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


def factors(net: Net) -> tuple[torch.Tensor, torch.Tensor]:
    adapter = net.layer.adapters["default"]
    return adapter.lora_B.detach().double().clone(), adapter.lora_A.detach().double().clone()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_one_step_moves_w0_by_lambda_s_times_the_change_of_ba(kind: str) -> None:
    net, x = adapted(kind, delta_lambda=0.7, update_start_step=1)
    (hook,) = lorakit.training_hooks(net)
    adapter = net.layer.adapters["default"]
    w0 = net.layer.base_layer.weight.detach().double().clone()
    b0, a0 = factors(net)
    sgd_step(net, x)
    b1, a1 = factors(net)
    assert max_abs_diff(b1, b0) > 1e-4 and max_abs_diff(a1, a0) > 1e-4, "the step did not move A and B"
    hook.after_optimizer_step(1)
    delta = LAYERS[kind][2]
    want = w0 + 0.7 * adapter.scale * (delta(b1, a1) - delta(b0, a0))
    got = net.layer.base_layer.weight.detach().double()
    assert max_abs_diff(got, w0) > 1e-4
    assert max_abs_diff(got, want) < 1e-6
    assert not net.layer.base_layer.weight.requires_grad  # W0 moves without gradients or optimizer state


def test_nothing_moves_before_update_start_step_then_only_by_the_last_change() -> None:
    net, x = adapted("linear", update_start_step=3)
    (hook,) = lorakit.training_hooks(net)
    adapter = net.layer.adapters["default"]
    w0 = net.layer.base_layer.weight.detach().clone()
    for step in (1, 2):
        sgd_step(net, x)
        hook.after_optimizer_step(step)
        assert torch.equal(net.layer.base_layer.weight, w0), f"W0 moved at step {step} < update_start_step 3"
    b2, a2 = factors(net)
    sgd_step(net, x)
    b3, a3 = factors(net)
    hook.after_optimizer_step(3)
    want = w0.double() + 0.5 * adapter.scale * (b3 @ a3 - b2 @ a2)  # the change of step 3 alone, default λ 0.5
    assert max_abs_diff(net.layer.base_layer.weight.double(), want) < 1e-6


def test_a_skipped_optimizer_step_leaves_w0_unchanged() -> None:
    net, x = adapted("linear", update_start_step=0)
    (hook,) = lorakit.training_hooks(net)
    w0 = net.layer.base_layer.weight.detach().clone()
    hook.after_optimizer_step(1)  # A and B unchanged (e.g. fp16 loss scaling skipped the step)
    assert max_abs_diff(net.layer.base_layer.weight, w0) < 1e-8  # B A - B A in one GEMM: zero up to rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_weight_gets_the_fp32_sum_rounded_once(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=gen).to(dtype)
    left, right = torch.randn(24, 6, generator=gen), torch.randn(6, 40, generator=gen)
    want = (weight.double() + 1e-2 * (left.double() @ right.double())).to(dtype)
    add_low_rank_(weight, left, right, 1e-2, "dk")
    assert weight.dtype == dtype
    ulp = torch.finfo(dtype).eps * want.float().abs()
    assert ((weight.float() - want.float()).abs() <= ulp).all()  # at most one rounding step off the exact sum


def test_the_paired_gemm_equals_the_difference_of_two_products() -> None:
    gen = torch.Generator().manual_seed(0)
    b_new, b_old = torch.randn(12, 4, generator=gen), torch.randn(12, 4, generator=gen)
    a_new, a_old = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)
    for layout, weight in (("dk", torch.zeros(12, 9)), ("kd", torch.zeros(9, 12))):
        add_low_rank_(weight, torch.cat([b_new, -b_old], 1), torch.cat([a_new, a_old], 0), 0.3, layout)
        want = 0.3 * (b_new @ a_new - b_old @ a_old)
        torch.testing.assert_close(weight, want if layout == "dk" else want.t(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layout must be"):
        add_low_rank_(torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(2, 3), 1.0, "xy")


def test_options_have_the_papers_defaults_and_bad_values_are_refused() -> None:
    config = lorakit.LoraConfig(method="delta_lora")
    assert config.options == {"delta_lambda": 0.5, "update_start_step": 500}
    with pytest.raises(ConfigError, match="option 'delta_lambda' of method 'delta_lora'.*finite number >= 0"):
        lorakit.LoraConfig(method="delta_lora", options={"delta_lambda": -1.0})
    with pytest.raises(ConfigError, match="option 'update_start_step'.*integer >= 0, got 1.5"):
        lorakit.LoraConfig(method="delta_lora", options={"update_start_step": 1.5})
    with pytest.raises(ConfigError, match="has no option 'lambda'.*delta_lambda, update_start_step"):
        lorakit.LoraConfig(method="delta-lora", options={"lambda": 1.0})


def test_dropout_is_refused_when_training_starts() -> None:
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(method="delta_lora", dropout=0.1,
                                                             target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"Delta-LoRA adapter 'default' on module '.*q_proj': dropout=0.1; .*"
                                          r"set LoraConfig.dropout=0"):
        lorakit.training_hooks(model)


def test_a_residual_init_is_refused_before_the_model_changes() -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError, match="init='pissa' cannot be used with method 'delta_lora'"):
        lorakit.attach(model, lorakit.LoraConfig(method="delta_lora", init="pissa", target_modules=["q_proj"]))
    assert lorakit.adapter_names(model) == [] and type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_abilities_are_declared_and_asked() -> None:
    abilities = lorakit.variants.variant_named("delta_lora").abilities
    assert abilities.trains_base and abilities.step_hook and abilities.low_rank and abilities.merge
    assert not (abilities.mixed_batches or abilities.hot_swap or abilities.combine or abilities.vllm)
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, method="lora", target_modules=["q_proj"]))
    assert lorakit.training_hooks(model) == []  # plain LoRA has no step hook


def test_the_file_is_plain_lora_that_peft_loads_onto_the_changed_base(tmp_path) -> None:
    import peft

    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, method="delta_lora", init="random",
                                                             target_modules=["q_proj", "v_proj"],
                                                             options={"update_start_step": 0}))
    (hook,) = lorakit.training_hooks(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids()
    for step in (1, 2):
        model.train()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        hook.after_optimizer_step(step)
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["use_dora"] and "delta_lambda" not in json.dumps(config)
    changed = tiny_llama()
    changed.load_state_dict(base_model_state(model, merged=False))
    assert max_abs_diff(changed.model.layers[0].self_attn.q_proj.weight,
                        tiny_llama().model.layers[0].self_attn.q_proj.weight) > 1e-4, "the base did not move"
    loaded = peft.PeftModel.from_pretrained(changed, tmp_path).eval()
    with torch.no_grad():
        assert max_abs_diff(loaded(ids).logits, want) < 1e-5
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)  # the ORIGINAL base: a plain LoRA, but not the model
    assert lorakit.get_config(reloaded).method == "lora"


def test_a_quantised_base_is_refused_by_name() -> None:
    from lorakit.quant import quantize

    model = quantize(tiny_llama(), "nf4", compute_dtype=torch.float32)
    with pytest.raises(lorakit.TargetError, match=r"q_proj' \(nf4_linear\) cannot take a delta_lora adapter"):
        lorakit.attach(model, lorakit.LoraConfig(method="delta_lora", target_modules=["q_proj"]))
