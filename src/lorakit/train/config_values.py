"""A YAML run file as users write it: YAML 1.2 scalars, each value converted to its field's type, transformers'
names accepted as aliases, and an unknown key or a wrong value named with the file and the closest valid key.

Pure functions over a field-name -> type-hint mapping (`typing.get_type_hints(TrainConfig)`), so a field added to
TrainConfig is read, converted and checked with no change here.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any

import yaml

from ..errors import ConfigError
from ..peft_fields import as_bool

NONE_WORDS = ("none", "null", "~")  # a string that means "no value" for an optional field
ALIASES = {  # transformers' / TRL's names -> TrainConfig's
    "num_train_epochs": "epochs",
    "output_dir": "out",
    "model_name_or_path": "model",
    "max_seq_length": "max_length",
    "resume_from_checkpoint": "resume",
}
PRECISION_FLAGS = ("bf16", "fp16")  # TrainingArguments' `bf16: true` / `fp16: true` -> mixed_precision


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's booleans and floats: only true/false are booleans (`mixed_precision: no` stays
    the string "no"), and `1e-3` is a float (YAML 1.1 needs `1.0e-3`)."""


_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_12 = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+)"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_Yaml12Loader.yaml_implicit_resolvers = {  # a copy for this class only; SafeLoader itself is not changed
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _rx, _firsts in (("tag:yaml.org,2002:bool", _BOOL_12, "tTfF"),
                           ("tag:yaml.org,2002:float", _FLOAT_12, "-+0123456789.")):
    for _first in _firsts:
        _Yaml12Loader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, (_tag, _rx))


def load_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 scalars (see _Yaml12Loader).

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def type_name(hint: Any) -> str:
    """A type hint as a user reads it: `float`, `list of str`, `str or none`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (str,)
        return f"list of {type_name(item)}"
    if typing.get_origin(hint) is dict or hint is dict:
        return "KEY=VALUE,..."
    return getattr(hint, "__name__", str(hint))


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""), 0)  # "8", "0x10", "1_000"
        except ValueError:
            value = float(value.strip())  # "1e3"; "abc" raises
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 8.0
    raise ValueError("not a whole number")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return float(value.strip().replace("_", ""))  # "1e-3", "2.5"
    raise ValueError("not a number")


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `seed_file: 42` -> "42"; booleans and containers are refused
    raise ValueError("not a string")


def _to_list(value: Any, item: Any, key: str) -> list[Any]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError("not a list")
    if isinstance(value, str):
        items = [part.strip() for part in items if part.strip()]  # "a, b" -> ["a", "b"]
    return [convert_value(v, item, f"{key}[{i}]") for i, v in enumerate(items)]


def _to_dict(value: Any, key: str) -> dict[str, Any]:
    """A mapping, or "k=v,k2=v2" from the command line with each value read as YAML ("12" -> 12, "true" -> True)."""
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str):
        raise ValueError("not a mapping")
    if value.strip().startswith("{"):  # a mapping written as YAML / JSON text: "{}", "{init_r: 12}"
        mapping = yaml.safe_load(value)
        if not isinstance(mapping, dict):
            raise ValueError("not a mapping")
        return mapping
    out: dict[str, Any] = {}
    for part in (p.strip() for p in value.split(",") if p.strip()):
        name, sep, text = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{part!r} is not KEY=VALUE")
        out[name.strip()] = yaml.safe_load(text.strip()) if text.strip() else ""
    return out


def _matches(value: Any, hint: Any) -> bool:
    """True when `value` already has type `hint` (no conversion needed)."""
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(hint) is list:
        return isinstance(value, list)
    return isinstance(hint, type) and isinstance(value, hint)


def convert_value(value: Any, hint: Any, key: str) -> Any:
    """`value` (from YAML or any other text source) as type `hint`: "8" -> 8, "1e-3" -> 1e-3, 16 -> 16.0,
    "true" / "no" -> a bool, "a, b" -> ["a", "b"] for a list field, null / "none" -> None for an optional one.

    Raises:
        ConfigError: no conversion fits; the message names `key`, the expected type and the value.
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if type(None) in arms and (value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)):
            return None
        if any(_matches(value, arm) for arm in arms):
            return value
        for arm in (a for a in arms if a is not type(None)):
            try:
                return convert_value(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(_wrong_type(key, hint, value))
    if hint is bool:
        return as_bool(value, key)
    converters = {int: _to_int, float: _to_float, str: _to_str}
    try:
        if typing.get_origin(hint) is list:
            return _to_list(value, (typing.get_args(hint) or (str,))[0], key)
        if typing.get_origin(hint) is dict or hint is dict:
            return _to_dict(value, key)
        if hint in converters:
            return converters[hint](value)
    except (ValueError, TypeError, OverflowError):
        pass
    else:
        return value  # a type with no converter (Any, dict, ...): as given
    raise ConfigError(_wrong_type(key, hint, value))


def _wrong_type(key: str, hint: Any, value: Any) -> str:
    return f"{key} expects {type_name(hint)}; got {value!r} ({type(value).__name__})"


def closest_key(key: str, known: typing.Iterable[str]) -> str | None:
    """The valid key nearest to a misspelt one (`learning_rat` -> `learning_rate`), or None."""
    names = list(known) + list(ALIASES)
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return match[0] if match else None


def _apply_aliases(values: dict[str, Any], where: str) -> dict[str, Any]:
    """transformers' names -> TrainConfig's; `bf16: true` / `fp16: true` -> mixed_precision (false: no effect)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name in out and out[name] != value:
            raise ConfigError(f"{where}: {key} and {name} are the same option with different values "
                              f"({value!r} and {out[name]!r}); give one")
        out[name] = value
    chosen = [flag for flag in PRECISION_FLAGS if flag in out and as_bool(out.pop(flag), f"{where}: {flag}")]
    if len(chosen) > 1:
        raise ConfigError(f"{where}: bf16 and fp16 are both true; give one (or mixed_precision: bf16 | fp16)")
    if chosen and out.get("mixed_precision", chosen[0]) != chosen[0]:
        raise ConfigError(f"{where}: {chosen[0]}: true conflicts with mixed_precision: "
                          f"{out['mixed_precision']!r}; give one of them")
    if chosen:
        out["mixed_precision"] = chosen[0]
    return out


def convert_fields(values: dict[str, Any], hints: dict[str, Any], where: str) -> dict[str, Any]:
    """A mapping of option: value (a YAML file's) as TrainConfig's fields: aliases resolved, each value converted
    to its field's type.

    Raises:
        ConfigError: an unknown key (with the closest valid key), or a value of the wrong type; the message
            starts with `where` (the file) and names the key, the expected type and the value.
    """
    values = _apply_aliases(values, where)
    unknown = [str(key) for key in values if key not in hints]
    if unknown:
        named = []
        for key in unknown:
            near = closest_key(key, hints)
            named.append(f"{key} (did you mean {near}?)" if near else key)
        raise ConfigError(f"{where}: unknown option(s) {', '.join(named)}; `lorakit train --help` lists them")
    converted = {}
    for key, value in values.items():
        try:
            converted[key] = convert_value(value, hints[key], key)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
    return converted


__all__ = ["ALIASES", "closest_key", "convert_fields", "convert_value", "load_yaml", "type_name"]
