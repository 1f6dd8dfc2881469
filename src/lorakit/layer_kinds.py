"""The layer types lorakit can wrap, and how a low-rank pair (A, B) acts on each.

One `LayerKind` per base module type, found through a dict keyed by type (walking the MRO, so subclasses
work). A kind knows the adapter shapes, how to add s · B A x to the layer's output, how to lay a delta
ΔW (d, k, *kernel) out like the base weight, and PEFT's key names for A and B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ops.lora import lora_linear, lora_linear_add

try:  # GPT-2 style fused projections: weight stored (in, out)
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core importable
    HFConv1D = None  # type: ignore[misc,assignment]

Tensor = torch.Tensor
# A base layer of some kind (nn.Linear, nn.Embedding, a convolution, GPT-2's Conv1D, NF4Linear, ...): its attributes
# (weight, bias, in_features, ...) are dynamic, and nn.Module's typing makes each `Tensor | Module`; the kind is
# what says which it has, so its functions take the layer as Any.
BaseLayer = Any


@dataclass(frozen=True)
class LayerKind:
    """How LoRA applies to one base layer type."""

    name: str
    dims: Callable[[BaseLayer], tuple[int, int]]  # (k: input features, d: output features)
    shapes: Callable[[BaseLayer, int], tuple[tuple[int, ...], tuple[int, ...]]]  # (A shape, B shape) for rank r
    add_delta: Callable[[BaseLayer, Tensor, Tensor, Tensor, Tensor, float, float], Tensor]
    to_weight_layout: Callable[[Tensor], Tensor]  # ΔW (d, k, *kernel) -> the base weight's layout
    peft_keys: tuple[str, str]  # key suffixes of A and B in PEFT's files
    is_linear: bool = False  # counted by "all-linear"
    uses_dropout: bool = True
    fan_in_fan_out: bool = False
    weight_layout: str = "dk"  # the weight's rows: "dk" = (d out, k in, *kernel), "kd" = (k, d) (GPT-2, embeddings)
    channel_axis: int = -1  # the output's axis of the d channels (1 for convolutions: (N, d, *spatial))
    lookup: bool = False  # an embedding table: inputs are ids whose rows are looked up, not multiplied
    zero_factor: str = "B"  # the factor that starts at zero (PEFT: "A" for embeddings, whose B is the random one)
    # the whole adapted layer in one op (base + one adapter), or None: see ops.lora.lora_linear
    fused: Callable[[BaseLayer, Tensor, Tensor, Tensor, float, float], Tensor | None] | None = None
    # quantised bases (QLoRA) only: the dense weight (d, k) in a dtype (None: the compute dtype), and the tensor
    # holding the codes (its identity and version change exactly when the weight does). None: a float weight
    dequantize: Callable[[BaseLayer, torch.dtype | None], Tensor] | None = None
    storage: Callable[[BaseLayer], Tensor] | None = None
    # quantised bases: replace the codes by those of a dense weight, returning (the weight read back, a restore);
    # and how a LoraLayer merges / unmerges adapters into such a base (lorakit.quant.merge: by re-quantising)
    requantize: Callable[[BaseLayer, Tensor], tuple[Tensor, Callable[[], None]]] | None = None
    merge_adapters: Callable[[BaseLayer, list[str]], dict[str, float] | None] | None = None
    unmerge_adapters: Callable[[BaseLayer], None] | None = None

    def __reduce__(self) -> tuple[Callable[[str], LayerKind], tuple[str]]:
        """Pickle and deepcopy by name: a model's kinds stay the registry's singletons (`kind is CONV` holds)."""
        return kind_named, (self.name,)

    @property
    def quantized(self) -> bool:
        """Whether the base weight is stored quantised (merging into it re-quantises: see quant.merge)."""
        return self.dequantize is not None


def _linear_add(base: BaseLayer, x: Tensor, out: Tensor, a: Tensor, b: Tensor, s: float, p: float) -> Tensor:
    return lora_linear_add(out, x, a, b, s, p)


def _linear_fused(base: BaseLayer, x: Tensor, a: Tensor, b: Tensor, s: float, p: float) -> Tensor | None:
    if type(base) is not nn.Linear:  # a subclass may change forward: use it as it is
        return None
    return lora_linear(x, base.weight, base.bias, a, b, s, p, transposed=False)


def _conv1d_fused(base: BaseLayer, x: Tensor, a: Tensor, b: Tensor, s: float, p: float) -> Tensor | None:
    if type(base) is not HFConv1D:
        return None
    return lora_linear(x, base.weight, base.bias, a, b, s, p, transposed=True)


def _embedding_add(base: BaseLayer, ids: Tensor, out: Tensor, a: Tensor, b: Tensor, s: float, p: float) -> Tensor:
    h = F.embedding(ids, a.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                    norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                    sparse=base.sparse)  # (..., r): rows of A for each token
    return out + (h @ b.t().to(h.dtype)).mul_(s).to(out.dtype)


def _conv_add(base: BaseLayer, x: Tensor, out: Tensor, a: Tensor, b: Tensor, s: float, p: float) -> Tensor:
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[a.dim() - 2]
    xin = F.dropout(x, p, training=True) if p > 0.0 else x
    xin = xin.to(a.dtype)
    if base.padding_mode != "zeros":
        raise NotImplementedError(f"LoRA on a convolution with padding_mode={base.padding_mode!r}")
    h = conv(xin, a, None, base.stride, base.padding, base.dilation)  # (B, r, *spatial)
    return out + conv(h, b).mul_(s).to(out.dtype)


def _identity(delta: Tensor) -> Tensor:
    return delta


def _transpose(delta: Tensor) -> Tensor:
    return delta.t()


LINEAR = LayerKind(
    name="linear",
    dims=lambda m: (m.in_features, m.out_features),
    shapes=lambda m, r: ((r, m.in_features), (m.out_features, r)),
    add_delta=_linear_add,
    to_weight_layout=_identity,
    peft_keys=("lora_A.weight", "lora_B.weight"),
    is_linear=True,
    fused=_linear_fused,
)

CONV1D_GPT2 = LayerKind(
    name="conv1d_gpt2",
    dims=lambda m: (m.weight.shape[0], m.weight.shape[1]),  # weight is (in, out)
    shapes=lambda m, r: ((r, m.weight.shape[0]), (m.weight.shape[1], r)),
    add_delta=_linear_add,
    to_weight_layout=_transpose,
    peft_keys=("lora_A.weight", "lora_B.weight"),
    is_linear=True,
    fan_in_fan_out=True,
    weight_layout="kd",
    fused=_conv1d_fused,
)

EMBEDDING = LayerKind(
    name="embedding",
    dims=lambda m: (m.num_embeddings, m.embedding_dim),
    shapes=lambda m, r: ((r, m.num_embeddings), (m.embedding_dim, r)),
    add_delta=_embedding_add,
    to_weight_layout=_transpose,  # ΔW (dim, num) -> weight (num, dim)
    peft_keys=("lora_embedding_A", "lora_embedding_B"),
    uses_dropout=False,
    weight_layout="kd",
    lookup=True,
    zero_factor="A",
)


def _conv_shapes(m: BaseLayer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ones = (1,) * len(m.kernel_size)
    return (r, m.in_channels, *m.kernel_size), (m.out_channels, r, *ones)


CONV = LayerKind(
    name="conv",
    dims=lambda m: (m.in_channels, m.out_channels),
    shapes=_conv_shapes,
    add_delta=_conv_add,
    to_weight_layout=_identity,
    peft_keys=("lora_A.weight", "lora_B.weight"),
    channel_axis=1,
)

LAYER_KINDS: dict[type, LayerKind] = {
    nn.Linear: LINEAR,
    nn.Embedding: EMBEDDING,
    nn.Conv1d: CONV,
    nn.Conv2d: CONV,
    nn.Conv3d: CONV,
}
if HFConv1D is not None:
    LAYER_KINDS[HFConv1D] = CONV1D_GPT2


_FINDERS: list[Callable[[], None]] = []  # called before a lookup: register types of packages imported since
_NAMED: dict[str, LayerKind] = {}  # every kind ever registered, by name (pickle finds them again)


def register_kind(cls: type | None, kind: LayerKind) -> LayerKind:
    """Make `kind` the LayerKind of module type `cls` (and its subclasses); `cls` None: known by name only, until a
    finder registers its type (e.g. bitsandbytes' Linear4bit once bitsandbytes is imported). Returns `kind`.

    Quantised kinds register themselves from lorakit.quant, so this module imports nothing of it."""
    _NAMED[kind.name] = kind
    if cls is not None:
        LAYER_KINDS[cls] = kind
    return kind


def register_finder(finder: Callable[[], None]) -> None:
    """Call `finder` before each lookup: it registers types that exist only once a package is imported."""
    if finder not in _FINDERS:
        _FINDERS.append(finder)


def _find() -> None:
    for finder in _FINDERS:
        finder()


for _cls, _kind in list(LAYER_KINDS.items()):
    register_kind(_cls, _kind)


def weight_dtype(module: BaseLayer, kind: LayerKind | None = None) -> torch.dtype:
    """The dtype the layer computes in: its weight's, or a quantised layer's compute dtype (bitsandbytes without
    one: the dtype it was quantised from)."""
    kind = kind or kind_of(module)
    if kind is None or not kind.quantized:
        return module.weight.dtype
    dtype = getattr(module, "compute_dtype", None)
    if dtype is None:
        dtype = getattr(getattr(module.weight, "quant_state", None), "dtype", None) or torch.float32
    return dtype


def kind_named(name: str) -> LayerKind:
    """The registered LayerKind called `name` (how a pickled or deep-copied model finds its kinds again).

    Raises:
        KeyError: no registered kind has that name.
    """
    _find()
    if name in _NAMED:
        return _NAMED[name]
    raise KeyError(f"no lorakit layer kind named {name!r}")


def kind_of(module: nn.Module) -> LayerKind | None:
    """The LayerKind of `module` (its own type or nearest registered base class), or None."""
    _find()
    for cls in type(module).__mro__:
        kind = LAYER_KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def check_supported(module: nn.Module, path: str) -> LayerKind:
    """The module's kind, or a TargetError that names the module, its type and the supported types."""
    from .errors import TargetError

    kind = kind_of(module)
    if kind is None:
        supported = ", ".join(sorted({c.__name__ for c in LAYER_KINDS}))
        raise TargetError(
            f"module {path!r} matched the targets but its type {type(module).__name__} cannot take a LoRA "
            f"adapter (supported: {supported}); target its linear sub-layers instead"
        )
    if kind is CONV and getattr(module, "groups", 1) != 1:
        raise TargetError(f"module {path!r}: grouped convolution (groups={module.groups}) is not supported")
    if kind is CONV and getattr(module, "padding_mode", "zeros") != "zeros":
        raise TargetError(  # refused here, at attach, rather than by the first forward (_conv_add)
            f"module {path!r}: convolution with padding_mode={module.padding_mode!r} is not supported "
            f"(expected 'zeros')"
        )
    return kind
