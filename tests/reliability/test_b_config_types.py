"""Wrong types anywhere in a config (issue 15, section 2): every field of LoraConfig, given in Python or read
from adapter_config.json, refuses a value of the wrong type with a ConfigError naming the field, never a
TypeError or AttributeError; a failed load says which file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

import lorakit
from conftest import tiny_llama
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.peft_fields import ALIASES

# field -> values of the wrong type or out of range (a number for a list, a list for a number, a dict for a
# string, string booleans that are not booleans, nested garbage)
WRONG: dict[str, list[Any]] = {
    "r": ["8", [8], 8.5, True, {"r": 8}, 0],
    "alpha": ["16", [16], True, {"a": 1}, math.nan, math.inf],
    "target_modules": [5, {"q_proj": 1}, [5], [["q_proj"]], True, 1.5],
    "dropout": ["0.1", [0.1], True, {"p": 0.1}, math.nan, 1.0, 0.9999999],
    "bias": [5, ["none"], {"none": 1}, True],
    "use_rslora": ["maybe", 2, [True], {"a": 1}, 0.5],
    "init": [5, [1], {"a": 1}, 1.5],
    "use_dora": ["maybe", 2, [True], {"a": 1}],
    "lora_fa": ["maybe", 2, [True], {"a": 1}],
    "rank_pattern": [[1], "q:8", 5, {"q_proj": "8"}, {"q_proj": 8.5}, {"q_proj": None}, {5: 8}, {"q_proj": [8]}],
    "alpha_pattern": [[1], "x", 5, {"q_proj": "1"}, {"q_proj": None}, {5: 1.0}, {"q_proj": {"a": 1}}],
    "exclude_modules": [5, {"a": 1}, [5], [["v_proj"]], True],
    "layers_to_transform": ["1", [1.5], ["1"], {"a": 1}, [-1], [True], [[0]]],
    "layers_pattern": [5, [5], {"a": 1}, [["layers"]]],
    "modules_to_save": [5, [5], {"lm_head": 1}, [["lm_head"]], True],
    "adapter_dtype": [5, ["float32"], {"a": 1}],
    "fan_in_fan_out": ["maybe", 2, [True], {"a": 1}],
    "task_type": [5, ["CAUSAL_LM"], {"a": 1}],
    "base_model_name_or_path": [5, ["org/name"], {"a": 1}],
    "lora_bias": ["maybe", 2, [True], {"a": 1}],
    "loftq_config": [5, "x", [4], {"loftq_iters": 2}],
    "method": [5, ["lora"], {"a": 1}, "no_such_method"],
    "options": [5, "x", [1], {"no_such_option": 1}],
}
PEFT_NAME = {field: alias for alias, field in ALIASES.items()}  # alpha -> lora_alpha, ...
BASE = {"target_modules": ["q_proj"]}
NEEDS = {"layers_pattern": {"layers_to_transform": [0]}}  # a layers_pattern is only read with indices


def test_the_table_covers_every_field() -> None:
    assert set(WRONG) == {f.name for f in dataclasses.fields(LoraConfig) if f.init}


CASES = [(field, value) for field, values in WRONG.items() for value in values]


@pytest.mark.parametrize(("field", "value"), CASES, ids=[f"{f}={v!r}" for f, v in CASES])
def test_a_wrong_value_names_its_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        LoraConfig(**{**BASE, **NEEDS.get(field, {}), field: value})
    assert f"LoraConfig.{field}" in str(info.value)


FILE_CASES = [(f, v) for f, v in CASES if not (isinstance(v, dict) and any(not isinstance(k, str) for k in v))]


@pytest.mark.parametrize(("field", "value"), FILE_CASES, ids=[f"{f}={v!r}" for f, v in FILE_CASES])
def test_a_wrong_value_in_adapter_config_json_names_its_field(field: str, value: Any) -> None:
    data = {"peft_type": "LORA", **BASE, **NEEDS.get(field, {}), PEFT_NAME.get(field, field): value}
    with pytest.raises(ConfigError) as info:
        LoraConfig.from_peft_dict(json.loads(json.dumps(data)), where="x/adapter_config.json")  # JSON: no int keys
    assert str(info.value).startswith("x/adapter_config.json: ") and field in str(info.value)


def test_a_wrong_type_in_a_file_is_a_clean_load_error(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2, target_modules=["q_proj"]))
    path = lorakit.save_adapter(model, tmp_path / "a")
    for field, value in (("target_modules", 5), ("modules_to_save", 5), ("rank_pattern", [1]),
                         ("exclude_modules", {"a": 1}), ("task_type", 5)):
        data = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**data, field: value}))
        with pytest.raises(AdapterFileError, match=rf"adapter_config.json: LoraConfig.{field} "):
            lorakit.load_adapter(tiny_llama(), path)
        (path / "adapter_config.json").write_text(json.dumps(data))


def test_right_types_in_other_spellings_are_kept() -> None:
    config = LoraConfig(target_modules=("v_proj", "q_proj"), modules_to_save="lm_head", use_dora="yes",
                        base_model_name_or_path=Path("models/x"), layers_to_transform=1)
    assert config.target_modules == ["q_proj", "v_proj"] and config.modules_to_save == ["lm_head"]
    assert config.use_dora is True and config.base_model_name_or_path == str(Path("models/x"))
    assert config.layers_to_transform == [1]
