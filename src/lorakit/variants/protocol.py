"""The adapter protocol: what every variant (one file in lorakit/variants/) declares and implements.

The rest of lorakit asks a variant's declaration (`abilities`, `options`, `peft_type`, `param_groups`) instead of
checking its class or which methods it overrides. Adding a variant is one file plus one `register_variant` line;
the contract tests (tests/contracts/) run every registered variant on every layer kind it declares.

A variant is an nn.Module holding one adapter's tensors on one layer. Its class declares:

    name          the registry key (`LoraConfig(method=name)`, `lorakit train --method name`)
    peft_type     adapter_config.json's "peft_type" it reads and writes ("LORA", "ADALORA", "VERA")
    abilities     an Abilities: what lorakit may do with it (merge, mixed batches, hot swap, combine, ...)
    options       its own config fields (Option: default, check, PEFT's name), held in LoraConfig.options
    kinds         the layer kinds (layer_kinds names) it supports; attach refuses the others by name

and implements the `Adapter` methods below. Variants whose adapters share tensors across layers (VeRA's frozen
projections) or that act around the optimizer step (AdaLoRA's rank allocation, Delta-LoRA's base update) say so in
`abilities` and implement the class hooks `prepare` and `training_hook`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..layer_kinds import BaseLayer

if TYPE_CHECKING:
    from ..layer_kinds import LayerKind


class ConfigView(Protocol):
    """What a variant reads of an adapter's config (lorakit.LoraConfig has all of it; the protocol names only this,
    so that the registry LoraConfig checks methods against does not depend on LoraConfig itself)."""

    r: int
    alpha: float
    dropout: float
    init: str
    method: str
    options: dict[str, Any]
    target_modules: Any

    @property
    def residual_init(self) -> bool: ...  # PiSSA / OLoRA: W0 keeps the residual

    @property
    def init_from_weights(self) -> bool: ...  # A, B computed from W0 at attach (PiSSA, OLoRA, LoftQ)

    lora_bias: bool  # PEFT's lora_bias: a trained bias on B

    def rank_for(self, module_path: str) -> int: ...

    def scaling_for(self, module_path: str) -> float: ...

    def lora_peft_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Abilities:
    """What lorakit may do with a variant's adapters; every consumer asks these, never the class."""

    low_rank: bool = True  # the update is exactly s · B A of `lora_A`, `lora_B` (SVD, rank slider, vLLM's layout)
    merge: bool = True  # delta_weight / merge_into / unmerge_from are exact
    mixed_batches: bool = True  # rows of one batch may use different adapters (lorakit.mixed stacks A and B)
    hot_swap: bool = True  # lorakit.swap may overwrite its tensors in place (same shapes, padded rank)
    combine: bool = True  # an input of lorakit.combine (linear / cat / svd / ties / dare)
    vllm: bool = True  # vLLM serves its file as trained
    needs_base_output: bool = False  # add_to_output needs the base layer's own output (DoRA rescales it)
    shared_state: bool = False  # tensors shared by all its layers (VeRA's projections): `prepare` builds them
    trains_base: bool = False  # training also changes W0 (Delta-LoRA): the result is a merged model
    step_hook: bool = False  # acts around the optimizer step (`training_hook`): AdaLoRA, Delta-LoRA
    lora_bias: bool = False  # takes LoraConfig.lora_bias (PEFT's trained bias on B; LoraAdapter.enable_lora_bias)


@dataclass(frozen=True)
class Option:
    """One variant-specific config field: its default, a check (raises ValueError with the reason) and the name
    PEFT's config uses for it (None: not in PEFT's file)."""

    default: Any
    check: Callable[[Any], Any] | None = None  # returns the value, converted ("8" -> 8), or raises ValueError
    peft_name: str | None = None
    doc: str = ""


