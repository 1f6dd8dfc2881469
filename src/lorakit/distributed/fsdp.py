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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

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


def shard_for_training(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """shard_model on a one-dimensional mesh of the run's processes on `device`'s type (the CPU with gloo even on a
    machine that has GPUs; on CUDA each process's current device must be cuda:LOCAL_RANK, as lorakit train sets)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the process's one GPU (launched with one process per device)
    return shard_model(model, mesh=init_device_mesh(device.type, (world_size,)))


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded with fully_shard (its parameters are DTensors)."""
    return isinstance(model, FSDPModule)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective: every rank calls it); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def copy_whole_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor `value` into `target`, a plain tensor or a DTensor shard (this rank's rows; no
    communication: every rank holds the same `value`, read from the same file)."""
    if isinstance(target, DTensor):
        value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every DTensor state (AdamW's moments of a sharded parameter) gathered to a full
    CPU tensor: the same file an unsharded run writes, so a checkpoint resumes on any number of processes, sharded
    or not. A collective when the parameters are sharded (every rank calls it)."""
    state = optimizer.state_dict()
    gathered = {index: {key: whole(value).detach().to("cpu") if torch.is_tensor(value) else value
                        for key, value in entry.items()}
                for index, entry in sorted(state["state"].items())}
    return {**state, "state": gathered}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state) for a state of full tensors (gathered_optimizer_state, or an unsharded run's),
    each moment of a sharded parameter then cut to this rank's shard (no communication)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            entry = optimizer.state.get(param, {})
            for key, value in entry.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                    entry[key] = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


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
    return {key: whole(tensor).detach().to("cpu").clone() for key, tensor in trainable_state(model).items()}


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
