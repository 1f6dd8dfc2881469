"""A model with lorakit adapters trains inside transformers' Trainer unchanged (examples/trainer_example.py)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import lorakit

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trainer_example.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_state(model) -> dict[str, torch.Tensor]:
    """The base model's weights under their original names (wrapper infixes removed), detached copies."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".adapters." in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor.detach().clone()
    return state


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_trains_only_the_adapter(example, tmp_path, gradient_checkpointing):
    steps = 4
    fresh = example.build_model(seed=0)
    before = base_state(fresh)
    out = example.train(tmp_path / "adapter", steps=steps, batch_size=8, gradient_checkpointing=gradient_checkpointing,
                        work_dir=tmp_path / "work", save_steps=None if gradient_checkpointing else steps)
    model = out["model"]
    assert len(out["losses"]) >= 1 and all(math.isfinite(x) for x in out["losses"])
    assert math.isfinite(out["train_loss"])
    assert out["trainer"].state.global_step == steps
    if gradient_checkpointing:
        assert any(getattr(model, a, False) for a in ("is_activation_checkpointing", "is_gradient_checkpointing"))
    else:  # Trainer's own checkpoint holds the adapter (PEFT layout, no full model), identical to the final one
        checkpoint = tmp_path / "work" / f"checkpoint-{steps}"
        saved = lorakit.io.files.read_weights(checkpoint)
        final = lorakit.io.files.read_weights(Path(out["adapter_dir"]))
        assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)
        assert not (checkpoint / "config.json").exists()

    # base weights unchanged, every adapter trained (B started at zero)
    after = base_state(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    lora_B = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert lora_B and all(p.abs().max() > 0 for p in lora_B)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)

    # the saved adapter reloads into a fresh base model with the same outputs
    assert (Path(out["adapter_dir"]) / "adapter_model.safetensors").is_file()
    reloaded = lorakit.load_adapter(example.build_model(seed=0).eval(), out["adapter_dir"])
    ids = example.CountingData(size=2, seed=5).ids
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-5)
        with lorakit.disabled(model):
            base_logits = model(ids).logits
        assert not torch.allclose(model(ids).logits, base_logits, atol=1e-4)
