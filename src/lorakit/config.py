"""LoraConfig: the typed, validated description of one adapter.

Field names are lorakit's own (`alpha`, `dropout`, `init`); `to_peft_dict` / `from_peft_dict` map them to
and from the names PEFT writes in adapter_config.json (`lora_alpha`, `lora_dropout`, `init_lora_weights`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

INITS = ("kaiming", "gaussian", "random", "pissa", "olora")  # + "pissa_niter_<n>" (randomised SVD, n iterations)
# kaiming/gaussian: B = 0; "random": B random too (tests); pissa/olora: B, A from W0, the base keeps the residual
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
BIASES = ("none", "all", "lora_only")
ADAPTER_DTYPES = ("float32", "float16", "bfloat16", "base")  # "base": the base weight's dtype

# PEFT's `init_lora_weights` values <-> lorakit's `init`
_INIT_TO_PEFT: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian", "random": False}


@dataclass
class LoraConfig:
    """One LoRA adapter: h = W0 x + s * B A dropout(x), s = alpha / r (or alpha / sqrt(r) with rsLoRA).

    Raises:
        ConfigError: on construction, for any invalid field (the message names the field and value).
    """

    r: int = 8  # rank of the update B A
    alpha: float = 8.0  # scaling numerator: s = alpha / r (PEFT: lora_alpha)
    target_modules: list[str] | str | None = None  # names / dotted suffixes, a full-match regex, or "all-linear"
    dropout: float = 0.0  # dropout on the adapter's input, in [0, 1) (PEFT: lora_dropout)
    bias: str = "none"  # which biases train: "none" | "all" | "lora_only"
    use_rslora: bool = False  # rank-stabilised scaling s = alpha / sqrt(r)
    init: str = "kaiming"  # "kaiming" (PEFT default) | "gaussian" N(0, 1/r) | "pissa" | "pissa_niter_<n>" | "olora"
    use_dora: bool = False  # DoRA: a trainable magnitude per output row times the adapted direction
    lora_fa: bool = False  # LoRA-FA: A frozen after its init, only B trains (backward keeps A x, not x)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module pattern -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module pattern -> alpha
    exclude_modules: list[str] | str | None = None  # never wrap these (same matching as target_modules)
    layers_to_transform: list[int] | int | None = None  # only these layer indices
    layers_pattern: list[str] | str | None = None  # the name of the layer list, e.g. "layers" or "h"
    modules_to_save: list[str] | None = None  # fully trainable copies (e.g. a classifier head)
    adapter_dtype: str = "float32"  # dtype of A and B: float32 | float16 | bfloat16 | base
    fan_in_fan_out: bool = False  # weights stored (in, out), like GPT-2's Conv1D (detected automatically)
    task_type: str | None = None  # PEFT task type, e.g. "CAUSAL_LM", "SEQ_CLS" (metadata)
    base_model_name_or_path: str | None = None  # metadata written to adapter_config.json

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        _check_alpha("alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        _check_choice("bias", self.bias, BIASES)
        if not (isinstance(self.init, str) and _PISSA_NITER.fullmatch(self.init)):
            _check_choice("init", self.init, INITS)
        _check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            _check_regex("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ConfigError("LoraConfig.target_modules is empty: name at least one module, or use 'all-linear'")

    # -- per-module values ------------------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        """The rank of the module at `module_path` (rank_pattern first, then r), PEFT's matching rules."""
        key = match_pattern_key(self.rank_pattern, module_path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_path: str) -> float:
        """The alpha of the module at `module_path` (alpha_pattern first, then alpha)."""
        key = match_pattern_key(self.alpha_pattern, module_path)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scaling_for(self, module_path: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA, for the module at `module_path`."""
        from .ops.lora import lora_scaling

        return lora_scaling(self.alpha_for(module_path), self.rank_for(module_path), self.use_rslora)

    # -- PEFT's adapter_config.json ----------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The fields PEFT's LoraConfig reads, with PEFT's names."""
        target = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(target) if isinstance(target, list) else target,
            "exclude_modules": self.exclude_modules,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "init_lora_weights": _INIT_TO_PEFT.get(self.init, self.init),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_dora": self.use_dora,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], where: str = "adapter_config.json") -> LoraConfig:
        """Build a config from PEFT's adapter_config.json fields.

        Raises:
            ConfigError: unknown peft_type, a LoRA feature lorakit does not support yet, or an invalid value.
        """
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConfigError(f"{where}: peft_type {peft_type!r} is not supported (lorakit reads 'LORA')")
        for unsupported in ("use_qalora", "lora_bias"):
            if data.get(unsupported):
                raise ConfigError(f"{where}: {unsupported}=true is not supported by lorakit yet")
        init = data.get("init_lora_weights", True)
        init_name = {True: "kaiming", False: "random", "gaussian": "gaussian"}.get(init, init)
        if not isinstance(init_name, str) or not (init_name in INITS or _PISSA_NITER.fullmatch(init_name)):
            raise ConfigError(f"{where}: init_lora_weights={init!r} is not supported by lorakit")
        target = data.get("target_modules")
        return cls(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            target_modules=sorted(target) if isinstance(target, (list, set, tuple)) else target,
            dropout=data.get("lora_dropout", 0.0) or 0.0,
            bias=data.get("bias", "none"),
            use_rslora=bool(data.get("use_rslora", False)),
            init=init_name,
            use_dora=bool(data.get("use_dora", False)),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            modules_to_save=data.get("modules_to_save"),
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            task_type=data.get("task_type"),
            base_model_name_or_path=data.get("base_model_name_or_path"),
        )

    @property
    def variant(self) -> str:
        """The name of the adapter class in `lorakit.variants.VARIANTS` this config builds."""
        return "dora" if self.use_dora else "lora"

    @property
    def pissa_niter(self) -> int | None:
        """Power iterations of PiSSA's randomised SVD ("pissa_niter_<n>"), None for the exact SVD / other inits."""
        match = _PISSA_NITER.fullmatch(self.init)
        return int(match.group(1)) if match else None

    @property
    def residual_init(self) -> bool:
        """True when the init takes B, A out of W0 and leaves the residual in the base (PiSSA, OLoRA)."""
        return self.init in ("pissa", "olora") or self.pissa_niter is not None

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def match_pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    """The first key of `patterns` matching `module_path` as PEFT does: regex `(.*\\.)?(key)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"LoraConfig.{name} must be a positive number, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"LoraConfig.{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"LoraConfig.{name} is not a valid regular expression ({err}): {pattern!r}") from err
