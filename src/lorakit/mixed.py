"""Many adapters in one batch: `model(ids, adapter_names=[...])` and `model.generate(ids, adapter_names=[...])`,
one adapter name (or "__base__") per row, as PEFT users write it. The math is in ops/mixed.py (BGMV / SGMV).

How a call is routed (installed once per model by `attach`, removed when the last adapter goes):

* a forward pre-hook on the root model (`with_kwargs=True`) pops `adapter_names`, checks it (one name per row,
  each attached or "__base__", eval mode, nothing merged) and builds a `Routing`: the batch's distinct adapters
  (slot j = names[j - 1], slot 0 = none), a (batch,) slot index and the model's LoraLayers. It puts it in the
  context variable `layers.ROUTING` (per thread and asyncio task, never on the modules); a forward hook
  (`always_call=True`, so also after an exception) restores the value from before.
* `LoraLayer.forward` hands a routed call to `Routing.forward`: base(x), then the mixed update from per-layer
  stacks of the batch's adapters, zero-padded to the largest rank with the scale folded into B. The stacks are
  cached on the layer and rebuilt only when the batch's set of adapters changes, or an adapter's parameters do
  (identity, storage, `_version`: in-place updates under no_grad count; writes through `.data` do not).
* `model.generate` is an instance attribute (`MixedGenerate`) that pops `adapter_names` before transformers
  validates its kwargs and pins the names for every forward of that call (prefill and each cached decoding
  step), in a context variable too. Rows expanded by `num_beams` / `num_return_sequences` repeat their row's
  name, as in PEFT.

Threads: forwards and generate calls with or without `adapter_names` may run at the same time in several threads
on one model in eval mode; each computes with its own rows' adapters (the routing lives in the calling thread's
context; the per-layer stack cache is replaced whole, never edited in place). Calls that change the model (attach,
load_adapter, set_active, swap_adapter, prepare_swap, merge / unmerge, delete_adapter, disabled(), train / eval,
optimizer steps) must not run while another thread runs a forward: the caller serialises them.

Supported: Linear, GPT-2 Conv1D and Embedding layers with plain LoRA adapters (any rank, alpha, rsLoRA,
adapter dtype). Refused with a clear error: training mode (inference only; in eval mode with grad enabled the
adapters get no gradient, x does), merged adapters (MergeError), DoRA and other variants that change LoRA's
math, convolutions, embeddings with max_norm, and adapters with modules_to_save copies (ConfigError /
TargetError). Inside `lorakit.disabled(model)` every row gets the base model.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import AdapterNameError, ConfigError, MergeError, TargetError
from .layers import MIXED_STACK, ROUTING, LoraLayer, SavedModule
from .model import adapter_names, register_extension
from .ops.mixed import bgmv_add_, embedding_rows_add_, prefer_segments, sgmv_add_, stack_factors
from .variants.lora import LoraAdapter

BASE = "__base__"  # the row gets no adapter (PEFT's name)
_STATE = "_lorakit_mixed"  # root model attribute: _MixedState
_STACK = MIXED_STACK  # LoraLayer attribute: _LayerStack (the cache; LoraLayer leaves it out of a pickle)
# {id of a model's _MixedState: the names its running generate(adapter_names=...) pinned}, in this thread / task
_PINNED: ContextVar[dict[int, list[str]] | None] = ContextVar("lorakit_mixed_pinned", default=None)


@dataclass
class _MixedState:
    """Per model: the ids of the two root hooks (what is routed right now lives in context variables)."""

    hook_ids: tuple[int, int]


@dataclass
class _LayerStack:
    """One layer's stacked factors for one tuple of adapter names, and the key they were built from."""

    key: tuple[Any, ...]
    a_stack: torch.Tensor | None  # (S, r_max, k); embeddings (S, vocab, r_max); None: no adapter here
    bt_stack: torch.Tensor | None  # (S, r_max, d) = (s B)ᵀ


