"""VeRA files both ways with the real `peft` (peft_type "VERA"), with and without the saved projections.

PEFT -> lorakit: a PeftModel with random lambdas is saved with save_pretrained; lorakit.load_adapter into a fresh
base reproduces its logits. lorakit -> PEFT: lorakit's file loads with PeftModel.from_pretrained, same logits.
Without save_projection both sides draw A and B again from projection_prng_key, so the draws must agree exactly.
Tiny Llama (Linear), GPT-2 (Conv1D) and BERT (sequence classification, modules_to_save) built from configs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_ids
from lorakit.layers import LoraLayer

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")  # PEFT warns about save_projection=False and fan_in_fan_out

ATOL = 1e-5
MODELS = {  # builder, VeRA fields shared by both libraries
    "llama": (tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_proj"])),
    "bert": (tiny_bert, dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                             task_type="SEQ_CLS")),
}
CASES = [pytest.param(kind, save, id=f"{kind}-{'projection' if save else 'seed'}")
         for kind in MODELS for save in (True, False)]


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids()).logits


def _noise_(tensor: torch.Tensor, gen: torch.Generator, std: float) -> None:
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)


def randomize_trainable(model: nn.Module) -> None:
    """Every trainable tensor random: the lambdas, and a modules_to_save copy (BERT's classifier)."""
    gen = torch.Generator().manual_seed(99)
    for name, param in model.named_parameters():
        if param.requires_grad:
            _noise_(param, gen, 0.5 if "vera_lambda" in name else 0.05)


def peft_model(kind: str, save_projection: bool, seed: int = 3) -> nn.Module:
    build, fields = MODELS[kind]
    config = peft.VeraConfig(save_projection=save_projection, projection_prng_key=seed, **fields)
    return peft.get_peft_model(build(), config).eval()


def lorakit_model(kind: str, save_projection: bool, seed: int = 3) -> nn.Module:
    build, fields = MODELS[kind]
    model = build()
    options = {"save_projection": save_projection, "projection_prng_key": seed}
    lorakit.attach(model, lorakit.LoraConfig(method="vera", options=options, **fields))
    return model


def assert_close_and_nontrivial(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max().item() > 1e-3, "the adapter does not change the output: the test is vacuous"
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize(("kind", "save_projection"), CASES)
def test_peft_to_lorakit(kind: str, save_projection: bool, tmp_path: Path) -> None:
    base = logits(MODELS[kind][0]())
    pm = peft_model(kind, save_projection)
    randomize_trainable(pm)
    want = logits(pm)
    pm.save_pretrained(str(tmp_path))

    model = MODELS[kind][0]()
    lorakit.load_adapter(model, tmp_path)
    assert_close_and_nontrivial(logits(model), want, base)
    ours = next(m for m in model.modules() if isinstance(m, LoraLayer)).adapters["default"].projections
    assert torch.equal(ours.vera_A, pm.base_model.vera_A["default"])  # same draw, or the file's copy
    assert torch.equal(ours.vera_B, pm.base_model.vera_B["default"])


@pytest.mark.parametrize(("kind", "save_projection"), CASES)
def test_lorakit_to_peft(kind: str, save_projection: bool, tmp_path: Path) -> None:
    base = logits(MODELS[kind][0]())
    model = lorakit_model(kind, save_projection)
    randomize_trainable(model)
    want = logits(model)
    lorakit.save_adapter(model, tmp_path)

    pm = peft.PeftModel.from_pretrained(MODELS[kind][0](), str(tmp_path)).eval()
    assert_close_and_nontrivial(logits(pm), want, base)


@pytest.mark.parametrize("kind", list(MODELS))
def test_same_file_keys_and_shapes_as_peft(kind: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    peft_model(kind, True).save_pretrained(str(tmp_path / "peft"))
    lorakit.save_adapter(lorakit_model(kind, True), tmp_path / "lorakit")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert torch.equal(ours["base_model.vera_A"], theirs["base_model.vera_A"])


def test_trainable_parameter_count_matches_peft() -> None:
    for kind in MODELS:
        pm = peft_model(kind, True)
        theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        assert lorakit.trainable_parameters(lorakit_model(kind, True))[0] == theirs, kind
