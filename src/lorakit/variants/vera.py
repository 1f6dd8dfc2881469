"""VeRA (Kopiczko et al. 2024, arXiv 2310.11454): one pair of frozen random matrices shared by all layers of an
adapter, and two trained vectors per layer (r + d parameters), in PEFT's format (peft_type "VERA").

    h = W0 x + Λ_b B[:d] Λ_d A[:, :k] dropout(x),   A (r, k_max), B (d_max, r) frozen; λ_d (r,), λ_b (d,) trained

A and B are drawn once per attach (`prepare`) from `projection_prng_key`, exactly as PEFT draws them, sized to the
largest targeted layer and sliced per layer. λ_b starts at zero, so training starts at the base model; λ_d at
`d_initial`. File keys: `<module>.vera_lambda_b`, `<module>.vera_lambda_d`, and `base_model.vera_A` /
`base_model.vera_B` when `save_projection` (otherwise a load draws them again from the key).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, TargetError
from ..layer_kinds import LayerKind, check_supported, weight_dtype
from ..layers import LoraLayer
from ..ops.vera import largest_dims, vera_delta_weight, vera_pair, vera_projections
from ..peft_fields import IGNORED, as_bool, plain
from .lora import LoraAdapter, add_into
from .protocol import Abilities, BaseLayer, Option

if TYPE_CHECKING:
    from ..config import LoraConfig

SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"  # PEFT's file keys of the shared projections
_BIAS_TO_PEFT = {"none": "none", "all": "all", "lora_only": "vera_only"}
_BIAS_FROM_PEFT = {peft: ours for ours, peft in _BIAS_TO_PEFT.items()}
# VeraConfig's fields that map one to one onto LoraConfig's, and those lorakit reads in its own way
_SAME_FIELDS = ("r", "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
                "fan_in_fan_out", "task_type", "base_model_name_or_path")
_OWN_FIELDS = ("peft_type", "vera_dropout", "bias", "projection_prng_key", "save_projection", "d_initial",
               "init_weights")


def _check_key(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f"expected an integer in [0, 2**64), got {value!r}")
    return value


def _check_bool(value: Any) -> bool:
    try:
        return as_bool(value, "the value")
    except ConfigError as err:
        raise ValueError(str(err)) from None


def _check_d_initial(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


class VeraProjections(nn.Module):
    """The frozen pair (A (r, k_max), B (d_max, r)) one VeRA adapter shares across its layers: one module held by
    every layer's adapter (so `.to()` moves it once). Buffers outside the model's state_dict: the adapter file
    holds them (save_projection) or the seed makes them again."""

    vera_A: torch.Tensor  # buffers (register_buffer), declared for type checkers
    vera_B: torch.Tensor

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor, seed: int, save_projection: bool) -> None:
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)
        self.seed = seed
        self.save_projection = save_projection

    def extra_repr(self) -> str:
        return f"A={tuple(self.vera_A.shape)}, B={tuple(self.vera_B.shape)}, seed={self.seed}"


class VeraAdapter(LoraAdapter):
    """One VeRA adapter on one Linear / GPT-2 Conv1D layer: trained `vera_lambda_d` (r,) and `vera_lambda_b` (d,),
    and the adapter's shared `projections`. It holds no lora_A / lora_B: LoraAdapter's __init__ is not run and
    every method that reads them is overridden; the class hooks are LoraAdapter's where not given here."""

    name: ClassVar[str] = "vera"
    peft_type: ClassVar[str] = "VERA"
    # ΔW is not s · B A of trained factors (no SVD / rank slider / factor-wise combine); mixed batches, hot swap and
    # vLLM (which loads LoRA only) are not implemented for it; the projections are shared state
    abilities: ClassVar[Abilities] = Abilities(low_rank=False, mixed_batches=False, hot_swap=False, combine=False,
                                               vllm=False, shared_state=True)
    options: ClassVar[dict[str, Option]] = {
        "projection_prng_key": Option(0, _check_key, "projection_prng_key", "seed of the shared A and B"),
        "save_projection": Option(True, _check_bool, "save_projection", "write A and B into the adapter file"),
        "d_initial": Option(0.1, _check_d_initial, "d_initial", "initial value of every entry of lambda_d"),
    }
    kinds: ClassVar[frozenset[str] | None] = frozenset({"linear", "conv1d_gpt2"})  # PEFT's VeRA: the same two
    file_keys: ClassVar[tuple[str, ...]] = ("vera_lambda_b", "vera_lambda_d")
    shared_keys: ClassVar[tuple[str, ...]] = (SHARED_A, SHARED_B)

    # -- class hooks ---------------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, model: nn.Module, config: LoraConfig, name: str, paths: list[str]) -> VeraProjections | None:
        """Draw the shared projections, sized to the largest of the layers at `paths` (PEFT's rule), on the first
        layer's device in the adapters' dtype; None when no layer there is one VeRA supports (attach refuses it).

        Raises:
            ConfigError: a LoraConfig field VeRA has no meaning for is set (rank_pattern, lora_fa, an init other
                than PEFT's), named with its value.
        """
        _refuse_unsupported(config)
        bases: list[tuple[LayerKind, Any]] = []
        for path in paths:
            module = model.get_submodule(path)
            base = module.base_layer if isinstance(module, LoraLayer) else module
            kind = check_supported(base, path)
            if cls.kinds is None or kind.name in cls.kinds:
                bases.append((kind, base))
        if not bases:
            return None
        d_max, k_max = largest_dims([kind.dims(base) for kind, base in bases])
        kind, first = bases[0]
        dtype = weight_dtype(first, kind) if config.adapter_dtype == "base" else getattr(torch, config.adapter_dtype)
        options = config.options
        vera_A, vera_B = vera_projections(config.r, d_max, k_max, options["projection_prng_key"])
        device = first.weight.device
        return VeraProjections(vera_A.to(device, dtype), vera_B.to(device, dtype), options["projection_prng_key"],
                               options["save_projection"])

    @classmethod
    def build(cls, kind: LayerKind, base_layer: BaseLayer, config: LoraConfig, path: str, dtype: torch.dtype,
              shared: Any) -> VeraAdapter:
        """The adapter on the layer at `path`, holding `shared` (what `prepare` returned)."""
        return cls(kind, base_layer, config.r, config.dropout, config.options["d_initial"], config.init, dtype, shared)

    @classmethod
    def file_shapes(cls, kind: LayerKind, base_layer: BaseLayer, config: LoraConfig,
                    path: str) -> dict[str, tuple[int, ...]]:
        """{"vera_lambda_b": (d,), "vera_lambda_d": (r,)} of the layer at `path`."""
        _, d = kind.dims(base_layer)
        return {"vera_lambda_b": (d,), "vera_lambda_d": (config.r,)}

    @classmethod
    def shared_file_tensors(cls, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """PEFT's `base_model.vera_A` / `base_model.vera_B` of adapter `name` (the live buffers: a load copies into
        them) when its save_projection is on; none otherwise."""
        projections = projections_of(model, name)
        if projections is None or not projections.save_projection:
            return {}
        return {SHARED_A: projections.vera_A, SHARED_B: projections.vera_B}

    @classmethod
    def as_lora_file(cls, config: LoraConfig, tensors: dict[str, torch.Tensor],
                     in_features: dict[str, int] | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """The file as plain LoRA with the same ΔW: per module A' = diag(λ_d) A[:, :k] (r, k), B' = diag(λ_b) B[:d]
        (d, r), alpha = r (s = 1). A VeRA file does not record a layer's input size k, so `in_features` ({module
        path: k}, from the base model) is needed; A and B come from the file (save_projection) or from the seed.

        Raises:
            AdapterFileError: no `in_features` (pass the base model), or a module missing from it.
        """
        from ..errors import AdapterFileError

        if in_features is None:
            raise AdapterFileError("a VeRA file does not record each layer's input size (k): give the base model "
                                   "(lorakit inspect ADAPTER --model MODEL)")
        stems = sorted(k[: -len(".vera_lambda_b")] for k in tensors if k.endswith(".vera_lambda_b"))
        paths = {stem: stem.split("base_model.model.", 1)[-1] for stem in stems}
        missing = sorted(p for p in paths.values() if p not in in_features)
        if missing:
            raise AdapterFileError(f"the base model has no layer {missing[0]!r} of the VeRA file")
        dims = {stem: (in_features[paths[stem]], int(tensors[f"{stem}.vera_lambda_b"].shape[0])) for stem in stems}
        if SHARED_A in tensors and SHARED_B in tensors:
            vera_A, vera_B = tensors[SHARED_A].float(), tensors[SHARED_B].float()
        else:  # drawn again from the key, sized as attach sizes them
            d_max, k_max = largest_dims(list(dims.values()))
            vera_A, vera_B = vera_projections(config.r, d_max, k_max, config.options["projection_prng_key"])
        out: dict[str, torch.Tensor] = {}
        for stem, (k, d) in dims.items():
            lambda_d, lambda_b = tensors[f"{stem}.vera_lambda_d"].float(), tensors[f"{stem}.vera_lambda_b"].float()
            out[f"{stem}.lora_A.weight"] = vera_A[:, :k] * lambda_d[:, None]
            out[f"{stem}.lora_B.weight"] = vera_B[:d] * lambda_b[:, None]
        others = {key: t for key, t in tensors.items() if "vera_" not in key.rsplit(".", 1)[-1]}
        lora = config.replace(method="lora", options={}, alpha=float(config.r), use_rslora=False)
        return lora, {**others, **out}

    @classmethod
    def peft_config(cls, config: LoraConfig) -> dict[str, Any]:
        """PEFT's VeraConfig fields for `config` (alpha has no meaning in VeRA and is not written)."""
        target = config.target_modules
        out = {
            "peft_type": "VERA",
            "task_type": config.task_type,
            "base_model_name_or_path": config.base_model_name_or_path,
            "r": config.r,
            "target_modules": sorted(target) if isinstance(target, list) else target,
            "projection_prng_key": config.options["projection_prng_key"],
            "save_projection": config.options["save_projection"],
            "vera_dropout": config.dropout,
            "d_initial": config.options["d_initial"],
            "fan_in_fan_out": config.fan_in_fan_out,
            "bias": _BIAS_TO_PEFT[config.bias],
            "modules_to_save": config.modules_to_save,
            "init_weights": True,
            "layers_to_transform": config.layers_to_transform,
            "layers_pattern": config.layers_pattern,
            "inference_mode": True,
        }
        if config.exclude_modules is not None:  # a field of PEFT's VeraConfig only in newer versions
            out["exclude_modules"] = config.exclude_modules
        return out

    @classmethod
    def config_from_peft(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """LoraConfig's arguments from a VeraConfig dict (PEFT's defaults for missing fields; unknown set fields
        dropped with a warning, as for LoRA files).

        Raises:
            ConfigError: a bias value VeRA does not have, or an option its check refuses (named with `where`).
        """
        values = {key: plain(value) for key, value in data.items()}
        kwargs: dict[str, Any] = {key: values[key] for key in _SAME_FIELDS if values.get(key) is not None}
        if isinstance(kwargs.get("target_modules"), (set, frozenset, tuple)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        kwargs.setdefault("r", 256)  # VeraConfig's default
        bias = values.get("bias") or "none"
        if bias not in _BIAS_FROM_PEFT:
            raise ConfigError(f"{where}: bias={bias!r}; VeRA's are {', '.join(_BIAS_FROM_PEFT)}")
        kwargs["bias"] = _BIAS_FROM_PEFT[bias]
        kwargs["dropout"] = values.get("vera_dropout") or 0.0
        kwargs["method"] = cls.name
        kwargs["options"] = {key: values[key] for key in cls.options if values.get(key) is not None}
        for key, value in values.items():
            if key not in _SAME_FIELDS and key not in _OWN_FIELDS and key not in IGNORED and value not in (None, False):
                warnings.warn(f"{where}: field {key}={value!r} is unknown to lorakit's VeRA and ignored", stacklevel=3)
        return kwargs

    # -- the adapter ---------------------------------------------------------------------------------------
    def __init__(self, kind: LayerKind, base_layer: BaseLayer, r: int, dropout: float, d_initial: float, init: str,
                 dtype: torch.dtype, projections: VeraProjections) -> None:
        nn.Module.__init__(self)  # not LoraAdapter's: VeRA has no lora_A / lora_B
        k, d = kind.dims(base_layer)
        if projections.vera_A.shape[0] < r or projections.vera_A.shape[1] < k or projections.vera_B.shape[0] < d:
            raise TargetError(f"VeRA's shared projections A {tuple(projections.vera_A.shape)}, B "
                              f"{tuple(projections.vera_B.shape)} are smaller than this layer (k={k}, d={d}, r={r})")
        device = base_layer.weight.device
        self.kind = kind
        self.r = r
        self.scale = 1.0  # VeRA has no alpha: the scale lives in lambda_b and lambda_d
        self.dropout = dropout if kind.uses_dropout else 0.0
        self.in_features, self.out_features = k, d
        self.projections = projections
        self.register_parameter("lora_B_bias", None)  # PEFT's lora_bias is LoRA's only: none here
        self.vera_lambda_b = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))  # (d,): ΔW = 0 at the start
        self.vera_lambda_d = nn.Parameter(torch.full((r,), d_initial, dtype=dtype, device=device))  # (r,)
        if init == "random":  # a non-zero start, for tests of the math
            with torch.no_grad():
                self.vera_lambda_b.normal_(0.0, 0.1)
                self.vera_lambda_d.normal_(0.0, 1.0)

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LoRA pair (A[:, :k], diag(λ_b) B[:d] diag(λ_d)) of this layer, A frozen (ops.vera.vera_pair)."""
        proj, device = self.projections, self.vera_lambda_d.device  # a layer on another device: a copy there
        return vera_pair(proj.vera_A.to(device), proj.vera_B.to(device), self.vera_lambda_d, self.vera_lambda_b,
                         self.in_features, self.out_features)

    def add_to_output(self, base_layer: BaseLayer, x: torch.Tensor, out: torch.Tensor,
                      base_out: torch.Tensor | None = None) -> torch.Tensor:
        """out + Λ_b B Λ_d A dropout(x) through LoRA's op (A frozen: backward keeps A x, not x)."""
        a, b = self.pair()
        p = self.dropout if self.training else 0.0
        return self.kind.add_delta(base_layer, x, out, a, b, 1.0, p)

    def fused_forward(self, base_layer: BaseLayer, x: torch.Tensor) -> torch.Tensor | None:
        """base(x) + this adapter in LoRA's fused op where the layer kind has one; None otherwise."""
        if self.kind.fused is None:
            return None
        a, b = self.pair()
        p = self.dropout if self.training else 0.0
        return self.kind.fused(base_layer, x, a, b, 1.0, p)

    def delta_weight(self, base_layer: BaseLayer) -> torch.Tensor:
        """ΔW = diag(λ_b) B diag(λ_d) A in fp32, in the layout of `base_layer.weight`."""
        proj, device = self.projections, self.vera_lambda_d.device
        delta = vera_delta_weight(proj.vera_A.to(device), proj.vera_B.to(device), self.vera_lambda_d,
                                  self.vera_lambda_b, self.in_features, self.out_features)
        return self.kind.to_weight_layout(delta)

    def merge_into(self, base_layer: BaseLayer) -> None:
        """W0 += ΔW (the sum in fp32, cast to the weight's dtype)."""
        add_into(base_layer.weight, self.delta_weight(base_layer), 1.0)

    def unmerge_from(self, base_layer: BaseLayer) -> None:
        """W0 -= ΔW, undoing merge_into."""
        add_into(base_layer.weight, self.delta_weight(base_layer), -1.0)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's per-layer keys: `vera_lambda_b` (d,), `vera_lambda_d` (r,)."""
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Both vectors in "other" (no A / B factor trains: LoRA+ has nothing to give a higher rate)."""
        return {"other": [self.vera_lambda_b, self.vera_lambda_d]}

    def frozen_factor(self) -> nn.Parameter:
        """LoRA-FA does not apply: VeRA's A and B are frozen already (attach refuses lora_fa=True).

        Raises:
            ConfigError: always.
        """
        raise ConfigError("LoraConfig.lora_fa=True: VeRA's A and B are frozen already; LoRA-FA does not apply")

    def extra_repr(self) -> str:
        return f"vera, kind={self.kind.name}, r={self.r}, d={self.out_features}, dropout={self.dropout:g}"


def projections_of(model: nn.Module, name: str) -> VeraProjections | None:
    """The shared projections of VeRA adapter `name` on `model` (None: no VeRA adapter of that name)."""
    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.adapters:
            adapter = module.adapters[name]
            if isinstance(adapter, VeraAdapter):
                return adapter.projections
    return None


def _refuse_unsupported(config: LoraConfig) -> None:
    """ConfigError for a LoraConfig field that VeRA (and PEFT's VeraConfig) has no meaning for."""
    if config.rank_pattern:
        raise ConfigError(f"LoraConfig.rank_pattern={config.rank_pattern!r}: VeRA's layers share one A and B of rank "
                          f"r={config.r}; per-module ranks are not possible")
    if getattr(config, "lora_bias", False):
        raise ConfigError("LoraConfig.lora_bias=True: PEFT's bias on B is LoRA's; VeRA has no B of its own to bias")
    if config.lora_fa:
        raise ConfigError("LoraConfig.lora_fa=True: VeRA's A and B are frozen already; LoRA-FA does not apply")
    if config.init not in ("kaiming", "random"):
        raise ConfigError(f"LoraConfig.init={config.init!r}: VeRA draws A and B from projection_prng_key and starts "
                          f"lambda_b at zero; init must be 'kaiming' (the default)")


__all__ = ["VeraAdapter", "VeraProjections", "projections_of"]
