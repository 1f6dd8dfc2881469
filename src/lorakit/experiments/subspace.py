"""Training in a random d-dimensional subspace of the weights: the two set-ups of `lorakit experiment intrinsic-dim`.

(b) The whole update, projected (Li et al. 2018, arXiv 1804.08838; Aghajanyan et al. 2020, arXiv 2012.13255):

    θ = θ0 + c · P z        θ: the chosen weight matrices, flattened and concatenated (D values)
                            z ∈ R^d: the only trained vector of those weights, starting at 0
                            P (D x d): Fastfood, or dense Gaussian when D·d is small (ops.fastfood); unit-norm columns
                            c: a fixed gain, the step length (see subspace_gain)

    attach_subspace takes each chosen weight Parameter out of its module (kept, frozen, as θ0 in the subspace
    module), registers the subspace module (z and P's draws) on the model, and a forward pre-hook on the model
    that writes θ0 + c (P z)[slice] into each module's `weight` before every forward: one P z per forward, never
    a D x d matrix for Fastfood. detach_subspace restores the Parameters (with the update merged, or not).

(a) The first seed's subspace: LoRA with a frozen random B and only A trained (freeze_random_b):

    ΔW = s B A,  B = (c / s) Q,  Q (d_out x r): orthonormal columns (QR of a seeded Gaussian), A starts at 0
    =>  ΔW = c Q A: an isometry from A to ΔW (||ΔW||_F = c ||A||_F), the subspace of dimension Σ r k

Both are isometric (up to c) parametrisations of a d-dimensional subspace, so one Adam step of size lr moves θ by
about c · lr · sqrt(d) in both (subspace_gain sets c from the step length wanted).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import LoraLayer
from ..ops.fastfood import Fastfood, dense_projection, fastfood_apply, fastfood_draw

SUBSPACE_MODULE = "intrinsic_subspace"  # the name of the subspace module on the model
DENSE_LIMIT = 1 << 22  # "auto": a dense P when D x d <= 2^22 entries (16 MiB in fp32), Fastfood beyond
PROJECTIONS = ("auto", "fastfood", "dense")


def projection_for(d: int, D: int, projection: str = "auto") -> str:
    """Which projection P to use: "dense" or "fastfood" as asked, or by size for "auto" (dense up to DENSE_LIMIT).

    Raises:
        ConfigError: an unknown projection.
    """
    if projection not in PROJECTIONS:
        raise ConfigError(f"projection {projection!r}: expected one of {', '.join(PROJECTIONS)}")
    if projection == "auto":
        return "dense" if D * d <= DENSE_LIMIT else "fastfood"
    return projection


def subspace_gain(d: int, D: int, reference_lr: float, lr: float, factor: float = 1.0) -> float:
    """c = factor · (reference_lr / lr) · sqrt(D / d). With factor 1, an Adam step at `lr` moves θ = θ0 + c P z by
    about c · lr · sqrt(d) = reference_lr · sqrt(D), as far as a full fine-tuning step at `reference_lr` moves the
    same D weights (Adam moves each coordinate by about its learning rate; P's columns are unit-norm and nearly
    orthogonal); `factor` lengthens the step by that much. A random subspace of dimension d catches about
    sqrt(d / D) of a step's first-order progress, and its directions have less curvature than the gradient's, so
    it trains well with much longer steps than full fine-tuning's (intrinsic_dim.STEP_FACTORS).

    Raises:
        ConfigError: d, D, the learning rates or factor not positive.
    """
    if d < 1 or D < 1 or not reference_lr > 0 or not lr > 0 or not factor > 0:
        raise ConfigError(f"subspace gain: d, D, the learning rates and the factor must be positive, got d = {d}, "
                          f"D = {D}, reference_lr = {reference_lr}, lr = {lr}, factor = {factor}")
    return factor * (reference_lr / lr) * math.sqrt(D / d)


# -- (b): θ = θ0 + c P z ---------------------------------------------------------------------------------
class RandomSubspace(nn.Module):
    """z (d,), trained, and the draws of P; the frozen θ0 of each target as `bases`. The targets themselves are
    held in a plain list (not registered twice in the module tree)."""

    matrix: Tensor  # dense P (D, d), a buffer
    ff_signs: Tensor  # Fastfood's draws, buffers (ops.fastfood.Fastfood's fields)
    ff_perm: Tensor
    ff_gain: Tensor

    def __init__(self, targets: list[tuple[str, nn.Module]], d: int, projection: str, seed: int,
                 gain: float = 1.0) -> None:
        super().__init__()
        self.paths = [path for path, _ in targets]
        self.targets: list[Any] = [module for _, module in targets]  # a list: not registered as submodules
        self.shapes = [tuple(module.weight.shape) for module in self.targets]
        sizes = [math.prod(shape) for shape in self.shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]  # target i: delta[offsets[i]:offsets[i+1]]
        self.D = self.offsets[-1]
        self.d = d
        self.gain = gain
        self.projection = projection_for(d, self.D, projection)
        device = self.targets[0].weight.device
        self.z = nn.Parameter(torch.zeros(d, device=device))
        generator = torch.Generator().manual_seed(seed)
        if self.projection == "dense":
            self.register_buffer("matrix", dense_projection(d, self.D, generator).to(device))  # (D, d)
        else:
            ff = fastfood_draw(d, self.D, generator)
            for name in ("signs", "perm", "gain"):
                self.register_buffer("ff_" + name, getattr(ff, name).to(device))
        self._cache: tuple[Any, ...] | None = None  # (id of z, z._version, z's device, c P z): no-grad forwards
        self.hook: Any = None  # the model's forward pre-hook (a RemovableHandle)
        self.bases = nn.ParameterList()  # θ0 of each target (the module's own Parameter objects, frozen)
        self.trainable_before: dict[int, bool] = {}  # id(param) -> requires_grad before attach_subspace

    def fastfood(self) -> Fastfood:
        """P's Fastfood draws, on the buffers' current device."""
        return Fastfood(d=self.d, D=self.D, signs=self.ff_signs, perm=self.ff_perm, gain=self.ff_gain)

    def delta(self) -> Tensor:
        """c · P z (D,), in z's dtype; computed once per no-grad forward while z is unchanged."""
        z = self.z
        key = (id(z), z._version, z.device)
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[:3] == key:
            return self._cache[3]
        pz = z @ self.matrix.T if self.projection == "dense" else fastfood_apply(self.fastfood(), z)
        out = pz * self.gain
        self._cache = None if torch.is_grad_enabled() else (*key, out)  # no graph held
        return out

    def write_weights(self) -> None:
        """module.weight = θ0 + (c P z)[slice], viewed in the weight's shape and dtype, for every target."""
        delta = self.delta()
        for i, module in enumerate(self.targets):
            base = self.bases[i]
            piece = delta[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i])
            module.weight = base + piece.to(base.dtype)  # a plain tensor attribute (the Parameter was removed)

    @torch.no_grad()
    def updates(self) -> dict[str, Tensor]:
        """θ - θ0 of every target, by module path (detached copies)."""
        delta = self.delta()
        return {path: delta[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i]).clone()
                for i, path in enumerate(self.paths)}


