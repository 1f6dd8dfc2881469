"""AdaLoRA files both ways with the real `peft` (peft_type ADALORA): lorakit's file in PeftModel.from_pretrained and
PEFT's save_pretrained in lorakit.load_adapter give the same logits (1e-5) on Llama, GPT-2 (Conv1D) and BERT
built from configs, before any allocation and with a rank_pattern after one (tensors cut to the kept triplets)."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import max_abs_diff, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from lorakit.variants.adalora import final_ranks

MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn"]),
    "bert": (tiny_bert, ["query", "value"]),
}
SCHEDULE = {"total_step": 6, "tinit": 1, "tfinal": 2, "deltaT": 1, "target_r": 2}


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(token_ids()).logits


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    out = model(token_ids())
    return out.logits.float().square().mean()


def randomize(named, seed: int = 5) -> None:
    """Non-zero E (both libraries start with E = 0) and larger P, Q, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named:
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "lora_E" in name else 0.3))


def lorakit_model(kind: str, allocate: bool) -> torch.nn.Module:
    make, targets = MODELS[kind]
    model = lorakit.attach(make(), lorakit.LoraConfig(method="adalora", r=6, alpha=4.0, target_modules=targets,
                                                      options=SCHEDULE))
    randomize(model.named_parameters())
    if allocate:  # the allocator's steps, with gradients of a toy loss
        hook = lorakit.training_hooks(model)[0]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        for step in range(1, SCHEDULE["total_step"] + 1):
            loss_of(model).backward()
            opt.step()
            hook.after_optimizer_step(step)
            opt.zero_grad()
    return model


def peft_model(kind: str, allocate: bool) -> peft.PeftModel:
    make, targets = MODELS[kind]
    config = peft.AdaLoraConfig(init_r=6, lora_alpha=4, target_modules=targets, **SCHEDULE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make(), config)
    randomize(model.named_parameters())
    if allocate:  # PEFT's loop: update_and_allocate(step) by hand after each optimizer step
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        for step in range(1, SCHEDULE["total_step"] + 1):
            loss_of(model).backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
    return model


@pytest.mark.parametrize("allocate", [False, True], ids=["init", "allocated"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_lorakit_file_loads_in_peft(kind: str, allocate: bool, tmp_path) -> None:
    model = lorakit_model(kind, allocate)
    want = logits(model)
    assert max_abs_diff(want, logits(MODELS[kind][0]())) > 1e-4  # the adapter changes the output
    lorakit.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA" and data["init_r"] == 6
    if allocate:
        ranks = final_ranks(model)
        assert sum(ranks.values()) == 2 * len(ranks)
        assert {k.removesuffix(".lora_E"): sum(v) for k, v in data["rank_pattern"].items()} == ranks
    else:
        assert data["rank_pattern"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(MODELS[kind][0](), tmp_path)
    assert max_abs_diff(logits(loaded), want) <= 1e-5


@pytest.mark.parametrize("allocate", [False, True], ids=["init", "allocated"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_peft_file_loads_in_lorakit(kind: str, allocate: bool, tmp_path) -> None:
    model = peft_model(kind, allocate)
    want = logits(model)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (data["rank_pattern"] is not None) == allocate
    loaded = lorakit.load_adapter(MODELS[kind][0](), tmp_path)
    assert max_abs_diff(logits(loaded), want) <= 1e-5
    if allocate:  # the kept ranks are those of PEFT's pattern (tensors cut on save, resized on load)
        assert final_ranks(loaded) == {k.removesuffix(".lora_E"): sum(v) for k, v in data["rank_pattern"].items()}
        assert sum(final_ranks(loaded).values()) == 2 * len(data["rank_pattern"])
    # and back: lorakit writes it again as PEFT reads it
    lorakit.save_adapter(loaded, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(MODELS[kind][0](), tmp_path / "again")
    assert max_abs_diff(logits(again), want) <= 1e-5
