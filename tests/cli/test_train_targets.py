"""`lorakit train --target-modules`: names, dotted suffixes, comma lists, all-linear and regexes read as the
Python API reads them; string booleans in a YAML run file. End-to-end runs on a tiny Llama directory."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors import safe_open

from lorakit.cli.main import build_parser, main
from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig


def targets(text: str):
    return build_parser().parse_args(["train", "--target-modules", text]).target_modules


@pytest.mark.parametrize("text, parsed", [
    ("mlp.down_proj", ["mlp.down_proj"]),
    ("self_attn.q_proj,mlp.down_proj", ["self_attn.q_proj", "mlp.down_proj"]),
    ("q_proj, v_proj", ["q_proj", "v_proj"]),
    ("q_proj", ["q_proj"]),
    ("all-linear", "all-linear"),
    (r".*\.(q_proj|v_proj)", r".*\.(q_proj|v_proj)"),
    ("model.layers.[01].mlp.down_proj", "model.layers.[01].mlp.down_proj"),
    (r"layers\.\d{1,2}\.q_proj", r"layers\.\d{1,2}\.q_proj"),  # a comma inside a regex does not split it
])
def test_target_modules_flag_parsing(text, parsed) -> None:
    assert targets(text) == parsed


def test_a_yaml_string_target_is_read_like_the_flag() -> None:
    assert TrainConfig(target_modules="mlp.down_proj").target_modules == ["mlp.down_proj"]
    assert TrainConfig(target_modules=".*down_proj").target_modules == ".*down_proj"


def _adapter_modules(adapter_dir) -> set[str]:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return {key.split(".lora_")[0].removeprefix("base_model.model.") for key in f.keys()}


@pytest.fixture
def lm_data(tmp_path):
    path = tmp_path / "train.jsonl"
    records = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(3)
               for b in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_train_with_a_dotted_suffix_adapts_those_modules(tmp_path, causal_lm_dir, lm_data) -> None:
    out = tmp_path / "run"
    code = main(["train", "--model", str(causal_lm_dir), "--data", str(lm_data), "--out", str(out),
                 "--target-modules", "mlp.down_proj", "--max-steps", "2", "--batch-size", "4",
                 "--progress", "false", "--diagnostics-steps", "0"])
    assert code == 0
    assert _adapter_modules(out / "adapter") == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_yaml_string_booleans_are_booleans(tmp_path, causal_lm_dir, lm_data) -> None:
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"model": str(causal_lm_dir), "data": str(lm_data), "max_steps": 2,
                                        "progress": "false", "use_rslora": "no", "packing": "0",
                                        "completion_only": "yes", "diagnostics_steps": 0,
                                        "target_modules": "self_attn.q_proj", "r": 4, "lora_alpha": 8}))
    out = tmp_path / "out"
    assert main(["train", "--config", str(run_yaml), "--out", str(out)]) == 0
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (resolved["use_rslora"], resolved["packing"], resolved["progress"]) == (False, False, False)
    assert resolved["completion_only"] is True
    assert resolved["target_modules"] == ["self_attn.q_proj"]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_rslora"] is False
    assert _adapter_modules(out / "adapter") == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


@pytest.mark.parametrize("value", ["maybe", 2])
def test_a_yaml_boolean_that_is_neither_is_refused(tmp_path, capsys, value) -> None:
    with pytest.raises(ConfigError, match=rf"packing must be a boolean .*got {value!r}"):
        TrainConfig(packing=value)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"use_rslora": value}))
    assert main(["train", "--config", str(run_yaml)]) == 2
    err = capsys.readouterr().err
    assert "use_rslora must be a boolean" in err and "Traceback" not in err
