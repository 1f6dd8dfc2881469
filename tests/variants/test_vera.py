"""VeRA in lorakit: shared frozen projections, r + d trained values per layer, the update's formula, files with and
without the projections, refusals, and a short run of lorakit's Trainer.

Tiny models from configs (tests/conftest.py); the interop with the real `peft` is in test_vera_interop.py.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import max_abs_diff, tiny_gpt2, tiny_llama, token_ids
from lorakit.errors import ConfigError, TargetError
from lorakit.layers import LoraLayer
from lorakit.variants.vera import VeraAdapter

TARGETS = ["q_proj", "v_proj", "down_proj"]  # d = 32, 16, 32; k = 32, 32, 64 on the tiny Llama


def vera_config(**kw) -> lorakit.LoraConfig:
    fields = dict(r=4, target_modules=TARGETS, method="vera")
    fields.update(kw)
    return lorakit.LoraConfig(**fields)


def vera_layers(model: torch.nn.Module, name: str = "default") -> list[tuple[LoraLayer, VeraAdapter]]:
    return [(m, m.adapters[name]) for m in model.modules() if isinstance(m, LoraLayer) and name in m.adapters]


def randomize(model: torch.nn.Module, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in vera_layers(model):
            adapter.vera_lambda_b.copy_(torch.randn(adapter.vera_lambda_b.shape, generator=gen) * 0.5)
            adapter.vera_lambda_d.copy_(torch.randn(adapter.vera_lambda_d.shape, generator=gen))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_trainable_parameters_are_r_plus_d_per_layer() -> None:
    model = tiny_llama()
    lorakit.attach(model, vera_config())
    layers = vera_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    expected = sum(4 + layer.base_layer.out_features for layer, _ in layers)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in trainable)
    assert lorakit.trainable_parameters(model)[0] == expected


def test_one_pair_of_projections_shared_by_all_layers_drawn_from_the_key() -> None:
    model = tiny_llama()
    lorakit.attach(model, vera_config(options={"projection_prng_key": 11}))
    projections = {id(adapter.projections) for _, adapter in vera_layers(model)}
    assert len(projections) == 1
    proj = vera_layers(model)[0][1].projections
    assert tuple(proj.vera_A.shape) == (4, 64) and tuple(proj.vera_B.shape) == (32, 4)  # the largest k and d
    assert not proj.vera_A.requires_grad and not proj.vera_B.requires_grad
    gen = torch.Generator().manual_seed(11)  # Kaiming-uniform, gain sqrt(2), fan_in = shape[1], A drawn first
    want_A = torch.empty(4, 64).uniform_(-math.sqrt(6 / 64), math.sqrt(6 / 64), generator=gen)
    want_B = torch.empty(32, 4).uniform_(-math.sqrt(6 / 4), math.sqrt(6 / 4), generator=gen)
    torch.testing.assert_close(proj.vera_A, want_A, rtol=0, atol=1e-7)
    torch.testing.assert_close(proj.vera_B, want_B, rtol=0, atol=1e-7)
    other = tiny_llama()
    lorakit.attach(other, vera_config(options={"projection_prng_key": 12}))
    assert not torch.equal(vera_layers(other)[0][1].projections.vera_A, proj.vera_A)
    copied = copy.deepcopy(model)  # a copy still shares one pair among its layers
    assert len({id(adapter.projections) for _, adapter in vera_layers(copied)}) == 1


def test_zero_init_gives_the_base_output_and_lambda_d_starts_at_d_initial() -> None:
    ids = token_ids()
    model = tiny_llama()
    base = logits(model, ids)
    lorakit.attach(model, vera_config(dropout=0.2, options={"d_initial": 0.3}))
    assert torch.equal(logits(model, ids), base)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    for _, adapter in vera_layers(model):
        assert torch.equal(adapter.vera_lambda_d, torch.full((4,), 0.3))
        assert not adapter.vera_lambda_b.any()


def test_gradients_reach_only_lambda_b_and_lambda_d() -> None:
    model = tiny_llama()
    lorakit.attach(model, vera_config())
    model.train()
    model(token_ids(), labels=token_ids()).loss.backward()
    for name, param in model.named_parameters():
        if name.endswith("vera_lambda_b"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif name.endswith("vera_lambda_d"):  # λ_b = 0 at the start: no gradient reaches λ_d yet
            assert param.grad is not None and not param.grad.any(), name
        else:
            assert param.grad is None and not param.requires_grad, name
    for _, adapter in vera_layers(model):
        assert adapter.projections.vera_A.grad is None


def test_update_is_lambda_b_b_lambda_d_a_and_merges_exactly() -> None:
    ids = token_ids()
    model = tiny_gpt2()  # Conv1D: weight (k, d)
    lorakit.attach(model, vera_config(target_modules=["c_attn", "c_proj"]))
    randomize(model)
    want = logits(model, ids)
    for layer, adapter in vera_layers(model):
        k, d = layer.base_layer.weight.shape
        proj = adapter.projections
        direct = torch.diag(adapter.vera_lambda_b) @ proj.vera_B[:d] @ torch.diag(adapter.vera_lambda_d) @ proj.vera_A[:, :k]
        torch.testing.assert_close(adapter.delta_weight(layer.base_layer), direct.t(), atol=1e-6, rtol=1e-5)
        x = torch.randn(3, k)
        out = layer(x)
        torch.testing.assert_close(out, layer.base_layer(x) + x @ direct.t(), atol=1e-5, rtol=1e-5)
    weights = {layer.path: layer.base_layer.weight.detach().clone() for layer, _ in vera_layers(model)}
    lorakit.merge(model)
    assert max_abs_diff(logits(model, ids), want) <= 1e-5
    lorakit.unmerge(model)
    for layer, _ in vera_layers(model):
        assert max_abs_diff(layer.base_layer.weight, weights[layer.path]) <= 1e-6


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_and_load_round_trip(save_projection: bool, tmp_path: Path) -> None:
    ids = token_ids()
    model = tiny_llama()
    lorakit.attach(model, vera_config(options={"projection_prng_key": 5, "save_projection": save_projection}))
    randomize(model)
    want = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert ("base_model.vera_A" in tensors) is save_projection and ("base_model.vera_B" in tensors) is save_projection
    assert sum(k.endswith(".vera_lambda_b") for k in tensors) == 2 * len(TARGETS)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["save_projection"] is save_projection
    assert saved["projection_prng_key"] == 5 and saved["r"] == 4

    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), want)
    config = lorakit.get_config(fresh, "default")
    assert config.method == "vera" and config.options["save_projection"] is save_projection


def test_a_file_with_other_projections_loads_them(tmp_path: Path) -> None:
    """save_projection=True: the file's A and B are used, not a new draw from the key."""
    ids = token_ids()
    model = tiny_llama()
    lorakit.attach(model, vera_config())
    randomize(model)
    with torch.no_grad():
        vera_layers(model)[0][1].projections.vera_A.mul_(-2.0)  # no longer what the key draws
    want = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), want)


