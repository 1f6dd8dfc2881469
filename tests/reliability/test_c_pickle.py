"""A model with adapters pickles, torch.saves and deep-copies as a plain transformers model does (issue 15,
section 6): the copy computes the same outputs, keeps every lorakit verb, and carries no transient cache."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama, token_ids
from lorakit.layers import LoraLayer
from lorakit.ops import native


def _pickle(model: torch.nn.Module) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(model))


def _torch_save(model: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": _pickle, "torch.save": _torch_save, "deepcopy": copy.deepcopy}


def _model(use_dora: bool, dropout: float = 0.0) -> torch.nn.Module:
    model = tiny_llama(layers=1)
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora,
                                             dropout=dropout))
    lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"]), name="b")
    lorakit.set_active(model, "default")
    randomize_adapters(model)
    return model.eval()


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_round_trip_gives_the_same_outputs_and_keeps_the_verbs(how: str, use_dora: bool, tmp_path: Path) -> None:
    model = _model(use_dora)  # (not with gradient checkpointing on: transformers' own hook is a local function)
    ids = token_ids(batch=2, length=6)
    with torch.no_grad():
        reference = model(ids).logits
    twin = ROUND_TRIPS[how](model)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, reference)
    assert lorakit.adapter_names(twin) == ["default", "b"] and lorakit.active_adapters(twin) == ["default"]
    with torch.no_grad():  # the copy's adapters are its own
        next(m for m in twin.modules() if isinstance(m, LoraLayer)).adapters["default"].lora_B.add_(1.0)
        assert torch.equal(model(ids).logits, reference)
    lorakit.set_active(twin, "b")
    with torch.no_grad():
        mixed = twin(input_ids=ids, adapter_names=["b", "__base__"]).logits  # routing hooks came along
        assert torch.allclose(mixed[0], twin(ids).logits[0], atol=1e-5)
    assert twin.generate(ids, max_new_tokens=2, do_sample=False, adapter_names=["b", "b"],
                         attention_mask=torch.ones_like(ids), pad_token_id=0).shape == (2, 8)
    saved = lorakit.save_adapter(twin, tmp_path / how, name="b")
    assert (saved / "adapter_model.safetensors").is_file()
    plain = lorakit.merge_and_unload(twin)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())


@pytest.mark.skipif(native.library() is None, reason="no C compiler: lorakit's native kernels are not built")
@pytest.mark.parametrize("how", list(ROUND_TRIPS))
def test_round_trip_after_training_with_the_native_dropout_kernels(how: str) -> None:
    model = _model(use_dora=False, dropout=0.2).train()
    ids = token_ids(batch=2, length=6)
    model(ids, labels=ids).loss.backward()  # dropout masks drawn by the native Philox kernels
    twin = ROUND_TRIPS[how](model)
    twin.zero_grad()
    loss = twin(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    trained = [p for n, p in twin.named_parameters() if ".adapters.default." in n]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    twin.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)


def test_round_trip_of_an_nf4_base_with_a_dora_adapter(causal_lm_dir: Path) -> None:
    model = lorakit.load_model(causal_lm_dir, quantize="nf4")
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    randomize_adapters(model)
    model.eval()
    ids = token_ids(batch=2, length=6)
    with torch.no_grad():
        reference = model(ids).logits
    for how, round_trip in ROUND_TRIPS.items():
        with torch.no_grad():
            assert torch.equal(round_trip(model)(ids).logits, reference), how


def test_a_pickle_carries_no_mixed_batch_stack_cache() -> None:
    """A mixed forward caches stacked factors on every layer; they are rebuilt on use, never pickled."""
    model = _model(use_dora=False)
    before = len(pickle.dumps(model))
    ids = token_ids(batch=2, length=6)
    with torch.no_grad():
        reference = model(input_ids=ids, adapter_names=["default", "b"]).logits
    assert len(pickle.dumps(model)) == before
    twin = _pickle(model)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids, adapter_names=["default", "b"]).logits, reference)
