"""LoraConfig: the typed, validated description of one adapter.

Field names are lorakit's own (`alpha`, `dropout`, `init`); PEFT's names (`lora_alpha`, `lora_dropout`,
`init_lora_weights`, ...) are accepted too (see peft_fields.py), and `to_peft_dict` / `from_peft_dict` /
`from_peft` map to and from PEFT's adapter_config.json and `peft.LoraConfig`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .ops.loftq import check_loftq_config
from .patterns import check_pattern
from .peft_fields import ALIASES, BOOL_FIELDS, as_bool, peft_file_kwargs, plain, to_lorakit_kwargs
from .variants.protocol import check_options
from .variants.registry import VARIANTS, variant_named, variants_for_peft_type

INITS = ("kaiming", "gaussian", "random", "pissa", "olora", "loftq")  # + "pissa_niter_<n>" (randomised SVD)
# kaiming/gaussian: B = 0; "random": B random too (tests); pissa/olora: B, A from W0, the base keeps the residual;
# loftq: B, A from W0 - Q, the base keeps Q = NF4(W0 - s B A) dequantised (lorakit.loftq)
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
BIASES = ("none", "all", "lora_only")
ADAPTER_DTYPES = ("float32", "float16", "bfloat16", "base")  # "base": the base weight's dtype
MAX_DROPOUT = 0.99  # kept inputs are scaled by 1 / (1 - p): at most 100, finite in every dtype (fp16 too)

# PEFT's `init_lora_weights` values <-> lorakit's `init`
_INIT_TO_PEFT: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian", "random": False}
_NAMES_ONLY = re.compile(r"[\w.\s,-]+")  # names, dotted suffixes, commas: no regex metacharacter


def parse_target_spec(text: str) -> list[str] | str:
    """A target_modules string as written on a command line or in YAML: "all-linear" stays; names and dotted
    suffixes ("q_proj,v_proj", "mlp.down_proj") become a list; anything with a regex metacharacter
    (`* [ ] ( ) | ^ $ \\ + ? { }`) stays a regex matched against the whole module path."""
    text = text.strip()
    if text.lower() == "all-linear":
        return "all-linear"
    if _NAMES_ONLY.fullmatch(text):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


@dataclass
class LoraConfig:
    """One LoRA adapter: h = W0 x + s * B A dropout(x), s = alpha / r (or alpha / sqrt(r) with rsLoRA).

    PEFT's names are accepted as constructor arguments: `lora_alpha`, `lora_dropout`, `init_lora_weights`
    (True, False, "gaussian", "pissa", "pissa_niter_<n>", "olora"), and PEFT's metadata fields (`peft_type`,
    `inference_mode`, `revision`, ...); read back as properties `lora_alpha`, `lora_dropout`, `init_lora_weights`.

    Raises:
        ConfigError: on construction, for any invalid field (the message names the field and value), an alias
            and its field with different values, an unknown field, or a PEFT feature lorakit does not implement
            switched on (`use_qalora`, `eva_config`, `layer_replication`, ...); lora_bias=True with an init other
            than kaiming / random or a method without a bias on B (DoRA).
    """

    r: int = 8  # rank of the update B A
    alpha: float = 8.0  # scaling numerator: s = alpha / r (PEFT: lora_alpha)
    target_modules: list[str] | str | None = None  # names / dotted suffixes, a full-match regex, or "all-linear"
    dropout: float = 0.0  # dropout on the adapter's input, in [0, 0.99] (PEFT: lora_dropout)
    bias: str = "none"  # which biases train: "none" | "all" | "lora_only"
    use_rslora: bool = False  # rank-stabilised scaling s = alpha / sqrt(r)
    init: str = "kaiming"  # "kaiming" (PEFT default) | "gaussian" N(0, 1/r) | "pissa" | "pissa_niter_<n>" | "olora"
    method: str = "lora"  # the variant (lorakit.variants registry): lora | dora | ... ("dora" = use_dora=True)
    options: dict[str, Any] = field(default_factory=dict)  # the method's own fields (its declared Options)
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
    lora_bias: bool = False  # PEFT's lora_bias: a trained bias b on B, out += s · (B A x + b), merged into the base bias
    loftq_config: dict[str, int] = field(default_factory=dict)  # init="loftq": {"loftq_bits": 4, "loftq_iter": n}

    def __post_init__(self) -> None:
        self._normalise()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        _check_alpha("alpha", self.alpha)
        check_dropout("LoraConfig.dropout", self.dropout)
        _check_choice("bias", self.bias, BIASES)
        if not (isinstance(self.init, str) and _PISSA_NITER.fullmatch(self.init)):
            _check_choice("init", self.init, INITS)
        _check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        self.loftq_config = check_loftq_config(self.loftq_config, self.init == "loftq", "LoraConfig.loftq_config")
        peft_type = variant_named(self.method).peft_type
        if self.init == "loftq" and peft_type != "LORA":
            raise ConfigError(f"LoraConfig.init='loftq' is an init of LoRA files (peft_type LORA); method "
                              f"{self.method!r} writes {peft_type} files and has none (PEFT refuses it too)")
        if self.lora_bias and self.init not in ("kaiming", "random"):
            raise ConfigError(f"LoraConfig.lora_bias=True needs init 'kaiming' or 'random' (PEFT: init_lora_weights "
                              f"True or False), found init={self.init!r}")
        if self.lora_bias and not variant_named(self.method).abilities.lora_bias:
            raise ConfigError(f"LoraConfig.lora_bias=True: method {self.method!r} has no bias on B (PEFT refuses "
                              f"lora_bias with DoRA too); use method='lora'")
        for key, rank in self.rank_pattern.items():
            check_pattern("LoraConfig.rank_pattern key", key)
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        for key, value in self.alpha_pattern.items():
            check_pattern("LoraConfig.alpha_pattern key", key)
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            check_pattern("LoraConfig.target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            check_pattern("LoraConfig.exclude_modules", self.exclude_modules)
        for pattern in [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []:
            check_pattern("LoraConfig.layers_pattern", pattern, max_loops=1)  # inside a 2-loop regex: see targeting
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ConfigError("LoraConfig.target_modules is empty: name at least one module, or use 'all-linear'")
        _check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern)

    def _normalise(self) -> None:
        """Booleans from strings, enums as values, sets as sorted lists, PEFT's spellings of "no value"; the method
        and its options checked against the variant registry (use_dora=True is method "dora")."""
        for name in BOOL_FIELDS:
            setattr(self, name, as_bool(getattr(self, name), f"LoraConfig.{name}"))
        self._normalise_method()
        if isinstance(self.task_type, enum.Enum):
            self.task_type = self.task_type.value
        if isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear":
            self.target_modules = "all-linear"
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, frozenset, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"LoraConfig.{name} must be a mapping of module pattern -> value, got {value!r}")
            setattr(self, name, dict(value or {}))
        layers = self.layers_to_transform
        if isinstance(layers, int) and not isinstance(layers, bool):
            self.layers_to_transform = [layers]
        elif isinstance(layers, (list, tuple)):
            self.layers_to_transform = list(layers) or None  # PEFT: an empty list selects no layer subset
        if isinstance(self.modules_to_save, str):  # one name, as PEFT's CLI users write it
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.base_model_name_or_path, os.PathLike):
            self.base_model_name_or_path = os.fspath(self.base_model_name_or_path)
        _check_types(self)

    def _normalise_method(self) -> None:
        if not isinstance(self.method, str):
            raise ConfigError(f"LoraConfig.method must be a string, got {self.method!r}")
        self.method = self.method.strip().lower().replace("-", "_")
        if self.use_dora and self.method not in ("lora", "dora"):
            raise ConfigError(f"LoraConfig: use_dora=True and method={self.method!r} name two methods; give one")
        if self.use_dora:
            self.method = "dora"
        self.use_dora = self.method == "dora"
        try:
            variant = variant_named(self.method)
        except KeyError as err:
            raise ConfigError(f"LoraConfig.method: {err.args[0]}") from None
        if not isinstance(self.options, dict):
            raise ConfigError(f"LoraConfig.options must be a mapping of option -> value, got {self.options!r}")
        try:
            self.options = check_options(variant, dict(self.options), "LoraConfig.options")
        except ValueError as err:
            raise ConfigError(str(err)) from None

    # -- PEFT's names, read back -------------------------------------------------------------------------
    @property
    def lora_alpha(self) -> float:
        """PEFT's name of `alpha`."""
        return self.alpha

    @property
    def lora_dropout(self) -> float:
        """PEFT's name of `dropout`."""
        return self.dropout

    @property
    def init_lora_weights(self) -> bool | str:
        """`init` as PEFT writes it: True (kaiming), False (random), or the init's name."""
        return _INIT_TO_PEFT.get(self.init, self.init)

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
        """adapter_config.json's fields, with PEFT's names: those of PEFT's config class of this method's peft_type
        (LoraConfig for lora / dora, written by lora_peft_dict; the variant's own otherwise)."""
        return variant_named(self.method).peft_config(self)

    def lora_peft_dict(self) -> dict[str, Any]:
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
            # LoftQ's A, B and Q are in the files: PEFT must not run LoftQ again on load (its own advice)
            "init_lora_weights": True if self.init == "loftq" else _INIT_TO_PEFT.get(self.init, self.init),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], where: str = "adapter_config.json") -> LoraConfig:
        """Build a config from PEFT's adapter_config.json fields (PEFT's defaults for missing ones; fields PEFT
        writes that mean nothing to lorakit are dropped, unknown set ones with a warning).

        Raises:
            ConfigError: unknown peft_type, a LoRA feature lorakit does not support, or an invalid value (the
                message starts with `where`).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of PEFT config fields, got {type(data).__name__}")
        peft_type = plain(data.get("peft_type")) or "LORA"
        if peft_type == "LORA":
            kwargs = peft_file_kwargs(data, _field_names(), where=f"{where}: ")
        else:  # another peft_type: the variant that reads it maps PEFT's fields to lorakit's
            readers = variants_for_peft_type(peft_type) if isinstance(peft_type, str) else []
            if not readers:
                known = sorted({cls.peft_type for cls in VARIANTS.values()})
                raise ConfigError(f"{where}: peft_type {peft_type!r} is not supported (lorakit reads {', '.join(known)})")
            kwargs = readers[0].config_from_peft(data, where)
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err

    @classmethod
    def from_peft(cls, config: Any) -> LoraConfig:
        """Convert a PEFT config: a `peft.LoraConfig` (read through its `to_dict()`) or its dict.

        Raises:
            ConfigError: `config` is neither, it is not a LoRA config, or it uses a PEFT feature lorakit does not
                implement (named in the message).
        """
        if isinstance(config, dict):
            return cls.from_peft_dict(config, where="PEFT config")
        to_dict = getattr(config, "to_dict", None)
        if not callable(to_dict):
            raise ConfigError(f"LoraConfig.from_peft: expected a peft.LoraConfig or a dict, got {type(config).__name__}")
        return cls.from_peft_dict(to_dict(), where=f"peft.{type(config).__name__}")

    @property
    def variant(self) -> str:
        """The name of the adapter class in `lorakit.variants.VARIANTS` this config builds (= method)."""
        return self.method

    @property
    def pissa_niter(self) -> int | None:
        """Power iterations of PiSSA's randomised SVD ("pissa_niter_<n>"), None for the exact SVD / other inits."""
        match = _PISSA_NITER.fullmatch(self.init)
        return int(match.group(1)) if match else None

    @property
    def residual_init(self) -> bool:
        """True when the init takes B, A out of W0 and leaves the residual in the base (PiSSA, OLoRA)."""
        return self.init in ("pissa", "olora") or self.pissa_niter is not None

    @property
    def init_from_weights(self) -> bool:
        """True when attach computes A, B from W0 (PiSSA, OLoRA, LoftQ) instead of drawing them at random."""
        return self.residual_init or self.init == "loftq"

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (validated again); PEFT's names are accepted.

        Raises:
            ConfigError: an invalid value, or an alias and its field with different values.
        """
        return dataclasses.replace(self, **to_lorakit_kwargs(changes, _field_names(), where="LoraConfig.replace: "))


def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(LoraConfig) if f.init)


def _accept_peft_names(init: Any) -> Any:
    """Wrap the dataclass __init__ so that PEFT's names and metadata fields are read as lorakit's."""

    @functools.wraps(init)
    def __init__(self: LoraConfig, *args: Any, **kwargs: Any) -> None:
        names = _field_names()
        if len(args) > len(names):
            raise ConfigError(f"LoraConfig takes at most {len(names)} positional arguments, got {len(args)}")
        given = dict(zip(names, args))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise ConfigError(f"LoraConfig: {', '.join(twice)} given both by position and by name")
        init(self, **to_lorakit_kwargs({**given, **kwargs}, names))

    signature = inspect.signature(init)
    aliases = [inspect.Parameter(alias, inspect.Parameter.KEYWORD_ONLY, default=None) for alias in ALIASES]
    __init__.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *aliases])
    return __init__


LoraConfig.__init__ = _accept_peft_names(LoraConfig.__init__)  # type: ignore[method-assign]


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


def _check_layer_selection(target: Any, layers: list[int] | None, pattern: Any) -> None:
    """layers_to_transform / layers_pattern: integer indices, a target they can restrict (PEFT's rules).

    Raises:
        ConfigError: a regex target with a layer selection, a layers_pattern without indices, a bad index.
    """
    if layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ConfigError(f"LoraConfig.layers_to_transform must be layer indices (integers >= 0), got {layers!r}")
    if isinstance(target, str) and target != "all-linear" and (layers is not None or pattern):
        raise ConfigError(
            f"LoraConfig.layers_to_transform={layers!r} / layers_pattern={pattern!r} cannot restrict a regex "
            f"target_modules={target!r}: the regex is matched against the whole module path, so put the layer "
            f"in it (e.g. r'.*\\.layers\\.1\\..*(q_proj|v_proj)'), or give the names as a list "
            f"(['q_proj', 'v_proj']) or 'all-linear'. PEFT refuses the same combination.")
    if pattern and layers is None:
        raise ConfigError(f"LoraConfig.layers_pattern={pattern!r} needs layers_to_transform (the indices to adapt "
                          f"in that layer list); without it every layer would be adapted")


def check_dropout(name: str, value: Any) -> None:
    """Dropout p in [0, MAX_DROPOUT]: the kept inputs are scaled by 1 / (1 - p), at most 100.

    Raises:
        ConfigError: not a number, NaN, negative, or above MAX_DROPOUT (1 - p near 0 would scale by ~inf).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_DROPOUT:
        raise ConfigError(f"{name} must be a number in [0, {MAX_DROPOUT}] (kept inputs are scaled by 1 / (1 - p), "
                          f"at most {1 / (1 - MAX_DROPOUT):.0f}), got {value!r}")


def _check_types(config: LoraConfig) -> None:
    """Module lists and names hold strings: a number, a mapping or nested lists is refused, naming the field.

    Raises:
        ConfigError: a field of the wrong type (the message names the field, the expected and the found type).
    """
    for name in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
        value = getattr(config, name)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list):
            raise ConfigError(f"LoraConfig.{name} must be a string or a list of strings, found "
                              f"{type(value).__name__} {value!r}")
        for item in value:
            if not isinstance(item, str):
                raise ConfigError(f"LoraConfig.{name} must be a string or a list of strings, found "
                                  f"{type(item).__name__} {item!r} in {value!r}")
    for name in ("task_type", "base_model_name_or_path"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"LoraConfig.{name} must be a string or None, found {type(value).__name__} {value!r}")
    for name in ("bias", "init", "adapter_dtype"):
        value = getattr(config, name)
        if not isinstance(value, str):
            raise ConfigError(f"LoraConfig.{name} must be a string, found {type(value).__name__} {value!r}")
