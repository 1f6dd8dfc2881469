"""FSDP2 (torch.distributed.fsdp.fully_shard) for a model with lorakit adapters: the frozen base is split ~1/N per
rank, adapters train as usual, and the saved adapter gathers adapter tensors only.

    shard_model(model)                       # each decoder layer, then the root: parameters become DTensor shards
    save_adapter_sharded(model, "out/")      # every rank calls it; rank 0 writes PEFT's files
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..errors import ConfigError
from ..integrations.save_pretrained import trainable_state
from ..io.peft import save_adapter
from ..model import get_config


def _require_process_group(where: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"{where}: no torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group first"
        )


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the blocks to shard one by one: transformers' `_no_split_modules` (the decoder layers)."""
    return set(getattr(model, "_no_split_modules", None) or ())


def shard_model(
    model: nn.Module, *, layer_classes: Iterable[str] | None = None, mesh: object | None = None,
    reshard_after_forward: bool = True, mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """Shard `model` in place with FSDP2: each block (a module whose class name is in `layer_classes`; default
    the model's `_no_split_modules`) is one FSDP unit, the root holds the rest (embeddings, head).

    Every parameter, frozen or not, becomes a DTensor sharded on dim 0 over the mesh, so a rank keeps ~1/N of the
    frozen base; a block's weights are all-gathered for its forward and backward only. Gradients exist for the
    trainable parameters only (adapters, modules_to_save copies), so only those are reduce-scattered. Attach
    adapters BEFORE sharding. On CUDA (nccl) the model may stay on the CPU until here: fully_shard moves each
    unit's parameters to the mesh's device (default: the current CUDA device; call
    torch.cuda.set_device(LOCAL_RANK) first) and shards them there, one unit at a time. `mp_policy` (torch.distributed.fsdp.MixedPrecisionPolicy, e.g. bf16 compute)
    goes to every unit.

    Raises:
        ConfigError: no process group, the model is already sharded, or no module of `layer_classes` is found
            (the classes looked for and the model's class are named).
    """
    _require_process_group("shard_model")
    if isinstance(model, FSDPModule):
        raise ConfigError(f"shard_model: {type(model).__name__} is already sharded with fully_shard")
    wanted = set(layer_classes) if layer_classes is not None else block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in wanted and m is not model]
    if not blocks:
        raise ConfigError(
            f"shard_model: no module of class {sorted(wanted)} in {type(model).__name__}; "
            "pass layer_classes=[...] with the class name of its repeated blocks"
        )
    extra = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **extra)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **extra)
    return model


def local_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters held by THIS rank: {"frozen": ..., "trainable": ...} (a DTensor counts its local
    shard; a plain tensor counts whole)."""
    out = {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        out["trainable" if p.requires_grad else "frozen"] += local.numel() * local.element_size()
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) CPU tensors of what training changes: every adapter's tensors, the modules_to_save copies
    and trainable biases, keyed as `model.state_dict()`; no frozen base weight is gathered.

    A collective under FSDP: every rank must call it (each gets the full tensors). For a model that is not
    sharded it returns CPU copies. The result is what `lorakit.save_adapter(model, path, state_dict=...)` takes.
    """
    state: dict[str, torch.Tensor] = {}
    for key, tensor in trainable_state(model).items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        state[key] = full.detach().to("cpu").clone()
    return state


def save_adapter_sharded(
    model: nn.Module, path: str | Path, name: str = "default", *, vllm_check: bool = True
) -> Path | None:
    """Save adapter `name` of a (possibly FSDP-sharded) model: all ranks gather the adapter, rank 0 writes it
    with lorakit.save_adapter (atomic; `vllm_check` as there); returns the directory on rank 0, None on the
    others.

    Raises:
        ConfigError: a PiSSA / OLoRA adapter (its saved form needs the full base weights: unshard first), or
            what lorakit.save_adapter raises (on rank 0).
    """
    if get_config(model, name).residual_init:
        raise ConfigError(
            f"save_adapter_sharded(name={name!r}): a PiSSA / OLoRA adapter's file needs the full base weights; "
            "save it from an unsharded copy of the model instead"
        )
    state = adapter_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return save_adapter(model, path, name, vllm_check=vllm_check, state_dict=state)
