"""Every bad input gives the right lorakit exception class and a message naming what was wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
import lorakit.io.files
from conftest import randomize_adapters, tiny_llama
from lorakit.layers import LoraLayer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def message_has(err: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(err.value)
    missing = [p for p in parts if p not in text]
    assert not missing, f"message {text!r} does not mention {missing}"


def saved_adapter(tmp_path: Path, hidden: int = 32) -> Path:
    model = tiny_llama(hidden=hidden)
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return lorakit.save_adapter(model, tmp_path)


def no_adapter_left(model: nn.Module) -> bool:
    return lorakit.adapter_names(model) == [] and not any(isinstance(m, LoraLayer) for m in model.modules())


def test_hierarchy() -> None:
    for cls in (
        lorakit.ConfigError,
        lorakit.TargetError,
        lorakit.AdapterNameError,
        lorakit.AdapterFileError,
        lorakit.ShapeMismatchError,
        lorakit.MergeError,
    ):
        assert issubclass(cls, lorakit.LorakitError)
    assert issubclass(lorakit.ConfigError, ValueError)
    assert issubclass(lorakit.AdapterNameError, KeyError)
    assert issubclass(lorakit.AdapterFileError, OSError)
    assert str(lorakit.AdapterNameError("plain message")) == "plain message"  # no KeyError quoting


# ---------------------------------------------------------------------------------------------------------
# LoraConfig
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        (dict(r=0), ["LoraConfig.r", "positive", "0"]),
        (dict(r=-3), ["LoraConfig.r", "-3"]),
        (dict(r=2.5), ["LoraConfig.r", "2.5"]),
        (dict(alpha=0), ["LoraConfig.alpha", "positive", "0"]),
        (dict(alpha=-1.5), ["LoraConfig.alpha", "-1.5"]),
        (dict(alpha=float("nan")), ["LoraConfig.alpha", "nan"]),
        (dict(dropout=1.0), ["LoraConfig.dropout", "[0, 0.99]", "1.0"]),
        (dict(dropout=-0.1), ["LoraConfig.dropout", "[0, 0.99]", "-0.1"]),
        (dict(init="orthogonal"), ["LoraConfig.init", "'orthogonal'", "kaiming", "gaussian"]),
        (dict(bias="some"), ["LoraConfig.bias", "'some'", "none", "all", "lora_only"]),
        (dict(adapter_dtype="float8"), ["LoraConfig.adapter_dtype", "'float8'", "bfloat16"]),
        (dict(rank_pattern={"q_proj": 0}), ["rank_pattern['q_proj']", "0"]),
        (dict(alpha_pattern={"v_proj": -2}), ["alpha_pattern['v_proj']", "-2"]),
        (dict(target_modules="q_proj("), ["target_modules", "regular expression", "q_proj("]),
        (dict(target_modules=[]), ["target_modules", "empty"]),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_bad_config_values(kwargs: dict, parts: list[str]) -> None:
    with pytest.raises(lorakit.ConfigError) as err:
        lorakit.LoraConfig(**{"target_modules": ["q_proj"], **kwargs})
    message_has(err, *parts)


def test_attach_rejects_a_non_config() -> None:
    with pytest.raises(lorakit.ConfigError) as err:
        lorakit.attach(tiny_llama(), {"r": 4, "target_modules": ["q_proj"]})
    message_has(err, "LoraConfig", "dict")


# ---------------------------------------------------------------------------------------------------------
# targeting
# ---------------------------------------------------------------------------------------------------------
def test_no_module_matched_lists_close_names() -> None:
    model = tiny_llama()
    with pytest.raises(lorakit.TargetError) as err:
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_prj"]))
    message_has(err, "q_prj", "q_proj", "LlamaForCausalLM")
    hint = str(err.value).split("adapter:")[-1]
    names = [n.strip() for n in hint.split(",")]
    assert names[0] == "q_proj", f"the closest name should come first: {names}"
    assert "embed_tokens" not in names and "lm_head" not in names, f"unrelated names listed: {names}"
    assert no_adapter_left(model)


def test_no_module_matched_dotted_path_lists_close_paths() -> None:
    with pytest.raises(lorakit.TargetError) as err:
        lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["model.layers.0.self_attn.q_prj"]))
    message_has(err, "model.layers.0.self_attn.q_prj", "model.layers.0.self_attn.q_proj")


def test_no_module_matched_within_layers() -> None:
    with pytest.raises(lorakit.TargetError) as err:
        lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[7]))
    message_has(err, "layers", "[7]")


def test_unsupported_module_type() -> None:
    model = tiny_llama()
    with pytest.raises(lorakit.TargetError) as err:
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["self_attn"]))
    message_has(err, "model.layers.0.self_attn", "LlamaAttention", "Linear")
    assert no_adapter_left(model)


def test_grouped_convolution_is_refused() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Conv2d(4, 4, 3, groups=2)

    net = Net()
    with pytest.raises(lorakit.TargetError) as err:
        lorakit.attach(net, lorakit.LoraConfig(r=2, target_modules=["layer"]))
    message_has(err, "'layer'", "groups=2")
    assert no_adapter_left(net)


def test_non_zero_padding_mode_is_refused_at_attach() -> None:
    """Refused when attaching (a TargetError naming the module), not by the first forward pass."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
            self.head = nn.Linear(4, 2)

    net = Net()
    with pytest.raises(lorakit.TargetError) as err:
        lorakit.attach(net, lorakit.LoraConfig(r=2, target_modules=["head", "conv"]))
    message_has(err, "'conv'", "padding_mode='reflect'", "zeros")
    assert no_adapter_left(net)