@dataclass
class Routing:
    """The per-row adapter choice of one forward: slot j >= 1 is names[j - 1], slot 0 the base model."""

    names: tuple[str, ...]  # the batch's distinct adapters, in order of first appearance
    slots: torch.Tensor  # (batch,) int64
    layer_ids: frozenset[int] = frozenset()  # id() of the routed model's LoraLayers
    owner: int = 0  # id() of the routed model's _MixedState
    outer: Routing | None = None  # the routing of this thread before this forward, restored after it

    def forward(self, layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`layer`'s output for a mixed batch: base(x) plus each row's own adapter."""
        return mixed_layer_forward(layer, self, x, *args, **kwargs)


# -- the layer side ----------------------------------------------------------------------------------------
def _adapter_key(adapter: LoraAdapter | None) -> tuple[Any, ...] | None:
    if adapter is None:
        return None
    a, b = adapter.lora_A, adapter.lora_B
    return (id(a), a.data_ptr(), a._version, id(b), b.data_ptr(), b._version, adapter.scale, a.dtype, b.dtype)


def _check_adapter(layer: LoraLayer, name: str, adapter: nn.Module) -> None:
    if not getattr(adapter, "abilities", None) or not adapter.abilities.mixed_batches:
        raise ConfigError(
            f"adapter {name!r} on module {layer.path!r} is a {type(adapter).__name__} (method "
            f"{getattr(adapter, 'name', '?')!r}), which cannot take part in a mixed batch (its update is not a "
            f"plain s B A); use set_active() and one adapter per call"
        )
    kind = layer.kind
    if not (kind.is_linear or kind.lookup):
        raise TargetError(
            f"module {layer.path!r} ({kind.name}) cannot take a different adapter per row: mixed batches "
            f"support Linear, GPT-2 Conv1D and Embedding layers"
        )
    if kind.lookup and getattr(layer.base_layer, "max_norm", None) is not None:
        raise TargetError(f"module {layer.path!r}: an embedding with max_norm cannot be used in a mixed batch")


def _layer_stack(layer: LoraLayer, names: tuple[str, ...]) -> _LayerStack:
    """The cached stacks of `names` on `layer`, rebuilt if the names or any adapter parameter changed."""
    adapters = [layer.adapters[n] if n in layer.adapters else None for n in names]
    for name, adapter in zip(names, adapters):
        if adapter is not None:
            _check_adapter(layer, name, adapter)  # before anything reads its factors (a variant may have none)
    key = (names, *(_adapter_key(a) for a in adapters))
    cached = layer.__dict__.get(_STACK)
    if cached is not None and cached.key == key:
        return cached
    layer.__dict__.pop(_STACK, None)  # free the old stacks before building new ones
    factors = [None if adapter is None else (adapter.lora_A, adapter.lora_B, adapter.scale) for adapter in adapters]
    present = [a for a in adapters if a is not None]
    a_stack = bt_stack = None
    if present:
        dtype = present[0].lora_A.dtype
        for adapter in present:
            dtype = torch.promote_types(dtype, adapter.lora_A.dtype)
        a_stack, bt_stack = stack_factors(factors, dtype, transpose_a=layer.kind.lookup)
    stack = _LayerStack(key, a_stack, bt_stack)
    layer.__dict__[_STACK] = stack
    return stack


def mixed_layer_forward(layer: LoraLayer, routing: Routing, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """base(x), plus for each row b the adapter of slot routing.slots[b] (none for slot 0).

    Raises:
        ConfigError: x's first dimension is not the batch (a model that flattens its rows), or a refused
            adapter variant. TargetError: a layer type that cannot be routed per row.
    """
    stack = _layer_stack(layer, routing.names)
    out = layer.base_layer(x, *args, **kwargs)
    if stack.a_stack is None:  # none of the batch's adapters lives on this layer
        return out
    slots = routing.slots.to(x.device)
    n = slots.shape[0]
    if x.dim() < 2 or x.shape[0] != n:
        raise ConfigError(
            f"module {layer.path!r} got an input of shape {tuple(x.shape)}, expected the batch's {n} rows "
            f"first (one per adapter_names entry)"
        )
    compute = stack.a_stack.dtype
    if torch.is_autocast_enabled(x.device.type):
        compute = torch.get_autocast_dtype(x.device.type)
    a_stack, bt_stack = stack.a_stack.to(compute), stack.bt_stack.to(compute)
    d = out.shape[-1]
    in_place = out.dtype == compute
    target = (out if out.is_contiguous() else out.contiguous()) if in_place else torch.zeros(
        out.shape, dtype=compute, device=out.device
    )
    target3 = target.view(n, -1, d)  # (N, T, d)
    with torch.autocast(x.device.type, enabled=False):
        if layer.kind.lookup:
            embedding_rows_add_(target3, x.reshape(n, -1), a_stack, bt_stack, slots)
        else:
            x3 = x.reshape(n, -1, x.shape[-1]).to(compute)  # (N, T, k)
            segments = prefer_segments(n, x3.shape[1], a_stack.shape[1], x3.shape[2] + d)
            (sgmv_add_ if segments else bgmv_add_)(target3, x3, a_stack, bt_stack, slots)
    return target if in_place else out + target.to(out.dtype)


# -- the model side ----------------------------------------------------------------------------------------
def _attached(model: nn.Module) -> list[str]:

    return adapter_names(model)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if torch.is_tensor(value):
            return value.shape[0]
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    return None


def check_adapter_names(model: nn.Module, adapter_names: Any, batch: int | None, repeat: bool = False) -> list[str]:
    """Validate `adapter_names` for a batch of `batch` rows and return it as a list, one name per row.

    With `repeat` (generate), a batch that is a whole multiple of the list (num_beams, num_return_sequences)
    repeats each row's name for its consecutive copies.

    Raises:
        ConfigError: not a list of strings, the wrong length, or the model is in training mode.
        AdapterNameError: a name that is neither attached nor "__base__" (its position is given).
        MergeError: an adapter is merged into the base weights.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise ConfigError(
            f"adapter_names must be a list of adapter names, one per row; got {type(adapter_names).__name__}"
        )
    names = list(adapter_names)
    attached = _attached(model)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ConfigError(f"adapter_names[{i}] must be a string, got {type(name).__name__} {name!r}")
        if name != BASE and name not in attached:
            raise AdapterNameError(
                f"adapter_names[{i}] = {name!r} is not an adapter of this model; attached: "
                f"{', '.join(attached) or '(none)'}, or {BASE!r} for the base model"
            )
    if batch is not None and len(names) != batch:
        if not (repeat and names and batch % len(names) == 0):
            raise ConfigError(
                f"adapter_names has {len(names)} entries but the batch has {batch} rows: give one name per row"
            )
        names = [name for name in names for _ in range(batch // len(names))]
    if model.training:
        raise ConfigError("adapter_names is for inference: call model.eval() first (the model is in training mode)")
    return names


def make_routing(names: list[str], device: torch.device | None = None) -> Routing:
    """The Routing of a batch whose row b uses adapter names[b] ("__base__": none)."""
    distinct = tuple(dict.fromkeys(n for n in names if n != BASE))
    slot_of = {name: j for j, name in enumerate(distinct, start=1)}
    slots = torch.tensor([slot_of.get(n, 0) for n in names], dtype=torch.int64, device=device)
    return Routing(distinct, slots)


def _route_rows(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """Root forward pre-hook: pop adapter_names (or take generate's), check it, route every LoraLayer."""
    state: _MixedState | None = model.__dict__.get(_STATE)
    pinned_names = (_PINNED.get() or {}).get(id(state))
    given = "adapter_names" in kwargs
    if state is None or (not given and pinned_names is None):
        return None
    requested = kwargs.pop("adapter_names", None)
    pinned = requested is None and pinned_names is not None
    if requested is None and not pinned:
        return args, kwargs
    batch = _batch_size(args, kwargs)
    names = check_adapter_names(model, pinned_names if pinned else requested, batch, repeat=pinned)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    used = set(names) - {BASE}
    for layer in layers:
        if layer.merged:
            raise MergeError(
                f"module {layer.path!r} has merged adapters {layer.merged}: unmerge() before passing adapter_names"
            )
    for saved in model.modules():
        if isinstance(saved, SavedModule) and used & set(saved.copies):
            raise ConfigError(
                f"module {saved.path!r} has modules_to_save copies for {sorted(used & set(saved.copies))}: "
                f"mixed batches do not route modules_to_save per row"
            )
    device = next((v.device for v in (*args, *kwargs.values()) if torch.is_tensor(v)), None)
    routing = make_routing(names, device)
    routing.layer_ids = frozenset(id(layer) for layer in layers)
    routing.owner = id(state)
    routing.outer = ROUTING.get()
    ROUTING.set(routing)  # this thread's (context's) forward only
    return args, kwargs


def _clear_routing(model: nn.Module, _args: Any, _output: Any) -> None:
    """Root forward hook (always called): the routing lasts one forward; the thread's previous one comes back."""
    state: _MixedState | None = model.__dict__.get(_STATE)
    current = ROUTING.get()
    if state is not None and current is not None and current.owner == id(state):
        ROUTING.set(current.outer)


class MixedGenerate:
    """`model.generate(..., adapter_names=[...])`: the class's generate with the names pinned for its forwards.

    An instance attribute of the model (a plain object, so deepcopy and pickle follow the model).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        model = self.model
        generate = type(model).generate
        if adapter_names is None:
            return generate(model, *args, **kwargs)
        state: _MixedState = model.__dict__[_STATE]
        pins = _PINNED.get() or {}
        if id(state) in pins:
            raise ConfigError("generate(adapter_names=...) called from inside another one")
        inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        batch = inputs.shape[0] if torch.is_tensor(inputs) and inputs.dim() > 1 else None
        names = check_adapter_names(model, adapter_names, batch)
        token = _PINNED.set({**pins, id(state): names})  # this thread's (context's) generate only
        try:
            return generate(model, *args, **kwargs)
        finally:
            _PINNED.reset(token)


def install(model: nn.Module) -> None:
    """Make `model` take `adapter_names=` in forward and generate (idempotent; `attach` calls it)."""
    if _STATE in model.__dict__:
        return
    pre = model.register_forward_pre_hook(_route_rows, with_kwargs=True)
    post = model.register_forward_hook(_clear_routing, always_call=True)
    model.__dict__[_STATE] = _MixedState((pre.id, post.id))
    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = MixedGenerate(model)


def uninstall(model: nn.Module) -> None:
    """Remove what `install` added, and every cached stack (called when the model's last adapter goes)."""
    state: _MixedState | None = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    pre_id, post_id = state.hook_ids  # by id on this model's own dicts (a deepcopy's handles would point back)
    for hooks, hook_id in ((model._forward_pre_hooks, pre_id), (model._forward_pre_hooks_with_kwargs, pre_id),
                           (model._forward_hooks, post_id), (model._forward_hooks_always_called, post_id)):
        hooks.pop(hook_id, None)
    if isinstance(model.__dict__.get("generate"), MixedGenerate):
        del model.__dict__["generate"]
    for module in model.modules():
        module.__dict__.pop(_STACK, None)


register_extension(install, uninstall)  # model.attach installs the adapter_names= forward
