"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): an SVD-shaped update whose rank moves between layers by importance.

    out = base(x) + s · P diag(E) Q dropout(x),   Q = lora_A (r, k), E = lora_E (r, 1), P = lora_B (d, r),
    s = alpha / (init_r + 1e-5);  loss += orth_reg_weight · mean over matrices of ||QQᵀ - I||_F, ||PᵀP - I||_F

After each optimizer step (`training_hook`: lorakit's Trainer, or lorakit.AdapterStepCallback in transformers'
Trainer; no manual `update_and_allocate`) the importance averages are updated and, on the cubic budget schedule,
the least important triplets (Q_i, E_i, P_i) across all layers are masked (E_i = 0); at step T - tfinal the final
mask is set and kept. Files are PEFT's (peft_type "ADALORA"): keys `lora_A`, `lora_E`, `lora_B`, cut to the kept
triplets, and `rank_pattern` {"<module>.lora_E": [kept, ...]} (math in lorakit.ops.adalora).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..layer_kinds import LayerKind
from ..layers import LoraLayer
from ..ops.adalora import adalora_delta_weight, adalora_scale, orth_regulariser
from ..peft_fields import peft_file_kwargs
from .adalora_alloc import AdaloraAllocator
from .lora import LoraAdapter
from .protocol import Abilities, BaseLayer, Option, TrainingHook

if TYPE_CHECKING:
    from ..config import LoraConfig


def _int(minimum: int) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {value!r}")
        return value
    return check


def _total_step(value: Any) -> int:
    if value is None:
        raise ValueError("required: the number of optimizer steps of the run (the budget schedule ends there), "
                         "e.g. options={'total_step': 1000}")
    return _int(1)(value)


def _beta(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"expected a number in (0, 1), got {value!r}")
    return float(value)


def _weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    return float(value)


