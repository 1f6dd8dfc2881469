"""model.save_pretrained on a model with lorakit adapters writes the active adapters in PEFT's layout; a merged and
unloaded model saves as a plain model again. Real peft and transformers, tiny models built from configs."""

from __future__ import annotations

import copy
import json
import pickle

import peft
import pytest
import torch
import transformers

import lorakit
from conftest import max_abs_diff, randomize_adapters, tiny_llama, token_ids
from lorakit.integrations import AdapterSavePretrained

CONFIG = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def adapted(names=("default",)) -> torch.nn.Module:
    model = tiny_llama()
    for name in names:
        lorakit.attach(model, CONFIG, name=name)
    randomize_adapters(model)
    return model


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids() if ids is None else ids).logits


def files_in(directory) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_save_pretrained_writes_the_adapter_in_peft_layout_and_every_loader_agrees(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path)
    assert files_in(tmp_path) == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    expected = logits(model)
    assert max_abs_diff(expected, logits(tiny_llama())) > 1e-3  # the adapter changes the output
    assert max_abs_diff(logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)), expected) < 1e-5
    hf = tiny_llama()
    hf.load_adapter(str(tmp_path))
    assert max_abs_diff(logits(hf), expected) < 1e-5
    assert max_abs_diff(logits(lorakit.load_adapter(tiny_llama(), tmp_path)), expected) < 1e-5


def test_active_adapters_are_saved_others_in_subfolders_and_selected_adapters_is_honoured(tmp_path):
    model = adapted(("default", "other", "idle"))
    lorakit.set_active(model, ["default", "other"])
    model.save_pretrained(tmp_path / "active")
    assert files_in(tmp_path / "active") == {
        "adapter_config.json", "adapter_model.safetensors", "other/adapter_config.json",
        "other/adapter_model.safetensors",
    }
    model.save_pretrained(tmp_path / "picked", selected_adapters=["idle"])
    assert files_in(tmp_path / "picked") == {"idle/adapter_config.json", "idle/adapter_model.safetensors"}
    lorakit.set_active(model, "idle")
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path / "picked", name="idle")
    assert max_abs_diff(logits(reloaded), logits(model)) < 1e-5
    with pytest.raises(lorakit.AdapterNameError, match="'nope'"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])


def test_trainers_state_dict_supplies_the_saved_values(tmp_path):
    model = adapted()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("q_proj.adapters.default.lora_B"))
    state[key] = torch.full_like(state[key], 0.5)  # as if gathered from shards: differs from the live tensor
    model.save_pretrained(tmp_path, state_dict=state)
    saved = lorakit.io.files.read_weights(tmp_path)
    peft_key = "base_model.model." + key.replace(".adapters.default.lora_B", ".lora_B.weight")
    assert torch.equal(saved[peft_key], state[key])
    other = peft_key.replace("q_proj", "v_proj")
    assert torch.equal(saved[other], model.get_submodule(other[17:-len(".lora_B.weight")]).adapters["default"].lora_B)


def test_not_main_process_writes_nothing_and_unsupported_options_are_refused(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    model.save_pretrained(tmp_path / "ok", safe_serialization=True, max_shard_size="1GB")
    assert (tmp_path / "ok" / "adapter_model.safetensors").is_file()
    with pytest.raises(lorakit.ConfigError, match="push_to_hub=True.*upload_folder"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(lorakit.ConfigError, match="save_peft_format=False"):
        model.save_pretrained(tmp_path / "raw", save_peft_format=False)
    assert not (tmp_path / "hub").exists() and not (tmp_path / "raw").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(lorakit.ConfigError, match="is a file"):
        model.save_pretrained(tmp_path / "file")


def test_an_existing_save_is_kept_when_saving_fails(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(lorakit.ConfigError):
        model.save_pretrained(tmp_path, push_to_hub=True)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before


def test_merge_and_unload_and_deleting_the_last_adapter_give_back_the_plain_save_pretrained(tmp_path):
    model = adapted()
    expected = logits(model)
    merged = lorakit.merge_and_unload(model)
    assert "save_pretrained" not in merged.__dict__
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert max_abs_diff(logits(reloaded), expected) < 1e-5

    other = adapted(("a", "b"))
    lorakit.delete_adapter(other, "a")
    assert isinstance(other.__dict__["save_pretrained"], AdapterSavePretrained)
    lorakit.delete_adapter(other, "b")
    assert "save_pretrained" not in other.__dict__
    assert not other._load_state_dict_post_hooks


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_save_pretrained_follows_a_copied_model(tmp_path, clone):
    model = adapted()
    twin = copy.deepcopy(model) if clone == "deepcopy" else pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.mul_(2.0)  # the copy's adapter differs: its save must write the copy's tensors
    assert twin.save_pretrained.model is twin
    twin.save_pretrained(tmp_path)
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert max_abs_diff(logits(reloaded), logits(twin)) < 1e-5
    assert max_abs_diff(logits(reloaded), logits(model)) > 1e-4
    lorakit.delete_adapter(twin, "default")
    assert "save_pretrained" not in twin.__dict__ and isinstance(model.save_pretrained, AdapterSavePretrained)


def test_an_adapter_only_state_loads_without_reporting_the_frozen_base_missing():
    model = adapted()
    state = {k: v.clone() * 0 for k, v in lorakit.integrations.trainable_state(model).items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(float(t.detach().abs().max()) == 0 for t in lorakit.integrations.trainable_state(model).values())
    partial = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k}
    with pytest.raises(RuntimeError, match="embed_tokens"):  # a state with base weights: reported as usual
        model.load_state_dict(partial, strict=True)
