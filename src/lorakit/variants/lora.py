"""Plain LoRA (Hu et al. 2021, arXiv 2106.09685): the adapter holds A (r, k) and B (d, r); B starts at zero.

    out = base(x) + s · B A dropout(x),    ΔW = s · B A  (merged into W0 by `merge`)
    with PEFT's lora_bias=True also a bias b (d,) on B, from zero:  out += s · b,  merged into the base bias
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import MergeError, TargetError
from ..layer_kinds import LayerKind, kind_of
from ..ops.lora import init_lora_A, lora_delta_weight
from .protocol import Abilities, BaseLayer, Option, TrainingHook

if TYPE_CHECKING:
    from ..config import LoraConfig


@torch.no_grad()
def add_into(weight: torch.Tensor, delta: torch.Tensor, sign: float) -> None:
    """weight += sign · delta, the sum taken in fp32 (in place for an fp32 weight), cast to the weight's dtype."""
    if weight.dtype == delta.dtype:
        weight.add_(delta, alpha=sign)
    else:
        weight.copy_(weight.float().add_(delta, alpha=sign))


class LoraAdapter(nn.Module):
    """One LoRA adapter on one layer: parameters `lora_A`, `lora_B`; scale s and dropout p.

    The reference implementation of lorakit.variants.protocol: its declarations and class hooks are the defaults
    a variant that subclasses it inherits."""

    name: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    abilities: ClassVar[Abilities] = Abilities(lora_bias=True)
    options: ClassVar[dict[str, Option]] = {}
    kinds: ClassVar[frozenset[str] | None] = None  # every registered layer kind
    # every key suffix its peft_tensors() may return, on any layer kind (how a file's keys name their modules)
    file_keys: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
                                            "lora_B.bias")
    shared_keys: ClassVar[tuple[str, ...]] = ()  # full file keys of tensors shared by all layers (VeRA's projections)
    swap_slot = None  # lorakit.swap.SwapSlot once padded / swapped: the true rank and the gain folded into B

    # -- class hooks of the protocol -----------------------------------------------------------------------
    @classmethod
    def build(cls, kind: LayerKind, base_layer: BaseLayer, config: LoraConfig, path: str, dtype: torch.dtype,
              shared: Any) -> LoraAdapter:
        """The adapter of `config` on the layer at `path` (`shared`: what `prepare` returned)."""
        init = "kaiming" if config.init_from_weights else config.init  # PiSSA / OLoRA / LoftQ: from W0 or the file
        adapter = cls(kind, base_layer, config.rank_for(path), config.scaling_for(path), config.dropout, init, dtype)
        if config.lora_bias:
            adapter.enable_lora_bias(random=config.init == "random")
        return adapter

    @classmethod
    def prepare(cls, model: nn.Module, config: LoraConfig, name: str, paths: list[str]) -> Any:
        """Called once by attach before the adapters of `paths` are built: state shared by all of them (None).

        Raises:
            TargetError: lora_bias=True on a layer kind without a bias on B (embeddings, quantised bases).
        """
        if config.lora_bias:
            for path in paths:
                module: Any = model.get_submodule(path)
                kind = module.kind if hasattr(module, "adapters") else kind_of(module)  # a LoraLayer knows its kind
                if kind is not None and kind.name not in LORA_BIAS_KINDS:
                    raise TargetError(f"module {path!r} ({kind.name}): lora_bias=True needs a Linear, GPT-2 Conv1D or "
                                      f"convolution layer (PEFT has no bias on an embedding's B; lorakit none on a "
                                      f"quantised base); exclude it from the targets or set lora_bias=False")
        return None

    @classmethod
    def training_hook(cls, model: nn.Module, name: str) -> TrainingHook | None:
        """What a training loop calls around the optimizer step for adapter `name` of `model` (None: nothing)."""
        return None

    @classmethod
    def shared_file_tensors(cls, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter `name` shared by all its layers, under their full file keys (the live tensors: a load
        copies into them); none for LoRA."""
        return {}

    @classmethod
    def file_shapes(cls, kind: LayerKind, base_layer: BaseLayer, config: LoraConfig,
                    path: str) -> dict[str, tuple[int, ...]]:
        """{key suffix: shape} of the per-layer tensors a file of `config` holds for the layer at `path`, from
        integers only (io.checks compares a file's header with it before anything is allocated)."""
        shapes = dict(zip(kind.peft_keys, kind.shapes(base_layer, config.rank_for(path))))
        if config.lora_bias:
            shapes["lora_B.bias"] = (shapes[kind.peft_keys[1]][0],)
        return shapes

    @classmethod
    def as_lora_file(cls, config: LoraConfig, tensors: dict[str, torch.Tensor],
                     in_features: dict[str, int] | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """A file of this variant as an equivalent plain LoRA file (same ΔW per module), for readers of LoRA's
        layout only (lorakit inspect); a LoRA file as it is. `in_features` ({module path: k}, from the base model
        when there is one) is for variants whose files do not record it (VeRA)."""
        return config, tensors

    @classmethod
    def file_config(cls, model: nn.Module, name: str, config: LoraConfig) -> LoraConfig:
        """The config a file of adapter `name` records, from its live adapters (AdaLoRA: the rank pattern its
        allocation set); `config` itself for LoRA."""
        return config

    @classmethod
    def abilities_for(cls, config: LoraConfig) -> Abilities:
        """What lorakit may do with this class's adapters under `config`: `abilities`, less what lora_bias rules out
        (the update is then s · (B A x + b), not s B A alone: no mixed batches, hot swap, combine or vLLM)."""
        return with_lora_bias(cls.abilities) if config.lora_bias else cls.abilities

    @classmethod
    def peft_config(cls, config: LoraConfig) -> dict[str, Any]:
        """adapter_config.json's fields for `config` (PEFT's names)."""
        return config.lora_peft_dict()

    @classmethod
    def config_from_peft(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """LoraConfig's constructor arguments from an adapter_config.json of this variant's peft_type (LORA files
        are read by LoraConfig.from_peft_dict itself; other types override this)."""
        raise NotImplementedError(f"{where}: {cls.__name__} reads no peft_type of its own")

    @property
    def needs_base_output(self) -> bool:
        """abilities.needs_base_output (add_to_output wants the base layer's own output)."""
        return self.abilities.needs_base_output

    def __init__(
        self,
        kind: LayerKind,
        base_layer: BaseLayer,
        r: int,
        scale: float,
        dropout: float,
        init: str,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        shape_a, shape_b = kind.shapes(base_layer, r)
        device = base_layer.weight.device
        self.kind = kind
        self.r = r
        self.scale = scale
        self.dropout = dropout if kind.uses_dropout else 0.0
        self.lora_A = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(shape_b, dtype=dtype, device=device))
        self.register_parameter("lora_B_bias", None)  # PEFT's lora_bias: enable_lora_bias makes it (d,)
        if kind.zero_factor == "A":  # PEFT: embedding A starts at zero, B random (normal), same zero delta
            nn.init.normal_(self.lora_B)
            with torch.no_grad():
                self.lora_A.zero_()
        else:
            init_lora_A(self.lora_A, init, r)
        if init == "random":  # B random too: a non-zero start, for tests of the math
            with torch.no_grad():
                init_lora_A(self.lora_A, "kaiming", r)
                self.lora_B.normal_(0.0, 0.02)

    def add_to_output(self, base_layer: BaseLayer, x: torch.Tensor, out: torch.Tensor,
                      base_out: torch.Tensor | None = None) -> torch.Tensor:
        """out + s · B A dropout(x); dropout only in training mode (base_out is not needed)."""
        p = self.dropout if self.training else 0.0
        out = self.kind.add_delta(base_layer, x, out, self.lora_A, self.lora_B, self.scale, p)
        return out if self.lora_B_bias is None else self._add_lora_bias(out)

    def fused_forward(self, base_layer: BaseLayer, x: torch.Tensor) -> torch.Tensor | None:
        """base(x) + this adapter in one op where the layer kind has one; None otherwise."""
        if self.kind.fused is None:
            return None
        p = self.dropout if self.training else 0.0
        out = self.kind.fused(base_layer, x, self.lora_A, self.lora_B, self.scale, p)
        return out if out is None or self.lora_B_bias is None else self._add_lora_bias(out)

    # -- PEFT's lora_bias ----------------------------------------------------------------------------------
    def enable_lora_bias(self, random: bool = False) -> None:
        """Give B a trained bias b (d,) (PEFT's lora_bias=True: lora_B is an nn.Linear with a bias), zero at the
        start (`random`: N(0, 0.02), for tests of the math). The update is then no longer s · B A alone, so mixed
        batches, hot swap, combine and vLLM (which stack or read only A and B) refuse this adapter."""
        d = self.lora_B.shape[0]
        self.lora_B_bias = nn.Parameter(torch.zeros(d, dtype=self.lora_B.dtype, device=self.lora_B.device))
        if random:
            with torch.no_grad():
                self.lora_B_bias.normal_(0.0, 0.02)
        vars(self)["abilities"] = with_lora_bias(type(self).abilities)  # this instance's (consumers holding it ask)

    def _add_lora_bias(self, out: torch.Tensor) -> torch.Tensor:
        """out + s · b along the output channels (the last axis; axis 1 for convolutions). A new tensor: `out` may be
        the output of a custom autograd Function (ops.lora), which in-place ops must not touch."""
        bias = self.lora_B_bias.to(out.dtype)
        if self.kind.channel_axis == 1:
            bias = bias.view(1, -1, *([1] * (out.dim() - 2)))
        return torch.add(out, bias, alpha=self.scale)

    def merge_refusal(self, base_layer: BaseLayer) -> str | None:
        """Why this adapter cannot merge into `base_layer`: a lora_bias with no base bias to add it to (PEFT refuses
        too), else None."""
        if self.lora_B_bias is not None and getattr(base_layer, "bias", None) is None:
            return (f"lora_bias=True, but the base layer ({type(base_layer).__name__}) has no bias to merge s · b "
                    f"into (PEFT refuses the same); keep the adapter unmerged")
        if self.lora_B_bias is not None and self.kind.name not in LORA_BIAS_KINDS:
            return (f"lora_bias=True on a {self.kind.name} base (quantised after attach): lorakit merges only the "
                    f"weight of a quantised layer, not s · b; keep the adapter unmerged")
        return None

    def delta_weight(self, base_layer: BaseLayer) -> torch.Tensor:
        """s · B A in fp32, in the layout of `base_layer.weight`."""
        return self.kind.to_weight_layout(lora_delta_weight(self.lora_A, self.lora_B, self.scale))

    def rebase(self, kind: LayerKind) -> None:
        """The base layer was replaced by one of another kind with the same shape (e.g. quantised to NF4)."""
        self.kind = kind

    def merge_into(self, base_layer: BaseLayer) -> None:
        """W0 += ΔW (the sum in fp32, cast to the weight's dtype); with lora_bias, base bias += s · b.

        Raises:
            MergeError: lora_bias on a base without a bias (see merge_refusal); nothing is changed.
        """
        self._check_mergeable(base_layer)
        add_into(base_layer.weight, self.delta_weight(base_layer), 1.0)
        if self.lora_B_bias is not None:
            add_into(base_layer.bias, self.lora_B_bias.float() * self.scale, 1.0)

    def unmerge_from(self, base_layer: BaseLayer) -> None:
        """W0 -= ΔW, undoing merge_into (and the base bias -= s · b)."""
        add_into(base_layer.weight, self.delta_weight(base_layer), -1.0)
        if self.lora_B_bias is not None:
            add_into(base_layer.bias, self.lora_B_bias.float() * self.scale, -1.0)

    def _check_mergeable(self, base_layer: BaseLayer) -> None:
        why = self.merge_refusal(base_layer)
        if why is not None:
            raise MergeError(why)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors under PEFT's key suffixes (after lorakit.swap: the true rank, B / gain)."""
        key_a, key_b = self.kind.peft_keys
        lora_A, lora_B, slot = self.lora_A, self.lora_B, self.swap_slot
        if slot is not None:  # zero-padded to a declared max rank, the scale ratio folded into B (see swap.py)
            lora_A, lora_B = lora_A[: slot.rank], lora_B[:, : slot.rank]
            lora_B = lora_B if slot.gain == 1.0 else lora_B / slot.gain
        if self.lora_B_bias is not None:  # PEFT's lora_B is an nn.Linear / nn.Conv with a bias
            return {key_a: lora_A, key_b: lora_B, "lora_B.bias": self.lora_B_bias}
        return {key_a: lora_A, key_b: lora_B}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """"A" and "B" (LoRA+: B at ratio x the learning rate; LoRA-FA freezes the random one, "A"); an embedding
        adapter's two factors are one "embedding" group (LoRA+ gives them their own learning rate)."""
        if self.kind.lookup:
            return {"embedding": [self.lora_A, self.lora_B]}
        if self.lora_B_bias is not None:  # the bias on B: a vector, in "other"
            return {"A": [self.lora_A], "B": [self.lora_B], "other": [self.lora_B_bias]}
        return {"A": [self.lora_A], "B": [self.lora_B]}

    def reset_extras(self, base_layer: BaseLayer) -> None:
        """Set the tensors beyond A and B to what makes the adapter the identity while B = 0 (a lora_bias: zero)."""
        if self.lora_B_bias is not None:
            with torch.no_grad():
                self.lora_B_bias.zero_()

    def frozen_factor(self) -> nn.Parameter:
        """The factor LoRA-FA (Zhang et al. 2023, arXiv 2308.03303) keeps frozen at its random init: A, or on a
        layer kind whose A starts at zero (an embedding: PEFT's init), B; freezing a zero factor would keep the
        update at zero forever."""
        return self.lora_B if self.kind.zero_factor == "A" else self.lora_A

    def extra_repr(self) -> str:
        bias = ", lora_bias" if self.lora_B_bias is not None else ""
        return f"kind={self.kind.name}, r={self.r}, scale={self.scale:g}, dropout={self.dropout:g}{bias}"


def with_lora_bias(abilities: Abilities) -> Abilities:
    """`abilities` of an adapter whose B has a bias: its update is not s B A of lora_A, lora_B alone."""
    return replace(abilities, low_rank=False, mixed_batches=False, hot_swap=False, combine=False, vllm=False)


LORA_BIAS_KINDS = frozenset({"linear", "conv1d_gpt2", "conv"})  # kinds whose B PEFT gives a bias (an nn.Linear / Conv)