# ---------------------------------------------------------------------------------------------------------
# adapter files
# ---------------------------------------------------------------------------------------------------------
def test_shape_mismatch_names_module_and_shapes(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path, hidden=32)
    model = tiny_llama(hidden=64)
    with pytest.raises(lorakit.ShapeMismatchError) as err:
        lorakit.load_adapter(model, directory)
    message_has(err, "model.layers.0.self_attn.q_proj", "(4, 32)", "(4, 64)")
    assert no_adapter_left(model), "a failed load left a half-attached adapter"


def test_missing_adapter_config(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(tiny_llama(), directory)
    message_has(err, "adapter_config.json", str(directory))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(tiny_llama(), tmp_path / "nowhere")
    message_has(err, "adapter_config.json", "nowhere")


def test_corrupt_json(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path)
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(tiny_llama(), directory)
    message_has(err, "adapter_config.json", "JSON")


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path)
    (directory / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(tiny_llama(), directory)
    message_has(err, "adapter_config.json", "object", "list")


def test_truncated_safetensors(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path)
    weights = directory / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    model = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(model, directory)
    message_has(err, "adapter_model.safetensors")
    assert re.search("corrupt|truncated", str(err.value))
    assert no_adapter_left(model)


def test_missing_weights_file(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(tiny_llama(), directory)
    message_has(err, "adapter_model.safetensors", "adapter_model.bin")


def test_unknown_peft_type(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["peft_type"] = "PROMPT_TUNING"
    (directory / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(model, directory)
    message_has(err, "PROMPT_TUNING", "LORA", "adapter_config.json")
    assert no_adapter_left(model)


def test_invalid_value_in_adapter_config(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["lora_dropout"] = 1.5
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(tiny_llama(), directory)
    message_has(err, "adapter_config.json", "dropout", "1.5")


def test_keys_for_modules_the_model_lacks(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path)
    model = tiny_llama(layers=1)  # the file has adapters for layer 1 too
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(model, directory)
    message_has(err, "model.layers.1.self_attn")
    assert no_adapter_left(model)


# ---------------------------------------------------------------------------------------------------------
# adapter names
# ---------------------------------------------------------------------------------------------------------
def test_duplicate_name_on_attach() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="mine")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(lorakit.AdapterNameError) as err:
        lorakit.attach(model, lorakit.LoraConfig(r=3, target_modules=["v_proj"]), name="mine")
    message_has(err, "'mine'", "already")
    assert lorakit.adapter_names(model) == ["mine"]
    assert not isinstance(model.model.layers[0].self_attn.v_proj, LoraLayer)
    assert set(before) == {n for n, _ in model.named_parameters()}


def test_duplicate_name_on_load(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path)
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["o_proj"]))
    with pytest.raises(lorakit.AdapterNameError) as err:
        lorakit.load_adapter(model, directory, name="default")
    message_has(err, "'default'", "already")
    assert lorakit.adapter_names(model) == ["default"]
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LoraLayer)


@pytest.mark.parametrize("name", ["", "a.b", 3])
def test_invalid_adapter_name(name) -> None:
    with pytest.raises(lorakit.ConfigError) as err:
        lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name=name)
    message_has(err, "adapter name", repr(name))