def test_a_file_lacking_projections_it_declares_is_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.attach(model, vera_config(options={"save_projection": False}))
    lorakit.save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"save_projection": false', '"save_projection": true'))
    fresh = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError, match="missing tensor 'base_model.vera_A'"):
        lorakit.load_adapter(fresh, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in fresh.modules())  # the model is as it was


def test_two_vera_adapters_have_their_own_projections() -> None:
    ids = token_ids()
    model = tiny_llama()
    lorakit.attach(model, vera_config(), name="a")
    lorakit.attach(model, vera_config(r=2, target_modules=["v_proj"], options={"projection_prng_key": 3}), name="b")
    randomize(model)
    a, b = vera_layers(model, "a")[0][1].projections, vera_layers(model, "b")[0][1].projections
    assert a is not b and tuple(b.vera_A.shape) == (2, 32) and tuple(b.vera_B.shape) == (16, 2)
    lorakit.set_active(model, ["a"])
    out_a = logits(model, ids)
    lorakit.delete_adapter(model, "b")
    assert torch.equal(logits(model, ids), out_a)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
    (dict(lora_fa=True), "lora_fa=True"),
    (dict(init="pissa"), "init='pissa'"),
    (dict(init="gaussian"), "init='gaussian'"),
])
def test_fields_vera_has_no_meaning_for_are_refused_before_the_model_changes(fields: dict, message: str) -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError, match=message):
        lorakit.attach(model, vera_config(**fields))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_an_embedding_target_is_refused_by_name() -> None:
    model = tiny_llama()
    with pytest.raises(TargetError, match="module 'model.embed_tokens' .*cannot take a vera adapter"):
        lorakit.attach(model, vera_config(target_modules=["embed_tokens", "q_proj"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize(("options", "message"), [
    ({"projection_prng_key": -1}, "projection_prng_key"),
    ({"projection_prng_key": True}, "projection_prng_key"),
    ({"save_projection": "maybe"}, "save_projection"),
    ({"d_initial": float("nan")}, "d_initial"),
    ({"seed": 1}, "no option 'seed'"),
])
def test_bad_options_name_the_option(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        vera_config(options=options)


def test_config_to_peft_dict_and_back() -> None:
    config = vera_config(dropout=0.1, bias="lora_only", options={"projection_prng_key": 9, "save_projection": "false",
                                                                 "d_initial": 0.5})
    data = config.to_peft_dict()
    assert data["peft_type"] == "VERA" and data["vera_dropout"] == 0.1 and data["bias"] == "vera_only"
    assert data["save_projection"] is False and "lora_alpha" not in data
    back = lorakit.LoraConfig.from_peft_dict(json.loads(json.dumps(data)))
    assert back.method == "vera" and back.r == 4 and back.dropout == 0.1 and back.bias == "lora_only"
    assert back.options == {"projection_prng_key": 9, "save_projection": False, "d_initial": 0.5}
    assert sorted(back.target_modules) == sorted(TARGETS)


def test_lorakit_trainer_lowers_the_loss(tmp_path: Path, causal_lm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lorakit.hf import load_tokenizer
    from lorakit.train import TrainConfig, Trainer
    from lorakit.train.data import load_datasets

    records = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(6) for b in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = TrainConfig(model=str(causal_lm_dir), data=str(data), out=str(tmp_path / "run"), max_steps=30,
                      per_device_train_batch_size=4, learning_rate=2e-2, logging_steps=1, diagnostics_steps=0,
                      progress=False, seed=3, warmup_steps=2)
    datasets = load_datasets(cfg, load_tokenizer(str(causal_lm_dir)))
    model = AutoModelForCausalLM.from_pretrained(causal_lm_dir)
    lorakit.attach(model, vera_config(r=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "vera_lambda" in n}
    result = Trainer(model, cfg, datasets.train).fit()
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    saved = json.loads((result.saved_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA"


def test_what_vera_cannot_do_is_refused_by_name(tmp_path: Path) -> None:
    """Mixed batches, combine and hot swap stack or overwrite A and B: VeRA declares it has none to give."""
    model = tiny_llama()
    lorakit.attach(model, vera_config(), name="a")
    lorakit.attach(model, vera_config(), name="b")
    with pytest.raises(ConfigError, match="'a' .*VeraAdapter .*cannot take part in a mixed batch"):
        model(token_ids(), adapter_names=["a", "b"])
    with pytest.raises(ConfigError, match="'a' is a vera adapter.*cannot take as an input"):
        lorakit.combine(model, {"a": 1.0, "b": 1.0}, "c")
    lorakit.save_adapter(model, tmp_path, name="b")
    with pytest.raises(ConfigError, match="'a' is a vera adapter, which cannot be swapped in place"):
        lorakit.swap_adapter(model, "a", tmp_path / "b")
    assert lorakit.adapter_names(model) == ["a", "b"]
