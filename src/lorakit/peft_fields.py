"""PEFT's LoraConfig field names, read into lorakit's: the aliases (`lora_alpha` -> `alpha`, ...), PEFT's
fields that are metadata for lorakit, the PEFT features lorakit refuses when switched on, and string booleans.

Field list of PEFT 0.21 (`peft.tuners.lora.config.LoraConfig` and `peft.config.PeftConfig`).
"""

from __future__ import annotations

import difflib
import enum
import warnings
from collections.abc import Collection
from typing import Any

from .errors import ConfigError

# PEFT's name -> lorakit's field
ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
BOOL_FIELDS = ("use_rslora", "use_dora", "lora_fa", "fan_in_fan_out", "lora_bias")  # lorakit's boolean fields
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")

# PEFT fields that change nothing in lorakit (metadata, runtime settings, options of a feature that is off)
IGNORED = ("inference_mode", "revision", "auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
           "runtime_config")
# PEFT features lorakit does not implement: accepted only when off (None, False, empty)
UNSUPPORTED = {
    "use_qalora": "QA-LoRA",
    "eva_config": "EVA initialisation",
    "corda_config": "CorDA initialisation",
    "lora_ga_config": "LoRA-GA initialisation",
    "megatron_config": "Megatron's parallel linear layers",
    "layer_replication": "layer replication",
    "target_parameters": "adapters on bare nn.Parameters (MoE experts)",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "ensure_weight_tying": "tied adapters on tied weights",
}
# init_lora_weights values of PEFT that lorakit does not implement
UNSUPPORTED_INITS = ("eva", "corda", "orthogonal", "mica", "lora_ga")


def as_bool(value: Any, name: str) -> bool:
    """`value` as a boolean: a bool, 0 / 1, or "true"/"1"/"yes"/"on" and "false"/"0"/"no"/"off" (any case).

    Raises:
        ConfigError: anything else (the message names `name` and the value): never `bool("false") == True`.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ConfigError(f"{name} must be a boolean (true / false, yes / no, 1 / 0), got {value!r}")


def plain(value: Any) -> Any:
    """An enum member (PEFT's TaskType, PeftType) as its value; anything else as it is."""
    return value.value if isinstance(value, enum.Enum) else value


def init_from_peft(value: Any, where: str) -> Any:
    """PEFT's `init_lora_weights` as lorakit's `init`: True -> "kaiming", False -> "random", strings as they are.

    Raises:
        ConfigError: an init of PEFT's that lorakit does not implement (LoftQ, EVA, CorDA, ...).
    """
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        value = as_bool(value, f"{where}init_lora_weights")
    if isinstance(value, bool):
        return "kaiming" if value else "random"
    if value in UNSUPPORTED_INITS:
        raise ConfigError(f"{where}init_lora_weights={value!r} is not supported by lorakit (it implements True, "
                          f"False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora', 'loftq')")
    return value


def _is_off(value: Any) -> bool:
    """Whether a PEFT feature field holds its default, off value (None, False, an empty container)."""
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return not as_bool(value, "")
    return value is None or value is False or (isinstance(value, (dict, list, tuple, set)) and not value)


def _check_peft_only(key: str, value: Any, where: str) -> None:
    """peft_type must be LORA; a feature lorakit does not implement must be off."""
    if key == "peft_type":
        if value is not None and plain(value) != "LORA":
            raise ConfigError(f"{where}peft_type {plain(value)!r} is not supported (lorakit reads 'LORA')")
    elif key in UNSUPPORTED and not _is_off(value):
        raise ConfigError(f"{where}{key}={value!r}: {UNSUPPORTED[key]} is not implemented by lorakit; "
                          f"remove {key} (or leave it at its default) to use lorakit")


def to_lorakit_kwargs(values: dict[str, Any], fields: Collection[str], where: str = "LoraConfig: ",
                      strict: bool = True) -> dict[str, Any]:
    """lorakit's constructor arguments from arguments that may use PEFT's names.

    Args:
        values: field -> value, with lorakit's or PEFT's names.
        fields: lorakit's field names.
        where: prefix of every message (the class or the file).
        strict: an unknown name raises (a constructor call); otherwise it is dropped, with a warning when its
            value is set (a file written by a newer PEFT).

    Raises:
        ConfigError: an alias and its field given with different values, a PEFT feature lorakit does not
            implement switched on, an unsupported peft_type or init, or (strict) an unknown name.
    """
    out = {key: value for key, value in values.items() if key in fields}
    for key, value in values.items():
        if key in fields:
            continue
        if key in ALIASES:
            if value is None:  # the signature's default: not given
                continue
            field = ALIASES[key]
            value = init_from_peft(value, where) if key == "init_lora_weights" else value
            if field in values and values[field] != value:
                raise ConfigError(f"{where}both {field}={values[field]!r} and its PEFT name {key}={values[key]!r} "
                                  f"were given, with different values; give one of them")
            out[field] = value
        elif key in IGNORED:
            continue
        elif key == "peft_type" or key in UNSUPPORTED:
            _check_peft_only(key, value, where)
        elif strict:
            known = sorted(set(fields) | set(ALIASES) | set(IGNORED) | set(UNSUPPORTED) | {"peft_type"})
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}unknown field {key!r}{hint}")
        elif not _is_off(value):
            warnings.warn(f"{where}field {key}={value!r} is unknown to lorakit and ignored", stacklevel=3)
    return out


def peft_file_kwargs(data: dict[str, Any], fields: Collection[str], where: str) -> dict[str, Any]:
    """lorakit's constructor arguments from a PEFT config dict (adapter_config.json, `peft.LoraConfig.to_dict()`):
    PEFT's defaults where a key is missing or null, enums as their values, sets as sorted lists.

    Raises:
        ConfigError: as `to_lorakit_kwargs`.
    """
    values = {key: plain(value) for key, value in data.items()}
    for key in ("target_modules", "exclude_modules"):
        if isinstance(values.get(key), (set, frozenset, tuple)):
            values[key] = sorted(values[key])
    for key in ("lora_dropout", "dropout"):
        if key in values and values[key] is None:
            values[key] = 0.0
    for key in ("rank_pattern", "alpha_pattern"):
        if key in values and (values[key] is None or isinstance(values[key], dict)):
            values[key] = dict(values[key] or {})  # anything else is refused by LoraConfig, naming the field
    return to_lorakit_kwargs(values, fields, where=where, strict=False)