def _targets(model: nn.Module, paths: list[str]) -> list[tuple[str, nn.Module]]:
    """(path, module) of each path, checked: a module with a `weight` Parameter not shared with another module."""
    if not paths:
        raise ConfigError("attach_subspace: no target module given (a list of module paths)")
    if len(set(paths)) != len(paths):
        raise ConfigError(f"attach_subspace: a target given twice in {paths}")
    found = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"attach_subspace: the model has no module {path!r}") from None
        weight = module._parameters.get("weight")
        if not isinstance(weight, nn.Parameter):
            raise ConfigError(f"attach_subspace: module {path!r} ({type(module).__name__}) has no weight Parameter")
        found.append((path, module))
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners[id(param)] = owners.get(id(param), 0) + 1
    shared = [path for path, module in found if owners[id(module.weight)] > 1]
    if shared:
        raise ConfigError(f"attach_subspace: the weights of {shared} are shared with other modules (tied); "
                          f"a tied weight cannot be reparametrised on its own")
    return found


def attach_subspace(model: nn.Module, paths: list[str], d: int, *, seed: int, projection: str = "auto",
                    gain: float = 1.0, train_also: tuple[str, ...] = ()) -> RandomSubspace:
    """Reparametrise the weights of the modules at `paths` as θ0 + gain · P z (z ∈ R^d, zero) and freeze every
    other parameter of the model except those of the modules named in `train_also` (e.g. a new classifier head,
    trained in full as lorakit's LoRA runs train it). At z = 0 the model computes exactly what it did.

    Returns the subspace module, registered on the model as SUBSPACE_MODULE (so z is among model.parameters(),
    the only trainable one besides `train_also`).

    Raises:
        ConfigError: d < 1, no or unknown targets, a target without a weight Parameter or with a tied one, an unknown
            `train_also` module or projection, or a model that has a subspace already.
    """
    if hasattr(model, SUBSPACE_MODULE):
        raise ConfigError("attach_subspace: the model has a subspace already; detach_subspace it first")
    if d < 1:
        raise ConfigError(f"attach_subspace: the subspace dimension d must be >= 1, got {d}")
    targets = _targets(model, list(paths))
    extra = []
    for name in train_also:
        try:
            extra.append(model.get_submodule(name))
        except AttributeError:
            raise ConfigError(f"attach_subspace: train_also names {name!r}, which the model does not have") from None
    sub = RandomSubspace(targets, d, projection, seed, gain)
    sub.trainable_before = {id(p): p.requires_grad for p in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for module in extra:
        for param in module.parameters():
            param.requires_grad_(True)
    for module in sub.targets:
        base = module._parameters.pop("weight")
        assert base is not None  # checked by _targets
        sub.bases.append(base)
        module.weight = base.detach()  # θ0 until the first forward writes θ0 + c P z
    model.add_module(SUBSPACE_MODULE, sub)
    sub.z.requires_grad_(True)
    sub.hook = model.register_forward_pre_hook(lambda _module, _args: sub.write_weights())
    return sub


def subspace_of(model: nn.Module) -> RandomSubspace:
    """The model's subspace module.

    Raises:
        ConfigError: the model has none.
    """
    sub = getattr(model, SUBSPACE_MODULE, None)
    if not isinstance(sub, RandomSubspace):
        raise ConfigError("the model has no random subspace attached (lorakit.experiments.subspace.attach_subspace)")
    return sub


@torch.no_grad()
def detach_subspace(model: nn.Module, merge: bool = True) -> dict[str, Tensor]:
    """Undo attach_subspace: each target gets its weight Parameter back, θ0 + gain · (P z)[slice] when `merge`, else
    θ0; every parameter's requires_grad is as before the attach; the subspace module and the hook are removed.

    Returns the update θ - θ0 of each target (by module path).

    Raises:
        ConfigError: the model has no subspace.
    """
    sub = subspace_of(model)
    updates = sub.updates()
    sub.hook.remove()
    for i, module in enumerate(sub.targets):
        base = sub.bases[i]
        if merge:
            base.add_(updates[sub.paths[i]].to(base.dtype))
        del module.weight
        module.register_parameter("weight", base)
    delattr(model, SUBSPACE_MODULE)
    for param in model.parameters():
        param.requires_grad_(sub.trainable_before.get(id(param), param.requires_grad))
    return updates


# -- (a): LoRA with a frozen random B --------------------------------------------------------------------
def orthonormal_columns(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """Q (rows x cols) with orthonormal columns: the Q of a QR of a Gaussian matrix, signs fixed by diag(R) > 0
    (so Q is Haar-distributed).

    Raises:
        ConfigError: cols > rows (no such Q).
    """
    if cols > rows:
        raise ConfigError(f"{cols} orthonormal columns need at least {cols} rows, got {rows}")
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)


def lora_adapters(model: nn.Module) -> list[tuple[str, Any]]:
    """(module path / adapter name, adapter) of every adapter with lora_A and lora_B factors, in model order."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for name, adapter in module.adapters.items():
                if isinstance(getattr(adapter, "lora_A", None), nn.Parameter):
                    found.append((f"{path}/{name}", adapter))
    return found


@torch.no_grad()
def freeze_random_b(model: nn.Module, seed: int, gain: float = 1.0) -> int:
    """(a): on every LoRA adapter of `model`, B = (gain / s) Q (Q: orthonormal columns, seeded, frozen) and A = 0
    (trained), so ΔW = gain · Q A. Returns the subspace dimension d = Σ r k (the number of values in the A's).

    Raises:
        ConfigError: the model has no LoRA adapter, or a rank exceeds its layer's output size.
    """
    adapters = lora_adapters(model)
    if not adapters:
        raise ConfigError("freeze_random_b: the model has no LoRA adapter (attach LoRA first)")
    generator = torch.Generator().manual_seed(seed)
    d = 0
    for _, adapter in adapters:
        lora_A, lora_B = adapter.lora_A, adapter.lora_B
        assert isinstance(lora_A, Tensor) and isinstance(lora_B, Tensor)
        rows, r = lora_B.shape[0], lora_B[0].numel()  # B: (d_out, r[, 1, ...])
        q = orthonormal_columns(rows, r, generator) * (gain / float(adapter.scale))
        lora_B.copy_(q.view(lora_B.shape).to(lora_B.dtype))
        lora_A.zero_()
        lora_B.requires_grad_(False)
        lora_A.requires_grad_(True)
        d += lora_A.numel()
    return d


__all__ = ["DENSE_LIMIT", "PROJECTIONS", "SUBSPACE_MODULE", "RandomSubspace", "attach_subspace", "detach_subspace",
           "freeze_random_b", "lora_adapters", "orthonormal_columns", "projection_for", "subspace_gain",
           "subspace_of"]
