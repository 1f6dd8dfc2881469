"""The adapter family on the embedded demo (`lorakit train --methods lora,dora,adalora,vera,lora_fa,delta_lora,full`):
which methods a table may hold, and the settings each one trains with (the DemoSettings fields, turned into steps).

Pure functions: a method name and a DemoSettings in, the learning rate, epochs, rank, alpha, dropout and the
method's own options (TrainConfig.method_options) out. compare.py trains each through `lorakit train`'s loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..train.config import methods as known_methods

if TYPE_CHECKING:
    from .settings import DemoSettings

DEFAULT_METHODS: tuple[str, ...] = ("lora", "full")  # `lorakit train` with no --methods: LoRA vs full fine-tuning
FAMILY: tuple[str, ...] = ("lora", "dora", "adalora", "vera", "lora_fa", "delta_lora", "full")  # issue 17's table
DISPLAY = {"lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "vera": "VeRA", "lora_fa": "LoRA-FA",
           "delta_lora": "Delta-LoRA", "full": "full fine-tuning"}


@dataclass(frozen=True)
class MethodPlan:
    """How one method of the table trains: what `lorakit train --method <method> ...` is given."""

    method: str  # a TrainConfig.method: a registered variant, lora_fa or full
    learning_rate: float  # AdamW's peak learning rate (the head trains at the same rate)
    epochs: float  # passes over the training split
    r: int  # rank (AdaLoRA: init_r; VeRA: the shared projections' rank)
    lora_alpha: float  # scaling numerator (unused by VeRA, whose scale is its trained vectors)
    lora_dropout: float  # dropout on the adapter input
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig.method_options
    label: str = ""  # the table's row name


def parse_methods(methods: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"lora,dora,full"` (or a list) -> ("lora", "dora", "full"), in the order given; None: DEFAULT_METHODS.

    Raises:
        ConfigError: an empty list, a name repeated, or a name that is not a `lorakit train --method` (named, with
            the valid names).
    """
    if methods is None:
        return DEFAULT_METHODS
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    valid = known_methods()
    if not names:
        raise ConfigError(f"--methods: no method given; expected a comma-separated list of {', '.join(valid)}")
    for name in names:
        if name not in valid:
            raise ConfigError(f"--methods: unknown method {name!r}; expected a comma-separated list of "
                              f"{', '.join(valid)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--methods: {', '.join(repeated)} given twice; each method is one row of the table")
    return tuple(names)


def planned_steps(n_train: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps of a run: ceil(epochs x batches per epoch) (one process, no accumulation, as the demo)."""
    return max(1, math.ceil(epochs * math.ceil(n_train / batch_size)))


def adalora_options(s: DemoSettings, steps: int) -> dict[str, Any]:
    """AdaLoRA's schedule on a run of `steps` optimizer steps: budgeting starts after tinit, the mask is fixed for the
    last tfinal steps, a masking every deltaT steps. (total_step is the loop's: lorakit.train.loop.with_planned_steps.)"""
    tinit = int(s.adalora_tinit_fraction * steps)
    tfinal = int(s.adalora_tfinal_fraction * steps)
    return {"target_r": s.adalora_target_r, "tinit": tinit, "tfinal": tfinal,
            "deltaT": max(1, round(s.adalora_deltaT_fraction * steps))}


def plan(method: str, s: DemoSettings, n_train: int) -> MethodPlan:
    """The settings `method` trains with on a training split of `n_train` examples (see DemoSettings' comments).

    DoRA and LoRA-FA train as LoRA (same r, alpha, dropout, learning rate, epochs); a registered variant this
    table does not know yet does too, named by its registry name.

    Raises:
        ConfigError: a method that is not a `lorakit train --method`.
    """
    parse_methods([method])
    if method == "full":
        return MethodPlan(method, s.full_learning_rate, s.full_epochs, s.r, s.lora_alpha, s.lora_dropout,
                          label=DISPLAY["full"])
    lr, epochs = s.lora_learning_rate, s.lora_epochs
    r, alpha, dropout, options = s.r, s.lora_alpha, s.lora_dropout, {}
    steps = planned_steps(n_train, s.batch_size, epochs)
    if method == "vera":
        lr, r = s.vera_learning_rate, s.vera_r
        options = {"d_initial": s.vera_d_initial}
    elif method == "adalora":
        r, alpha = s.adalora_init_r, s.lora_alpha * s.adalora_init_r / s.r  # s = alpha / init_r stays LoRA's
        options = adalora_options(s, steps)
    elif method == "delta_lora":
        dropout = 0.0  # Delta-LoRA refuses dropout (the paper trains without)
        options = {"delta_lambda": s.delta_lambda,
                   "update_start_step": max(1, round(s.delta_start_fraction * steps))}
    return MethodPlan(method, lr, epochs, r, alpha, dropout, options, label(method, s))


def label(method: str, s: DemoSettings) -> str:
    """The table's row name: "LoRA r=8", "AdaLoRA r=12->8", "VeRA r=256", "full fine-tuning"."""
    if method == "full":
        return DISPLAY["full"]
    name = DISPLAY.get(method, method)
    if method == "adalora":
        return f"{name} r={s.adalora_init_r}->{s.adalora_target_r}"
    return f"{name} r={s.vera_r if method == 'vera' else s.r}"


def describe(p: MethodPlan) -> str:
    """One method's settings for the table's caption: "LoRA r=8: lr 0.002, 8 epochs, alpha 16, dropout 0.05"."""
    text = f"{p.label}: lr {p.learning_rate:g}, {p.epochs:g} epochs"
    if p.method != "full":
        if p.method != "vera":
            text += f", alpha {p.lora_alpha:g}"
        text += f", dropout {p.lora_dropout:g}"
    if p.options:
        text += ", " + ", ".join(f"{k}={v}" for k, v in p.options.items())
    return text


__all__ = ["DEFAULT_METHODS", "DISPLAY", "FAMILY", "MethodPlan", "adalora_options", "describe", "label",
           "parse_methods", "plan", "planned_steps"]
