"""examples/configs/*.yaml: each file parses, and `lorakit train --config` runs it for two steps on a tiny model
directory, with model, data, out and max_steps given as flags (flags override the file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorakit.cli.main import main
from lorakit.train.config import TrainConfig, field_types
from lorakit.train.config_values import convert_fields, load_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
COLORS = ["red", "green", "blue", "yellow"]


def alpaca(path: Path) -> Path:
    records = [{"instruction": f"add {a} and {b} .", "input": "" if a % 2 else f"{a} plus {b}",
                "output": f"the answer is {(a + b) % 10} ."} for a in range(4) for b in range(4)]
    path = path.with_suffix(".json")
    path.write_text(json.dumps(records))  # Alpaca's own file is a JSON array
    return path


def chat(path: Path) -> Path:
    records = [{"messages": [{"role": "system", "content": "you say the color ."},
                             {"role": "user", "content": f"what is {c} ?"},
                             {"role": "assistant", "content": f"{c} is a color ."}]} for c in COLORS * 4]
    return _jsonl(path, records)


def prompt_completion(path: Path) -> Path:
    return _jsonl(path, [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"}
                         for a in range(4) for b in range(4)])


def labelled(path: Path) -> Path:
    records = [{"text": f"the {c} dog is {'happy' if i % 2 else 'sad'}", "label": "positive" if i % 2 else "negative"}
               for i, c in enumerate(COLORS * 5)]
    return _jsonl(path, records)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


EXAMPLES = {  # file -> (model dir fixture, data writer)
    "instruction_alpaca.yaml": ("causal_lm_dir", alpaca),
    "chat_sft.yaml": ("causal_lm_dir", chat),
    "qlora.yaml": ("causal_lm_dir", alpaca),
    "dora.yaml": ("causal_lm_dir", prompt_completion),
    "classification.yaml": ("classifier_dir", labelled),
}
OVERRIDDEN = {"model", "data", "out", "max_steps", "progress"}


def test_every_example_config_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_parses_and_names_its_model_and_data(name) -> None:
    path = CONFIGS / name
    text = path.read_text()
    cfg = TrainConfig.from_sources(str(path), {})
    assert cfg.model and cfg.data
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "Model:" in comments and "Data:" in comments and cfg.model in comments


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_trains_two_steps(tmp_path, request, name) -> None:
    fixture, write_data = EXAMPLES[name]
    model_dir = request.getfixturevalue(fixture)
    data = write_data(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    path = CONFIGS / name
    code = main(["train", "--config", str(path), "--model", str(model_dir), "--data", str(data),
                 "--out", str(out), "--max_steps", "2", "--no-progress"])
    assert code == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (resolved["model"], resolved["data"], resolved["out"], resolved["max_steps"]) == (
        str(model_dir), str(data), str(out), 2)
    from_file = TrainConfig.from_sources(str(path), {}).to_dict()
    for key in set(convert_fields(load_yaml(path.read_text()), field_types(), name)) - OVERRIDDEN:
        assert resolved[key] == from_file[key], key  # every setting of the file reached the run
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(isinstance(s.get("loss"), float) for s in steps)