class TrainingHook(Protocol):
    """What a training loop calls for a variant with `abilities.step_hook` (lorakit's Trainer and the callback for
    transformers' Trainer both do): after each optimizer step, with the gradients still present. `state_dict` /
    `load_state_dict` carry the hook's run state through a checkpoint (lorakit's Trainer saves it beside the
    adapter and loads it on --resume and when it reloads the best checkpoint)."""

    def after_optimizer_step(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...  # what a checkpoint keeps of the run (tensors, numbers, lists)

    def load_state_dict(self, state: dict[str, Any]) -> None: ...  # {}: go on from the model's weights as they are


@runtime_checkable
class Adapter(Protocol):
    """The methods every variant implements (LoraAdapter is the reference implementation)."""

    r: int
    scale: float
    kind: LayerKind

    def add_to_output(self, base_layer: BaseLayer, x: torch.Tensor, out: torch.Tensor,
                      base_out: torch.Tensor | None = None) -> torch.Tensor:
        """out + this adapter's contribution (base_out: the base layer's own output, for needs_base_output)."""
        ...

    def fused_forward(self, base_layer: BaseLayer, x: torch.Tensor) -> torch.Tensor | None:
        """The whole adapted layer (base + this adapter) in one op, or None."""
        ...

    def delta_weight(self, base_layer: BaseLayer) -> torch.Tensor:
        """W' - W0 in fp32, in the layout of base_layer.weight."""
        ...

    def merge_into(self, base_layer: BaseLayer) -> None: ...

    def unmerge_from(self, base_layer: BaseLayer) -> None: ...

    def merge_refusal(self, base_layer: BaseLayer) -> str | None:
        """Why merge_into cannot merge into this base (lorakit.merge asks every layer before changing any), or None."""
        ...

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """{PEFT key suffix: tensor} of this layer (what the file holds under base_model.model.<path>.)."""
        ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Its parameters by role for optimizers: "A" and "B" (LoRA+ gives B ratio x the learning rate; LoRA-FA
        freezes "A"), "embedding" (both factors of an embedding adapter), "other" (vectors, magnitudes)."""
        ...

    def rebase(self, kind: LayerKind) -> None:
        """The base layer was replaced by one of another kind with the same shape (e.g. quantised to NF4)."""
        ...


class VariantClass(Protocol):
    """What the registry holds: an adapter class with its declarations and class hooks."""

    name: ClassVar[str]
    peft_type: ClassVar[str]
    abilities: ClassVar[Abilities]
    options: ClassVar[dict[str, Option]]
    kinds: ClassVar[frozenset[str] | None]
    file_keys: ClassVar[tuple[str, ...]]  # every key suffix its adapters' peft_tensors() may return
    shared_keys: ClassVar[tuple[str, ...]]  # full file keys of shared_file_tensors (e.g. "base_model.vera_A")

    @classmethod
    def build(cls, kind: LayerKind, base_layer: BaseLayer, config: ConfigView, path: str, dtype: torch.dtype,
              shared: Any) -> Adapter: ...

    @classmethod
    def prepare(cls, model: nn.Module, config: ConfigView, name: str, paths: list[str]) -> Any: ...

    @classmethod
    def training_hook(cls, model: nn.Module, name: str) -> TrainingHook | None: ...

    @classmethod
    def shared_file_tensors(cls, model: nn.Module, name: str) -> dict[str, torch.Tensor]: ...

    @classmethod
    def file_shapes(cls, kind: LayerKind, base_layer: BaseLayer, config: ConfigView,
                    path: str) -> dict[str, tuple[int, ...]]: ...

    @classmethod
    def as_lora_file(cls, config: Any, tensors: dict[str, torch.Tensor],
                     in_features: dict[str, int] | None = None) -> tuple[Any, dict[str, torch.Tensor]]: ...

    @classmethod
    def file_config(cls, model: nn.Module, name: str, config: ConfigView) -> Any: ...  # a lorakit.LoraConfig

    @classmethod
    def abilities_for(cls, config: ConfigView) -> Abilities: ...  # `abilities` under config (lora_bias rules out some)

    @classmethod
    def peft_config(cls, config: ConfigView) -> dict[str, Any]: ...

    @classmethod
    def config_from_peft(cls, data: dict[str, Any], where: str) -> dict[str, Any]: ...


def check_options(variant: VariantClass, given: dict[str, Any], where: str) -> dict[str, Any]:
    """`given` completed with the variant's defaults and converted by its checks.

    Raises:
        ValueError: an option the variant does not have (its options named), or one its check refuses.
    """
    unknown = sorted(set(given) - set(variant.options))
    if unknown:
        known = ", ".join(sorted(variant.options)) or "none"
        raise ValueError(f"{where}: method {variant.name!r} has no option {unknown[0]!r} (its options: {known})")
    out: dict[str, Any] = {}
    for key, option in variant.options.items():
        value = given.get(key, option.default)
        if option.check is not None:
            try:
                value = option.check(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}: option {key!r} of method {variant.name!r}: {err}") from None
        out[key] = value
    return out


__all__ = ["Abilities", "Adapter", "BaseLayer", "ConfigView", "Option", "TrainingHook", "VariantClass", "check_options"]
