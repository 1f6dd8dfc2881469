"""Loading a hostile or broken adapter (issue 15, section 2): the config's ranks are checked against the file's
tensor shapes before anything is allocated, and a failed load leaves the model exactly as it was."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.errors import LorakitError, ShapeMismatchError

CONFIG = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama()
    lorakit.attach(model, CONFIG)
    randomize_adapters(model)
    return lorakit.save_adapter(model, tmp_path_factory.mktemp("adapter") / "a")


def _copy(src: Path, dst: Path, config: dict[str, Any] | None = None,
          tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """The adapter in `src` written to `dst`, with config fields and tensors replaced."""
    dst.mkdir(parents=True)
    data = json.loads((src / "adapter_config.json").read_text())
    data.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(data))
    weights = load_file(str(src / "adapter_model.safetensors"))
    weights.update(tensors or {})
    save_file({k: v for k, v in weights.items() if v is not None}, str(dst / "adapter_model.safetensors"))
    return dst


def _snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """What a failed load must not change: module types by path, parameters (values, requires_grad), the
    state_dict's keys, the active adapters and the adapter names."""
    return {
        "types": {path: type(m).__name__ for path, m in model.named_modules()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "names": lorakit.adapter_names(model) if "_lorakit" in model.__dict__ else None,
        "active": lorakit.active_adapters(model) if "_lorakit" in model.__dict__ else None,
        "record": "_lorakit" in model.__dict__,
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["types"] == before["types"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["grad"] == before["grad"]
    assert (after["names"], after["active"], after["record"]) == (before["names"], before["active"], before["record"])


def test_absurd_r_is_refused_before_any_allocation(saved: Path, tmp_path: Path) -> None:
    bad = _copy(saved, tmp_path / "bad", {"r": 10**9})
    model = tiny_llama()
    start = time.perf_counter()
    with pytest.raises(ShapeMismatchError) as info:
        lorakit.load_adapter(model, bad)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "r=1000000000" in message and "model.layers.0.self_attn" in message and "(4, 32)" in message


def test_absurd_rank_pattern_names_its_key(saved: Path, tmp_path: Path) -> None:
    bad = _copy(saved, tmp_path / "bad", {"rank_pattern": {"v_proj": 10**9}})
    with pytest.raises(ShapeMismatchError, match=r"rank_pattern\['v_proj'\]=1000000000.*needs \(1000000000, 32\)"):
        lorakit.load_adapter(tiny_llama(), bad)


def test_tensor_rank_other_than_the_config_is_refused(saved: Path, tmp_path: Path) -> None:
    key = f"base_model.model.{Q0}.lora_B.weight"
    bad = _copy(saved, tmp_path / "bad", tensors={key: torch.zeros(32, 3)})
    with pytest.raises(ShapeMismatchError, match=r"q_proj.*lora_B.weight has shape \(32, 3\).*r=4.*\(32, 4\)"):
        lorakit.load_adapter(tiny_llama(), bad)


def test_a_consistent_rank_pattern_still_loads(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.attach(model, CONFIG.replace(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0}))
    randomize_adapters(model)
    path = lorakit.save_adapter(model, tmp_path / "a", vllm_check=False)
    loaded = lorakit.load_adapter(tiny_llama(), path)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def _failures(saved: Path, root: Path) -> dict[str, Path]:
    """One broken adapter per kind of failure, each found at a different stage of loading."""
    prefix = f"base_model.model.{Q0}"
    return {
        "absurd r": _copy(saved, root / "r", {"r": 10**9}),
        "tensor shape": _copy(saved, root / "shape", tensors={f"{prefix}.lora_A.weight": torch.zeros(4, 31)}),
        "missing B": _copy(saved, root / "noB", tensors={f"{prefix}.lora_B.weight": None}),
        "unexpected key": _copy(saved, root / "extra", tensors={f"{prefix}.lora_C.weight": torch.zeros(1)}),
        "wrong type": _copy(saved, root / "type", {"modules_to_save": 5}),
        "bad pattern": _copy(saved, root / "pattern", {"rank_pattern": {"(a+)+$": 2}}),
        "unknown module": _copy(saved, root / "module", tensors={
            "base_model.model.model.nope.lora_A.weight": torch.zeros(4, 32),
            "base_model.model.model.nope.lora_B.weight": torch.zeros(32, 4)}),
        "head shape": _copy(saved, root / "head", tensors={"base_model.model.lm_head.weight": torch.zeros(3, 3)}),
    }


@pytest.mark.parametrize("with_adapter", [False, True], ids=["plain model", "model with an adapter"])
def test_a_failed_load_leaves_the_model_as_it_was(saved: Path, tmp_path: Path, with_adapter: bool) -> None:
    model = tiny_llama()
    if with_adapter:
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["k_proj", "q_proj"]), name="mine")
        randomize_adapters(model)
        model.train()
    for kind, path in _failures(saved, tmp_path).items():
        before = _snapshot(model)
        with pytest.raises(LorakitError):
            lorakit.load_adapter(model, path, name="new")
        _assert_same(before, _snapshot(model))
        assert "new" not in (lorakit.adapter_names(model) if with_adapter else []), kind
