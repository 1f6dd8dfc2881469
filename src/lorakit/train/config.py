"""TrainConfig: every option of `lorakit train`, one typed dataclass.

The command line, the YAML file (`--config run.yaml`) and the resolved config saved next to the adapter all
come from these fields. Names follow transformers' TrainingArguments and PEFT where they have one
(`learning_rate`, `per_device_train_batch_size`, `lora_alpha`, ...). Flags use dashes: `--max-steps`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..checks import check_finite, check_seed
from ..config import LoraConfig, check_dropout, parse_target_spec
from ..errors import ConfigError
from ..loading.options import parse_device_name
from ..variants.registry import VARIANTS
from .config_values import convert_fields, convert_value, load_yaml

TASKS = ("auto", "causal-lm", "classification")
TRAINING_METHODS = ("lora_fa", "full")  # besides the registered variants: LoRA with A frozen, or every weight


def adapter_method(method: str) -> str:
    """The LoraConfig.method of a training method: itself, or "lora" for lora_fa (LoRA with A frozen)."""
    return "lora" if method == "lora_fa" else method


def methods() -> tuple[str, ...]:
    """--method's choices: every registered variant (lorakit.variants: lora, dora, adalora, vera, delta_lora, ...),
    lora_fa (LoRA with A frozen) and full (full fine-tuning)."""
    return (*VARIANTS, *TRAINING_METHODS)


SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")
BASE_DTYPES = ("auto", "fp32", "bf16", "fp16")  # the frozen base's dtype; auto: the checkpoint's own
QUANTIZE = ("none", "nf4")  # the frozen base's storage (QLoRA)
QUANTIZE_DTYPES = ("auto", "fp32", "bf16", "fp16")  # NF4 layers' compute dtype; auto: bf16 on a GPU, fp32 on the CPU


LOGGERS = ("jsonl", "tensorboard", "wandb")  # --report-to choices; jsonl is always written


def parse_report_to(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """`"jsonl,tensorboard"` (or a list) -> ["jsonl", "tensorboard"]; jsonl is always first.

    Raises:
        ConfigError: a name that is not one of LOGGERS (expected vs found).
    """
    if value is None:
        value = ""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    names = [n for n in names if n not in ("none", "jsonl")]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"report_to: unknown logger {unknown[0]!r}; expected a comma-separated list of "
                          f"{', '.join(LOGGERS)}")
    return ["jsonl", *dict.fromkeys(names)]


@dataclass
class TrainConfig:
    """The resolved configuration of one training run."""

    # what to train on
    model: str | None = None  # model directory (Hugging Face format) or model ID org/name[@rev]; none: the embedded MiniLM demo
    data: list[str] | str | None = None  # training data: .jsonl .json .csv .parquet or save_to_disk dir; several: a,b
    out: str = "runs/train"  # output directory: adapter, metrics, checkpoints, resolved config
    task: str = "auto"  # auto | causal-lm | classification (auto: classification if records have "label")
    eval_data: list[str] | str | None = None  # validation file(s); otherwise eval_fraction of data is held out
    eval_fraction: float = 0.0  # share of data held out for validation when eval_data is not given
    max_length: int = 512  # longer examples are truncated (and counted in a warning)
    packing: bool = False  # causal-lm: concatenate examples into max_length blocks
    completion_only: bool = True  # causal-lm: loss only on completion / response / assistant tokens
    # the adapter
    method: str = "lora"  # a variant (lora | dora | adalora | vera | delta_lora ...) | lora_fa (A frozen) | full
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own options, KEY=VALUE,...
    r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # scaling numerator, s = lora_alpha / r
    lora_dropout: float = 0.05  # dropout on the adapter input
    target_modules: list[str] | str = "all-linear"  # names, a regex string, or all-linear
    use_rslora: bool = False  # s = lora_alpha / sqrt(r)
    init: str = "kaiming"  # adapter init: kaiming | gaussian | pissa | pissa_niter_<n> | olora
    quantize: str | None = None  # none | nf4: store the frozen base's linear layers in 4-bit NormalFloat (QLoRA)
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16: the frozen base's dtype (auto: the checkpoint's); adapters fp32
    quantize_compute_dtype: str = "auto"  # auto | fp32 | bf16 | fp16: NF4 compute dtype (auto: bf16 on GPU, CPU fp32)
    # optimisation
    learning_rate: float = 2e-4  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW weight decay
    loraplus_ratio: float | None = None  # LoRA+: B learns this many times faster than A (e.g. 16); none: off
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant, after warm-up
    warmup_ratio: float = 0.03  # share of the steps spent warming up linearly from 0
    warmup_steps: int = 0  # warm-up steps (overrides warmup_ratio when > 0)
    per_device_train_batch_size: int = 8  # examples per micro-batch
    per_device_eval_batch_size: int = 16  # examples per evaluation batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    epochs: float = 1.0  # passes over the data (PEFT/transformers: num_train_epochs)
    max_steps: int = -1  # optimizer steps; overrides epochs when > 0
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast (CPU or GPU); fp16 adds loss scaling, bf16 needs none
    gradient_checkpointing: bool = False  # trade compute for activation memory
    seed: int = 42  # one seed for init, data order and dropout: two runs are identical
    # logging, evaluation, checkpoints
    logging_steps: int = 10  # log loss / lr / tokens per second every N steps
    eval_steps: int = 0  # evaluate every N steps (0: at the end only)
    save_steps: int = 0  # checkpoint every N steps (0: only the final adapter)
    save_total_limit: int = 2  # keep the last K checkpoints
    diagnostics_steps: int = 50  # adapter diagnostics every N steps (0: off)
    resume: str | None = None  # checkpoint directory to continue from; latest (bare --resume): newest in --out
    overwrite: bool = False  # replace the run already in --out (otherwise a used --out is refused)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: auto / cuda mean cuda:LOCAL_RANK)
    ddp_timeout: float = 1800.0  # under torchrun: seconds a process waits for the others before the run fails
    fsdp: bool = False  # under torchrun: shard the frozen base with FSDP2 instead of a whole copy per process
    progress: bool = True  # progress bar on a terminal
    report_to: str = "jsonl"  # loggers, comma-separated: jsonl (always written), tensorboard, wandb
    early_stopping_patience: int = 0  # stop after N evaluations without improvement (0: off; needs eval_steps)
    metric_for_best_model: str = "eval_loss"  # early stopping / load_best_at_end metric (*loss, *perplexity: lower)
    load_best_at_end: bool = False  # save (and load back) the adapter of the best evaluation, not the last step

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        for name, hint in field_types().items():  # "1e-3" -> 1e-3, "8" -> 8, "false" -> False (never truthy)
            setattr(self, name, convert_value(getattr(self, name), hint, name))
        for name, choices in (("task", TASKS), ("method", methods()), ("lr_scheduler_type", SCHEDULES),
                              ("mixed_precision", PRECISIONS), ("dtype", BASE_DTYPES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if isinstance(self.target_modules, str):  # as on the command line: "mlp.down_proj" is a suffix
            self.target_modules = parse_target_spec(self.target_modules)
        positive = ("r", "lora_alpha", "learning_rate", "max_length", "per_device_train_batch_size",
                    "per_device_eval_batch_size", "gradient_accumulation_steps", "epochs", "save_total_limit",
                    "ddp_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)!r}")
        for name in ("eval_fraction", "lora_dropout", "warmup_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1); got {getattr(self, name)!r}")
        check_dropout("lora_dropout", self.lora_dropout)  # at most MAX_DROPOUT: 1 / (1 - p) stays <= 100
        for name in ("logging_steps", "eval_steps", "save_steps", "diagnostics_steps", "warmup_steps",
                     "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        self._validate_numbers()
        self._validate_adapter_method()
        self._validate_quantize()
        self._validate_callbacks()
        if self.fsdp:
            self._validate_fsdp()

    def _validate_fsdp(self) -> None:
        """--fsdp trains a LoRA / DoRA / LoRA-FA adapter on a sharded base; what it cannot shard is refused by name."""
        residual = self.init in ("pissa", "olora") or str(self.init).startswith("pissa_niter_")
        for refused, why in ((self.method == "full", "method full (full fine-tuning)"),
                             (bool(self.quantize), f"quantize {self.quantize!r} (an NF4 base is not sharded)"),
                             (residual, f"init {self.init!r} (the saved adapter needs the whole base weights)"),
                             (self.mixed_precision == "fp16", "mixed_precision fp16 (loss scaling; use bf16)")):
            if refused:
                raise ConfigError(f"fsdp: --fsdp cannot train with {why}; drop --fsdp to train with "
                                  "DistributedDataParallel")

    def _validate_numbers(self) -> None:
        """Every float option finite (an infinite learning rate or epoch count is a mistake, not a setting), the
        seed in numpy's range, max_steps positive or -1 (train for `epochs`), the device one torch knows."""
        for name, hint in field_types().items():
            value = getattr(self, name)
            if float in typing.get_args(hint) + (hint,) and isinstance(value, float):
                check_finite(value, name)
        check_seed(self.seed, "seed")
        if self.max_steps != -1 and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be a positive number of optimizer steps, or -1 to train for "
                              f"`epochs`; got {self.max_steps!r}")
        try:
            parse_device_name(self.device)
        except ConfigError as err:
            raise ConfigError(f"device: {err}") from err

    def _validate_callbacks(self) -> None:
        """report_to names known loggers; early stopping and load_best_at_end need periodic evaluation."""
        self.report_to = ",".join(parse_report_to(self.report_to))
        if self.early_stopping_patience < 0:
            raise ConfigError(f"early_stopping_patience must be >= 0; got {self.early_stopping_patience!r}")
        for name, on in (("early_stopping_patience", self.early_stopping_patience > 0),
                         ("load_best_at_end", self.load_best_at_end)):
            if on and self.eval_steps <= 0:
                raise ConfigError(f"{name} needs evaluation during training: set eval_steps > 0 (got "
                                  f"{self.eval_steps}) and validation data (eval_data or eval_fraction)")

    def _validate_quantize(self) -> None:
        """quantize (none / nf4) and its compute dtype; a quantised base needs an adapter. With init pissa / olora
        the loop attaches first and quantises the residual base afterwards (QPiSSA)."""
        if self.quantize == "none":
            self.quantize = None
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}; got {self.quantize!r}")
        if self.quantize_compute_dtype not in QUANTIZE_DTYPES:
            raise ConfigError(f"quantize_compute_dtype must be one of {', '.join(QUANTIZE_DTYPES)}; "
                              f"got {self.quantize_compute_dtype!r}")
        if self.quantize is not None and self.method == "full":
            raise ConfigError(f"quantize={self.quantize!r} needs an adapter: method 'full' would train the "
                              f"quantised weights themselves; use lora, dora or lora_fa")

    def _validate_adapter_method(self) -> None:
        """init (checked by LoraConfig) and loraplus_ratio, which need an adapter method."""
        ratio = self.loraplus_ratio
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < float("inf"):
                raise ConfigError(f"loraplus_ratio must be a finite number > 0 (or none); got {ratio!r}")
            if self.method == "full":
                raise ConfigError("loraplus_ratio needs an adapter: method is 'full'; use lora, dora or lora_fa")
        if self.method != "full":
            try:
                LoraConfig(init=self.init)
            except ConfigError as err:
                raise ConfigError(f"init: {err}") from err
            options = dict(self.method_options)
            if "total_step" in VARIANTS[adapter_method(self.method)].options:
                options.setdefault("total_step", 10**9)  # the run fills in its own steps (loop.with_planned_steps)
            try:  # the method's options, checked by its variant's declared Options
                LoraConfig(method=adapter_method(self.method), options=options)
            except ConfigError as err:
                raise ConfigError(f"method_options: {err}") from err
        elif self.method_options:
            raise ConfigError(f"method_options {self.method_options!r}: method 'full' has no options")

    # -- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_sources(cls, yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
        """Defaults, then the YAML file, then the flags given on the command line.

        Raises:
            ConfigError: an unreadable YAML file, an unknown key (named, with the file), or an invalid value.
        """
        values: dict[str, Any] = {}
        if yaml_path:
            values.update(_read_yaml(yaml_path))
        values.update(overrides)
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(f"invalid training option: {err}") from err


def _read_yaml(path: str) -> dict[str, Any]:
    """A YAML run file's options, each converted to its field's type (see config_values)."""
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if data is None:  # an empty file (or only comments): the wrong file, most likely
        raise ConfigError(f"config file {path} is empty; expected a mapping of option: value")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value; found {type(data).__name__}")
    return convert_fields(data, field_types(), f"config file {path}")


def field_types() -> dict[str, Any]:
    """Field name -> resolved type annotation (for building the command line)."""
    return typing.get_type_hints(TrainConfig)


def field_help() -> dict[str, str]:
    """Field name -> the inline comment of the field, used as --help text."""
    import inspect

    helps: dict[str, str] = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith("#"):
            name = stripped.split(":", 1)[0].strip()
            helps[name] = stripped.split("#", 1)[1].strip()
    return helps


__all__ = ["TrainConfig", "field", "field_help", "field_types"]