def test_unknown_name_in_set_active() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="first")
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), name="second")
    with pytest.raises(lorakit.AdapterNameError) as err:
        lorakit.set_active(model, ["first", "thrid"])
    message_has(err, "'thrid'", "first", "second")
    assert lorakit.active_adapters(model) == ["second"]  # unchanged


@pytest.mark.parametrize("verb", ["delete_adapter", "get_config", "merge"])
def test_unknown_name_elsewhere(verb: str) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    call = {
        "delete_adapter": lambda: lorakit.delete_adapter(model, "nope"),
        "get_config": lambda: lorakit.get_config(model, "nope"),
        "merge": lambda: lorakit.merge(model, ["nope"]),
    }[verb]
    with pytest.raises(lorakit.AdapterNameError) as err:
        call()
    message_has(err, "'nope'", "default")


# ---------------------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------------------
def test_safe_merge_with_nan_merges_nothing() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    bad = "model.layers.1.self_attn.v_proj"  # the last wrapped layer: every other one would merge first
    with torch.no_grad():
        model.get_submodule(bad).adapters["default"].lora_B[0, 0] = float("nan")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    assert len(weights) == 4
    with pytest.raises(lorakit.MergeError) as err:
        lorakit.merge(model, safe=True)
    message_has(err, bad, "'default'", "NaN")
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), f"{n} changed although the merge was refused"
    assert all(not m.merged for m in model.modules() if isinstance(m, LoraLayer))


def test_safe_merge_and_unload_with_inf_keeps_the_adapters() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A[1, 3] = float("inf")
    with pytest.raises(lorakit.MergeError) as err:
        lorakit.merge_and_unload(model, safe=True)
    message_has(err, "model.layers.0.self_attn.q_proj")
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLayer)
    assert lorakit.adapter_names(model) == ["default"]


def test_merge_and_unload_inside_disabled_is_refused() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with lorakit.disabled(model):
        with pytest.raises(lorakit.MergeError) as err:
            lorakit.merge_and_unload(model)
    message_has(err, "disabled")


# ---------------------------------------------------------------------------------------------------------
# atomic save
# ---------------------------------------------------------------------------------------------------------
def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _half_written_save_file(original):
    """A save_file that writes half of the real bytes, then fails like a full disk."""

    def fake(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        path = Path(filename)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    return fake


def test_atomic_save_when_weights_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    before = _snapshot(tmp_path)
    assert set(before) == {"adapter_config.json", "adapter_model.safetensors"}

    randomize_adapters(model, seed=7)  # changed weights
    monkeypatch.setattr(lorakit.io.files, "save_file", _half_written_save_file(lorakit.io.files.save_file))
    with pytest.raises(OSError, match="No space left on device"):
        lorakit.save_adapter(model, tmp_path)
    assert _snapshot(tmp_path) == before, "the previous adapter files changed, or a temporary file was left"

    monkeypatch.undo()  # and the directory still loads as the previous adapter
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)


def test_atomic_save_when_config_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    before = _snapshot(tmp_path)
    randomize_adapters(model, seed=7)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lorakit.io.peft, "write_json", lambda data: full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        lorakit.save_adapter(model, tmp_path)
    assert _snapshot(tmp_path) == before


def test_atomic_save_into_a_new_directory_leaves_no_partial_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.setattr(lorakit.io.files, "save_file", _half_written_save_file(lorakit.io.files.save_file))
    target = tmp_path / "new"
    with pytest.raises(OSError):
        lorakit.save_adapter(model, target)
    assert not target.exists() or list(target.iterdir()) == []
