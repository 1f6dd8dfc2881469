"""An adapter name is a name (issue 15, section 3): every verb that takes one refuses paths, dots, separators,
control characters, "__base__", the empty name, non-strings and overlong names before anything changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama, token_ids
from lorakit.cli.main import main
from lorakit.layers import LoraLayer
from lorakit.mixed import BASE
from lorakit.names import MAX_NAME_BYTES, check_adapter_name, name_problem

CONFIG = lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])


def hostile_names(root: Path) -> list:
    """Names that are paths, reserved, empty, of the wrong type or too long (each breaks one rule)."""
    return [
        "", ".", "..", "../escape", "a/b", "a\\b", "C:escape", str(root / "outside"), "/", "a.b",
        "nul\x00byte", "new\nline", "tab\tname", "del\x7f", "c1\x85", BASE, "x" * (MAX_NAME_BYTES + 1),
        "é" * (MAX_NAME_BYTES // 2 + 1), 7, None, b"bytes", ("a",), ["a"],
    ]


def _files_under(root: Path) -> set[str]:
    return {os.path.join(d, f) for d, dirs, files in os.walk(root) for f in files + dirs}


def _fingerprint(model: torch.nn.Module) -> tuple:
    """What a refused call must leave as it was: module types, parameter names and values, adapters."""
    state = model.state_dict()
    return (
        tuple(type(m).__name__ for m in model.modules()),
        tuple(state),
        tuple(float(v.float().sum()) for v in state.values()),
        tuple(lorakit.adapter_names(model)) if lorakit.adapter_names(model) else (),
    )


def test_valid_names_pass_and_the_message_names_the_name_and_the_rule() -> None:
    for good in ("default", "math", "task_1", "A-b", "数学", "x" * MAX_NAME_BYTES, "__base"):
        assert check_adapter_name(good) == good
    with pytest.raises(lorakit.ConfigError, match=r"save_adapter\(name=...\) '\.\./x' is not a valid adapter name: "
                                                  r"it contains '\.'"):
        check_adapter_name("../x", "save_adapter(name=...)")
    with pytest.raises(lorakit.ConfigError, match=r"'a/b' .* path separator"):
        check_adapter_name("a/b")
    with pytest.raises(lorakit.ConfigError, match=r"control character '\\x00'"):
        check_adapter_name("a\x00")
    with pytest.raises(lorakit.ConfigError, match="must be a str, not int"):
        check_adapter_name(3)
    with pytest.raises(lorakit.ConfigError, match="characters\\) is not a valid adapter name: it is 100000 bytes"):
        check_adapter_name("y" * 100_000)  # the message stays short


def test_every_hostile_name_breaks_a_rule(tmp_path: Path) -> None:
    for name in hostile_names(tmp_path):
        assert name_problem(name) is not None, name


def test_attach_refuses_hostile_names_and_leaves_the_model_untouched(tmp_path: Path) -> None:
    model = tiny_llama(layers=1)
    before = _fingerprint(model)
    for name in hostile_names(tmp_path):
        with pytest.raises(lorakit.ConfigError, match="is not a valid adapter name"):
            lorakit.attach(model, CONFIG, name=name)
        assert _fingerprint(model) == before, name
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_load_adapter_refuses_hostile_names_before_reading_or_changing_the_model(tmp_path: Path) -> None:
    source = tiny_llama(layers=1)
    lorakit.attach(source, CONFIG, name="good")
    saved = lorakit.save_adapter(source, tmp_path / "adapters", name="good")
    model = tiny_llama(layers=1)
    before = _fingerprint(model)
    for name in hostile_names(tmp_path):
        with pytest.raises(lorakit.ConfigError, match="load_adapter.* is not a valid adapter name"):
            lorakit.load_adapter(model, saved, name=name)
        assert _fingerprint(model) == before, name  # no stray wrapper, no adapter
    lorakit.load_adapter(model, saved, name="good")  # the same file under a valid name loads
    assert lorakit.adapter_names(model) == ["good"]


def test_nothing_is_written_outside_the_directory_given(tmp_path: Path) -> None:
    """attach + save_adapter over every hostile name: no file appears anywhere under the tmp root but `out`."""
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    model = tiny_llama(layers=1)
    lorakit.attach(model, CONFIG, name="default")
    before = _files_under(tmp_path)
    for name in hostile_names(tmp_path):
        with pytest.raises(lorakit.LorakitError):
            lorakit.attach(model, CONFIG, name=name)
            lorakit.save_adapter(model, out, name=name)
        with pytest.raises(lorakit.ConfigError, match="save_adapter.* is not a valid adapter name"):
            lorakit.save_adapter(model, out, name=name)  # refused as a name, not only as an unknown adapter
    assert _files_under(tmp_path) == before
    lorakit.save_adapter(model, out)
    assert {p for p in _files_under(tmp_path) - before if not p.startswith(str(out) + os.sep)} == set()


def test_combine_refuses_hostile_new_and_input_names(tmp_path: Path) -> None:
    model = tiny_llama(layers=1)
    lorakit.attach(model, CONFIG, name="a")
    lorakit.attach(model, CONFIG, name="b")
    before = _fingerprint(model)
    for name in hostile_names(tmp_path):
        with pytest.raises(lorakit.ConfigError, match="combine.* is not a valid adapter name"):
            lorakit.combine(model, {"a": 0.5, "b": 0.5}, name=name)
        if isinstance(name, str):  # a mapping key can only be hashable; a list entry can be anything
            with pytest.raises(lorakit.ConfigError, match="combine: input adapter .* is not a valid adapter name"):
                lorakit.combine(model, {"a": 0.5, name: 0.5}, name="ab")
        with pytest.raises(lorakit.ConfigError, match="combine: input adapter .* is not a valid adapter name"):
            lorakit.combine(model, [0.5, 0.5], name="ab", adapters=["a", name])
        assert _fingerprint(model) == before, name


def test_swap_refuses_hostile_names_before_reading_any_file(tmp_path: Path) -> None:
    model = tiny_llama(layers=1)
    lorakit.attach(model, CONFIG, name="a")
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "files", name="a")
    before = _fingerprint(model)
    for name in hostile_names(tmp_path):
        with pytest.raises(lorakit.ConfigError, match="swap_adapter.* is not a valid adapter name"):
            lorakit.swap_adapter(model, name, tmp_path / "files")
        with pytest.raises(lorakit.ConfigError, match="prepare_swap.* is not a valid adapter name"):
            lorakit.prepare_swap(model, 4, names=["a", name])
        assert _fingerprint(model) == before, name


def test_verbs_on_existing_adapters_call_a_hostile_name_unknown(tmp_path: Path) -> None:
    model = tiny_llama(layers=1)
    lorakit.attach(model, CONFIG, name="a")
    before = _fingerprint(model)
    for name in hostile_names(tmp_path):
        for verb in (lorakit.delete_adapter, lorakit.get_config):
            with pytest.raises(lorakit.AdapterNameError, match="no adapter named"):
                verb(model, name)
        with pytest.raises(lorakit.AdapterNameError, match="no adapter named"):
            lorakit.set_active(model, ["a", name])  # (a single tuple or list is a list of names there)
        assert _fingerprint(model) == before and lorakit.active_adapters(model) == ["a"], name


def test_mixed_batch_rows_with_hostile_names_are_refused_by_position(tmp_path: Path) -> None:
    model = tiny_llama(layers=1)
    lorakit.attach(model, CONFIG, name="a")
    ids = token_ids(batch=2, length=4)
    for name in hostile_names(tmp_path):
        if name == BASE:
            continue  # "__base__" is the base model's row name there
        with pytest.raises(lorakit.LorakitError, match=r"adapter_names\[1\]"), torch.no_grad():
            model(input_ids=ids, adapter_names=["a", name])


@pytest.mark.parametrize("label", ["a.b", "ctl\x01", "__base__"])
def test_cli_combine_refuses_a_hostile_label(capsys, tmp_path: Path, label: str) -> None:
    code = main(["combine", "--model", str(tmp_path / "no-model"), "--adapter", f"{label}={tmp_path}:1",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "is not a valid adapter name" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
