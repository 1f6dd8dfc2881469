"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411): LoRA whose base weight also moves, by the change of s B A.

    out = W0 x + s · B A x                          (forward, merge, file: plain LoRA; no dropout, as in the paper)
    after optimizer step t >= K:  W0 <- W0 + λ s (B_{t+1} A_{t+1} - B_t A_t)      (ops.delta_lora, one rank-2r GEMM)

λ is `delta_lambda` (default 0.5, the paper's), K is `update_start_step` (default 500). Only A and B are trained
parameters: W0 moves without gradients or optimizer state. Training changes the base model, so the result is
a merged model plus, for the low-rank part, a plain LoRA file relative to the CHANGED base
(lorakit.io.delta_lora.save_delta_lora). PEFT has no Delta-LoRA; its files are plain LoRA (peft_type "LORA").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..layer_kinds import LayerKind
from ..layers import LoraLayer
from ..ops.delta_lora import DeltaFactors, delta_lora_step_, new_delta_factors
from .lora import LoraAdapter
from .protocol import Abilities, BaseLayer, Option, TrainingHook

if TYPE_CHECKING:
    from ..config import LoraConfig


def _check_lambda(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < float("inf"):
        raise ValueError(f"expected a finite number >= 0 (the paper uses 0.5), got {value!r}")
    return float(value)


def _check_start(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an optimizer step count, an integer >= 0, got {value!r}")
    return value


class DeltaLoraAdapter(LoraAdapter):
    """One Delta-LoRA adapter on one layer: `lora_A`, `lora_B` as LoRA; the class hook `training_hook` moves W0."""

    name: ClassVar[str] = "delta_lora"
    peft_type: ClassVar[str] = "LORA"  # the low-rank part is a plain LoRA file
    # the update is s B A (low_rank, merge exact), but relative to a base that training changed: a file of it is
    # wrong on the original base, so no mixing with other adapters in one batch, no hot swap, no combine, no vLLM
    abilities: ClassVar[Abilities] = Abilities(mixed_batches=False, hot_swap=False, combine=False, vllm=False,
                                               trains_base=True, step_hook=True)
    options: ClassVar[dict[str, Option]] = {
        "delta_lambda": Option(0.5, _check_lambda, doc="λ: W0 moves by λ times the change of s B A per step"),
        "update_start_step": Option(500, _check_start, doc="K: W0 moves from this optimizer step on (1-based)"),
    }
    kinds: ClassVar[frozenset[str] | None] = frozenset({"linear", "conv1d_gpt2", "embedding", "conv"})  # no quantised W0

    delta_lambda: float = 0.5
    update_start_step: int = 500

    @classmethod
    def build(cls, kind: LayerKind, base_layer: BaseLayer, config: LoraConfig, path: str, dtype: torch.dtype,
              shared: Any) -> DeltaLoraAdapter:
        """LoRA's adapter, with the run's λ and K from `config.options` (`prepare` refused a residual init)."""
        adapter = cls(kind, base_layer, config.rank_for(path), config.scaling_for(path), config.dropout, config.init,
                      dtype)
        adapter.delta_lambda = config.options["delta_lambda"]
        adapter.update_start_step = config.options["update_start_step"]
        return adapter

    @classmethod
    def prepare(cls, model: nn.Module, config: LoraConfig, name: str, paths: list[str]) -> Any:
        """Refuse a PiSSA / OLoRA init before the model changes (their residual base and Delta-LoRA's moving base
        cannot both be saved relative to one original).

        Raises:
            ConfigError: config.init is pissa / olora.
        """
        if config.residual_init:
            raise ConfigError(f"LoraConfig.init={config.init!r} cannot be used with method 'delta_lora' (the base "
                              "would hold PiSSA's residual and move too); use init='kaiming' or 'gaussian'")
        return None

    @classmethod
    def training_hook(cls, model: nn.Module, name: str) -> TrainingHook | None:
        """The hook that moves W0 after each optimizer step (DeltaLoraHook); made after any checkpoint is loaded."""
        return DeltaLoraHook(model, name)

    def extra_repr(self) -> str:
        return f"delta_lora (λ={self.delta_lambda:g}, from step {self.update_start_step}), " + super().extra_repr()


class DeltaLoraHook:
    """Moves the base weights of Delta-LoRA adapter `name` after each optimizer step (`after_optimizer_step`).

    It keeps the A and B of the previous call (fp32, r (d + k) values per layer) and adds λ s (B A - B_old A_old)
    into W0 in place. A, B at construction are the first reference: build the hook after loading a checkpoint.
    A skipped optimizer step (fp16 overflow) leaves A, B unchanged and so W0 too (up to the rounding of B A - B A).

    Raises:
        ConfigError (at construction): an adapter with dropout > 0 (the paper trains without: with dropout, the
            change of B A is not the change W0 would get from its own gradient), or one on a quantised base.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        self.name = name
        self.layers: list[tuple[LoraLayer, DeltaLoraAdapter, DeltaFactors]] = []
        for module in model.modules():
            if not isinstance(module, LoraLayer) or name not in module.adapters:
                continue
            adapter = module.adapters[name]
            if not isinstance(adapter, DeltaLoraAdapter):
                continue
            if adapter.dropout > 0:
                raise ConfigError(f"Delta-LoRA adapter {name!r} on module {module.path!r}: dropout={adapter.dropout:g}; "
                                  "Delta-LoRA trains without dropout (Zi et al. 2023): set LoraConfig.dropout=0")
            if module.kind.quantized:
                raise ConfigError(f"Delta-LoRA adapter {name!r} on module {module.path!r}: the base is quantised "
                                  f"({module.kind.name}); Delta-LoRA moves W0 and needs a float weight")
            self.layers.append((module, adapter, new_delta_factors(adapter.lora_A, adapter.lora_B)))

    def state_dict(self) -> dict[str, Any]:
        """Nothing beyond the weights: the reference A, B is the adapter's own at the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the adapter's current A, B (a checkpoint's, once loaded) as the reference of the next step."""
        self.layers = [(module, adapter, new_delta_factors(adapter.lora_A, adapter.lora_B))
                       for module, adapter, _ in self.layers]

    def after_optimizer_step(self, step: int) -> None:
        """W0 += λ s (B A - B_old A_old) on every layer when `step` (1-based) >= update_start_step; else only the
        reference A, B is renewed."""
        for module, adapter, factors in self.layers:
            move = step >= adapter.update_start_step and adapter.delta_lambda != 0.0
            delta_lora_step_(module.base_layer.weight, module.kind.weight_layout, factors, adapter.lora_A,
                             adapter.lora_B, adapter.delta_lambda * adapter.scale, move)


__all__ = ["DeltaLoraAdapter", "DeltaLoraHook"]