def _masks(value: Any) -> dict[str, list[bool]]:
    """{module path: [kept, ...]}; PEFT's keys "<module>.lora_E" (and "<module>.lora_E.<adapter>") accepted."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of module -> list of booleans, got {type(value).__name__}")
    out: dict[str, list[bool]] = {}
    for key, mask in value.items():
        if not isinstance(key, str) or not isinstance(mask, (list, tuple)) or not all(
                isinstance(m, bool) for m in mask) or not mask:
            raise ValueError(f"entry {key!r}: expected a non-empty list of booleans, got {mask!r}")
        path = key.split(".lora_E", 1)[0] if ".lora_E" in key else key
        out[path] = list(mask)
    return out


ADALORA_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")
_LORA_FIELDS = ("alpha", "target_modules", "dropout", "bias", "init", "exclude_modules", "layers_to_transform",
                "layers_pattern", "modules_to_save", "fan_in_fan_out", "task_type", "base_model_name_or_path",
                "use_dora")


class _RegulariserHook:
    """Forward hook on the model: in training, adds orth_reg_weight x the orthogonality regulariser of adapter
    `name`'s trainable layers to `output.loss` (as PEFT's AdaLoraModel.forward does), so that any training loop
    reading `model(**batch).loss` trains with it."""

    def __init__(self, name: str, weight: float) -> None:
        self.name, self.weight = name, weight

    def __call__(self, model: nn.Module, _args: Any, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if not model.training or not isinstance(loss, torch.Tensor):
            return
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = [
            (a.lora_A, a.lora_B) for _, a in adalora_adapters(model, self.name) if a.lora_A.requires_grad]
        if pairs:
            output.loss = loss + self.weight * orth_regulariser(pairs).to(loss.dtype)


class AdaloraAdapter(LoraAdapter):
    """One AdaLoRA adapter on one layer: `lora_A` Q (r, k), `lora_E` (r, 1), `lora_B` P (d, r) and the mask of
    kept triplets `kept` (r,) that the rank allocator sets."""

    name: ClassVar[str] = "adalora"
    peft_type: ClassVar[str] = "ADALORA"
    # ΔW = s P diag(E) Q is not s B A of lora_A / lora_B: no SVD slider, no stacked mixed batches, no swap into
    # LoRA slots; PEFT refuses to combine AdaLoRA adapters; vLLM serves LoRA only. Merging is exact.
    abilities: ClassVar[Abilities] = Abilities(low_rank=False, mixed_batches=False, hot_swap=False, combine=False,
                                               vllm=False, step_hook=True)
    options: ClassVar[dict[str, Option]] = {
        "target_r": Option(8, _int(0), "target_r", "the average rank per layer at the end"),
        "tinit": Option(0, _int(0), "tinit", "steps of warm-up before the budget decreases"),
        "tfinal": Option(0, _int(0), "tfinal", "final steps at the target budget (mask fixed)"),
        "deltaT": Option(1, _int(1), "deltaT", "steps between two maskings"),
        "beta1": Option(0.85, _beta, "beta1", "EMA factor of the sensitivity"),
        "beta2": Option(0.85, _beta, "beta2", "EMA factor of the uncertainty"),
        "orth_reg_weight": Option(0.5, _weight, "orth_reg_weight", "weight of the orthogonality regulariser"),
        "total_step": Option(None, _total_step, "total_step", "optimizer steps of the run (required)"),
        "rank_masks": Option(None, _masks, "rank_pattern", "kept triplets per module (PEFT's rank_pattern)"),
    }
    kinds: ClassVar[frozenset[str] | None] = frozenset({"linear", "conv1d_gpt2"})
    file_keys: ClassVar[tuple[str, ...]] = ("lora_A", "lora_E", "lora_B")
    kept: torch.Tensor  # buffer (register_buffer): which triplets the allocation keeps, declared for type checkers

    # -- class hooks ----------------------------------------------------------------------------------------
    @classmethod
    def module_rank(cls, config: LoraConfig, path: str) -> int:
        """The rank of the tensors at `path`: the kept count of its mask (a file cut by rank_pattern), else r."""
        mask = config.options.get("rank_masks", {}).get(path)
        return sum(mask) if mask is not None else config.r

    @classmethod
    def build(cls, kind: LayerKind, base_layer: BaseLayer, config: LoraConfig, path: str, dtype: torch.dtype,
              shared: Any) -> AdaloraAdapter:
        """The adapter at `path`: rank r (PEFT's init_r), or the kept count of the module's mask in rank_masks."""
        rank = cls.module_rank(config, path)
        return cls(kind, base_layer, rank, adalora_scale(config.alpha, config.r), config.dropout, config.init, dtype,
                   init_rank=config.r, options=config.options)

    @classmethod
    def prepare(cls, model: nn.Module, config: LoraConfig, name: str, paths: list[str]) -> Any:
        """Check the schedule and the fields AdaLoRA does not use; install the regulariser's forward hook.

        Raises:
            ConfigError: a schedule without a budgeting phase, or a LoRA feature AdaLoRA lacks (named).
        """
        opts = config.options
        if opts["tinit"] >= opts["total_step"] - opts["tfinal"]:
            raise ConfigError(f"LoraConfig.options of adalora: tinit={opts['tinit']} >= total_step - tfinal = "
                              f"{opts['total_step'] - opts['tfinal']}: no budgeting phase; lower tinit / tfinal or "
                              "raise total_step")
        if config.init not in ("kaiming", "random"):
            raise ConfigError(f"LoraConfig.init={config.init!r}: adalora starts as PEFT does (init='kaiming': Q, P "
                              "~ N(0, 0.02), E = 0) or fully random (init='random')")
        for field, on in (("lora_fa", config.lora_fa), ("use_rslora", config.use_rslora),
                          ("rank_pattern", bool(config.rank_pattern)), ("alpha_pattern", bool(config.alpha_pattern))):
            if on:
                raise ConfigError(f"LoraConfig.{field} is not supported with method 'adalora' (PEFT's AdaLoRA has "
                                  "one init_r = r and one alpha; its rank pattern comes from the allocation)")
        for hook in model._forward_hooks.values():  # an adapter of this name attached before (then deleted)
            if isinstance(hook, _RegulariserHook) and hook.name == name:
                hook.weight = opts["orth_reg_weight"]
                return None
        if opts["orth_reg_weight"] > 0:
            model.register_forward_hook(_RegulariserHook(name, opts["orth_reg_weight"]))
        return None

    @classmethod
    def training_hook(cls, model: nn.Module, name: str) -> TrainingHook | None:
        """The rank allocator of adapter `name` (importance averages, budget schedule, masks)."""
        adapters = adalora_adapters(model, name)
        return AdaloraAllocator([adapter for _, adapter in adapters]) if adapters else None

    @classmethod
    def file_shapes(cls, kind: LayerKind, base_layer: BaseLayer, config: LoraConfig,
                    path: str) -> dict[str, tuple[int, ...]]:
        """lora_A (r, k), lora_E (r, 1), lora_B (d, r); r the module's kept count (rank_pattern) or init_r."""
        rank = cls.module_rank(config, path)
        shape_a, shape_b = kind.shapes(base_layer, rank)
        return {"lora_A": tuple(shape_a), "lora_E": (rank, 1), "lora_B": tuple(shape_b)}

    @classmethod
    def as_lora_file(cls, config: LoraConfig, tensors: dict[str, torch.Tensor],
                     in_features: dict[str, int] | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """The file as plain LoRA with the same ΔW: A' = diag(E) Q, B' = P, per module r = its kept rank and alpha =
        s · r (so that alpha / r = s); modules with no triplet kept are left out (ΔW = 0)."""
        scale = adalora_scale(config.alpha, config.r)
        out: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for key, tensor in tensors.items():
            if key.endswith(".lora_E"):
                stem = key[: -len(".lora_E")]
                rank = int(tensor.shape[0])
                if rank:
                    out[f"{stem}.lora_A.weight"] = tensors[f"{stem}.lora_A"].float() * tensor.float()
                    out[f"{stem}.lora_B.weight"] = tensors[f"{stem}.lora_B"]
                    module = stem.split("base_model.model.", 1)[-1]
                    ranks[module], alphas[module] = rank, scale * rank
            elif not key.endswith((".lora_A", ".lora_B")):
                out[key] = tensor
        lora = config.replace(method="lora", options={}, rank_pattern=ranks, alpha_pattern=alphas)
        return lora, out

    @classmethod
    def file_config(cls, model: nn.Module, name: str, config: LoraConfig) -> LoraConfig:
        """The config with rank_masks of the live adapters once any triplet is masked (PEFT writes rank_pattern
        only after an allocation)."""
        masks = {path: adapter.rank_mask() for path, adapter in adalora_adapters(model, name)}
        if not config.options.get("rank_masks") and all(all(m) for m in masks.values()):
            return config
        return config.replace(options={**config.options, "rank_masks": masks})

    @classmethod
    def peft_config(cls, config: LoraConfig) -> dict[str, Any]:
        """PEFT's AdaLoraConfig fields: LoRA's, init_r = r, the schedule, rank_pattern {"<module>.lora_E": mask}."""
        data = config.lora_peft_dict()
        data.pop("r")  # PEFT's AdaLoRA ignores r (and warns when it is not 8): init_r is the rank
        opts = config.options
        masks = opts.get("rank_masks") or {}
        data.update({"peft_type": "ADALORA", "init_r": config.r, "use_dora": False,
                     "rank_pattern": {f"{p}.lora_E": m for p, m in masks.items()} or None})
        data.update({key: opts[key] for key in ADALORA_FIELDS if key != "init_r"})
        return data

    @classmethod
    def config_from_peft(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """LoraConfig arguments from PEFT's AdaLoraConfig fields (r = init_r; r, use_rslora, alpha_pattern, which
        PEFT's AdaLoRA ignores, are dropped).

        Raises:
            ConfigError: a LoRA feature lorakit does not implement, switched on (as for LORA files).
        """
        values = {k: v for k, v in data.items() if k not in ADALORA_FIELDS and k not in (
            "peft_type", "r", "rank_pattern", "use_rslora", "alpha_pattern")}
        kwargs = peft_file_kwargs(values, _LORA_FIELDS, where=f"{where}: ")
        if kwargs.pop("use_dora", False):
            raise ConfigError(f"{where}: use_dora=True with peft_type ADALORA (PEFT refuses it too)")
        options = {k: data[k] for k in ADALORA_FIELDS if k != "init_r" and data.get(k) is not None}
        options["rank_masks"] = data.get("rank_pattern") or {}
        return {**kwargs, "r": data.get("init_r") or 12, "method": "adalora", "options": options}

    # -- the adapter ----------------------------------------------------------------------------------------
    def __init__(self, kind: LayerKind, base_layer: BaseLayer, r: int, scale: float, dropout: float, init: str,
                 dtype: torch.dtype, init_rank: int | None = None, options: dict[str, Any] | None = None) -> None:
        super().__init__(kind, base_layer, max(r, 1), scale, dropout, "kaiming", dtype)
        if r == 0:  # every triplet of the module masked (PEFT saves and loads such (0, k) tensors)
            shape_a, shape_b = kind.shapes(base_layer, 0)
            self.lora_A = nn.Parameter(self.lora_A.new_zeros(shape_a))
            self.lora_B = nn.Parameter(self.lora_B.new_zeros(shape_b))
            self.r = 0
        self.init_rank = r if init_rank is None else init_rank  # PEFT's init_r: the length of a file's mask
        self.schedule = dict(options or {})  # the schedule options (read by the allocator)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=self.lora_A.device))
        self.register_buffer("kept", torch.ones(r, dtype=torch.bool, device=self.lora_A.device), persistent=False)
        with torch.no_grad():
            if init == "random":  # a non-zero start, for tests of the math
                self.lora_B.normal_(0.0, 0.1)
                self.lora_E.normal_(0.0, 1.0)
            else:  # PEFT: Q, P ~ N(0, 0.02), E = 0: the update starts at zero
                self.lora_A.normal_(0.0, 0.02)
                self.lora_B.normal_(0.0, 0.02)

    def _scaled_A(self) -> torch.Tensor:
        return self.lora_A * self.lora_E  # diag(E) Q, (r, k)

    def add_to_output(self, base_layer: BaseLayer, x: torch.Tensor, out: torch.Tensor,
                      base_out: torch.Tensor | None = None) -> torch.Tensor:
        """out + s · P diag(E) Q dropout(x)."""
        p = self.dropout if self.training else 0.0
        return self.kind.add_delta(base_layer, x, out, self._scaled_A(), self.lora_B, self.scale, p)

    def fused_forward(self, base_layer: BaseLayer, x: torch.Tensor) -> torch.Tensor | None:
        """base(x) + this adapter in one op where the layer kind has one (LoRA's, with diag(E) Q as A)."""
        if self.kind.fused is None:
            return None
        p = self.dropout if self.training else 0.0
        return self.kind.fused(base_layer, x, self._scaled_A(), self.lora_B, self.scale, p)

    def delta_weight(self, base_layer: BaseLayer) -> torch.Tensor:
        """s · P diag(E) Q in fp32, in the layout of `base_layer.weight`."""
        return self.kind.to_weight_layout(adalora_delta_weight(self.lora_A, self.lora_E, self.lora_B, self.scale))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's keys `lora_A`, `lora_E`, `lora_B`, cut to the kept triplets once some are masked (as PEFT saves)."""
        if bool(self.kept.all()):
            return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}
        keep = self.kept
        return {"lora_A": self.lora_A[keep], "lora_E": self.lora_E[keep], "lora_B": self.lora_B[:, keep]}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """"A" (Q), "B" (P) and "other" (E)."""
        return {"A": [self.lora_A], "B": [self.lora_B], "other": [self.lora_E]}

    @torch.no_grad()
    def set_kept(self, keep: torch.Tensor) -> None:
        """Keep the triplets where `keep` (r,) is True; E is zeroed elsewhere (the rank allocator's mask)."""
        self.kept.copy_(keep.view(-1))
        self.lora_E.masked_fill_(~self.kept.view(-1, 1), 0.0)

    @torch.no_grad()
    def reapply_mask(self) -> None:
        """E = 0 again on the masked triplets (after an optimizer step moved them)."""
        self.lora_E.masked_fill_(~self.kept.view(-1, 1), 0.0)

    @property
    def kept_rank(self) -> int:
        """The number of triplets kept."""
        return int(self.kept.sum())

    def rank_mask(self) -> list[bool]:
        """The file's mask: init_r entries, the kept triplets True (tensors cut by a file: the rest False)."""
        return self.kept.tolist() + [False] * (self.init_rank - self.r)

    def extra_repr(self) -> str:
        return f"adalora, kept={self.kept_rank}, " + super().extra_repr()


def final_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """{module path: kept rank} of AdaLoRA adapter `name` (after training: the ranks the allocation gave)."""
    return {path: adapter.kept_rank for path, adapter in adalora_adapters(model, name)}


def adalora_adapters(model: nn.Module, name: str) -> list[tuple[str, AdaloraAdapter]]:
    """(module path, adapter) of every AdaLoRA adapter `name` on the model, in module order."""
    found: list[tuple[str, AdaloraAdapter]] = []
    for m in model.modules():
        if not isinstance(m, LoraLayer) or name not in m.adapters:
            continue
        adapter = m.adapters[name]
        if isinstance(adapter, AdaloraAdapter):
            found.append((m.path, adapter))
    return found


__all__ = ["AdaloraAdapter", "adalora_adapters", "final_ranks"]
