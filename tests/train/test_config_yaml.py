"""A YAML run file and `lorakit train` flags as users write them: values converted to each field's type, unknown
keys and wrong types named with the file and the closest key, transformers' names, `--learning_rate`, `--no-packing`."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lorakit.cli.main import build_parser, main
from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig, field_types
from lorakit.train.config_values import convert_value


def from_yaml(tmp_path, text: str) -> TrainConfig:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return TrainConfig.from_sources(str(path), {})


@pytest.mark.parametrize("line, name, expected", [
    ("learning_rate: 1e-3", "learning_rate", 1e-3),          # PyYAML alone reads this as the string "1e-3"
    ("learning_rate: '1e-3'", "learning_rate", 1e-3),
    ("r: '8'", "r", 8),
    ("lora_alpha: 16", "lora_alpha", 16.0),
    ("max_steps: 1e3", "max_steps", 1000),
    ("packing: 'true'", "packing", True),
    ("packing: on", "packing", True),
    ("completion_only: no", "completion_only", False),
    ("mixed_precision: no", "mixed_precision", "no"),        # YAML 1.1 would make this False
    ("loraplus_ratio: null", "loraplus_ratio", None),
    ("loraplus_ratio: none", "loraplus_ratio", None),
    ("loraplus_ratio: '16'", "loraplus_ratio", 16.0),
    ("target_modules: q_proj, v_proj", "target_modules", ["q_proj", "v_proj"]),
])
def test_yaml_values_take_their_fields_type(tmp_path, line, name, expected) -> None:
    value = getattr(from_yaml(tmp_path, line + "\n"), name)
    assert value == expected and type(value) is type(expected)


def test_every_field_reads_its_default_written_as_a_string(tmp_path) -> None:
    """Generic over the fields: one added to TrainConfig is converted with no change to the reader."""
    defaults = TrainConfig().to_dict()
    as_text = {name: "none" if value is None else str(value) for name, value in defaults.items()
               if not isinstance(value, list)}
    cfg = from_yaml(tmp_path, yaml.safe_dump(as_text))
    assert {name: getattr(cfg, name) for name in as_text} == {name: defaults[name] for name in as_text}


def test_the_resolved_config_reads_back_equal(tmp_path) -> None:
    cfg = TrainConfig(learning_rate=3e-4, target_modules="q_proj,v_proj", mixed_precision="bf16", packing=True)
    assert from_yaml(tmp_path, cfg.to_yaml()) == cfg


def test_python_constructor_converts_too() -> None:
    cfg = TrainConfig(learning_rate="1e-3", r="4", use_rslora="yes")
    assert (cfg.learning_rate, cfg.r, cfg.use_rslora) == (1e-3, 4, True)


@pytest.mark.parametrize("hint, value, expected", [
    (list[str], "a, b,,c", ["a", "b", "c"]),
    (list[int], "1,2", [1, 2]),
    (list[str] | None, "none", None),
    (int | None, "7", 7),
    (str | None, None, None),
])
def test_convert_value_is_generic_over_type_hints(hint, value, expected) -> None:
    assert convert_value(value, hint, "x") == expected


def test_unknown_key_names_the_file_and_the_closest_key(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        from_yaml(tmp_path, "learning_rat: 1e-3\nbatch_sise: 4\n")
    message = str(err.value)
    assert "run.yaml" in message
    assert "learning_rat (did you mean learning_rate?)" in message
    assert "batch_sise" in message


@pytest.mark.parametrize("line, parts", [
    ("r: abc", ["r expects int", "'abc'"]),
    ("max_steps: 2.5", ["max_steps expects int", "2.5"]),
    ("learning_rate: fast", ["learning_rate expects float", "'fast'"]),
    ("lora_alpha: [1, 2]", ["lora_alpha expects float", "[1, 2]"]),
    ("loraplus_ratio: high", ["loraplus_ratio expects float or none", "'high'"]),
    ("seed: true", ["seed expects int", "True"]),
    ("use_rslora: maybe", ["use_rslora must be a boolean", "'maybe'"]),
])
def test_wrong_type_names_key_type_value_and_file(tmp_path, line, parts) -> None:
    with pytest.raises(ConfigError) as err:
        from_yaml(tmp_path, line + "\n")
    message = str(err.value)
    assert str(tmp_path / "run.yaml") in message
    for part in parts:
        assert part in message


def test_transformers_names_are_aliases(tmp_path) -> None:
    cfg = from_yaml(tmp_path, "num_train_epochs: 3\noutput_dir: runs/x\nbf16: true\nmax_seq_length: 256\n")
    assert (cfg.epochs, cfg.out, cfg.mixed_precision, cfg.max_length) == (3.0, "runs/x", "bf16", 256)
    assert from_yaml(tmp_path, "fp16: false\n").mixed_precision == "no"


@pytest.mark.parametrize("text, part", [
    ("bf16: true\nfp16: true\n", "bf16 and fp16 are both true"),
    ("bf16: true\nmixed_precision: fp16\n", "conflicts with mixed_precision"),
    ("epochs: 2\nnum_train_epochs: 3\n", "num_train_epochs and epochs"),
])
def test_conflicting_aliases_are_refused(tmp_path, text, part) -> None:
    with pytest.raises(ConfigError, match=part):
        from_yaml(tmp_path, text)


def test_cli_reports_a_yaml_type_error_in_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: fast\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate expects float" in err and "run.yaml" in err and "Traceback" not in err


# -- flags ------------------------------------------------------------------------------------------------------
def parse(*argv: str) -> dict:
    args = vars(build_parser().parse_args(["train", *argv]))
    return {f.name: args[f.name] for f in dataclasses.fields(TrainConfig) if f.name in args}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig) if "_" in f.name])
def test_underscore_and_dash_spellings_are_the_same_flag(name) -> None:
    default = getattr(TrainConfig(), name)
    text = "none" if default is None else ",".join(default) if isinstance(default, list) else str(default)
    dashed = parse(f"--{name.replace('_', '-')}", text)
    assert dashed == parse(f"--{name}", text) == {name: default}


@pytest.mark.parametrize("name", [n for n, hint in field_types().items() if hint is bool])
def test_bare_boolean_flags(name) -> None:
    flag = name.replace("_", "-")
    assert parse(f"--{flag}") == {name: True}
    assert parse(f"--no-{flag}") == {name: False}
    assert parse(f"--{flag}", "false") == {name: False}     # the old spelling still works
    assert parse(f"--{flag}", "--seed", "3") == {name: True, "seed": 3}


def test_existing_aliases_keep_working() -> None:
    assert parse("--lr", "1e-3", "--batch-size", "4", "--rank", "16", "--num-train-epochs", "2") == {
        "learning_rate": 1e-3, "per_device_train_batch_size": 4, "r": 16, "epochs": 2.0}
    assert parse("--num_train_epochs", "2", "--batch_size", "4") == {"epochs": 2.0, "per_device_train_batch_size": 4}


@pytest.mark.parametrize("argv, part", [
    (["--max-steps", "2.5"], "expected int, got '2.5'"),
    (["--no-packing", "true"], "unrecognized arguments: true"),
    (["--packing", "maybe"], "expected true or false"),
])
def test_bad_flag_values_are_argparse_errors(capsys, argv, part) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", *argv])
    assert part in capsys.readouterr().err


def test_help_stays_readable() -> None:
    subparsers = build_parser()._subparsers._group_actions[0]
    text = subparsers.choices["train"].format_help()
    options = text.split("options:", 1)[1]
    assert "--learning_rate" not in options and "--no_packing" not in options   # accepted, not listed
    assert "--learning-rate" in text and "--no-packing" in text
    assert all(f"--{name.replace('_', '-')}" in text for name in field_types())


def test_flags_override_the_yaml(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-3\npacking: true\nr: 4\n")
    cfg = TrainConfig.from_sources(str(path), parse("--learning_rate", "5e-4", "--no-packing"))
    assert (cfg.learning_rate, cfg.packing, cfg.r) == (5e-4, False, 4)
