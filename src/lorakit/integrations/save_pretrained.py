"""`model.save_pretrained(dir)` on a transformers model with lorakit adapters: the active adapters in PEFT's
layout, as transformers does for a model with PEFT adapters; installed on that model object only, at attach.

    <dir>/adapter_config.json + adapter_model.safetensors     adapter "default"
    <dir>/<name>/adapter_config.json + ...                    any other adapter (PEFT's and lorakit's layout)

Also here: the trainable state (every adapter's tensors under the model's own state-dict keys) that
`AdapterCheckpointCallback` writes into Trainer's checkpoints, and the load_state_dict post-hook that lets such
an adapter-only state load without every frozen base weight being reported missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import model as M
from ..errors import ConfigError
from ..io.peft import save_adapter

_STATE = "_lorakit_save_pretrained"  # key in the model's __dict__: the ids of what install() added
# state-dict keys inside these belong to lorakit (an adapter, a modules_to_save copy), not to the base model
_LORAKIT_INFIXES = (".adapters.", ".copies.")


@dataclass
class _Installed:
    post_hook_id: int  # id of the load_state_dict post-hook in model._load_state_dict_post_hooks


class AdapterSavePretrained:
    """`model.save_pretrained(save_directory, ...)` for a model with lorakit adapters.

    An instance attribute of the model (a plain object holding the model, so copy.deepcopy and pickle follow
    it). It takes transformers' keyword arguments: `state_dict` (Trainer's, gathered under FSDP / DeepSpeed: the
    adapter's values are taken from it), `is_main_process` (False: write nothing), `selected_adapters` (PEFT's:
    which adapters; default the active ones), `safe_serialization`, `max_shard_size`, `variant`, `token` (accepted;
    the files are always safetensors and an adapter is never sharded, as with PEFT).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        selected_adapters: list[str] | None = None,
        save_peft_format: bool = True,
        distributed_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write the active adapters (or `selected_adapters`) under `save_directory` in PEFT's layout.

        Raises:
            ConfigError: push_to_hub=True, save_peft_format=False or distributed_checkpoint=True (not supported:
                the message says what to do instead), no active adapter, or `save_directory` is a file.
            AdapterNameError: a name in `selected_adapters` that is not attached.
        """

        for flag, given, instead in (
            ("push_to_hub=True", push_to_hub, "save to a directory, then upload it (huggingface_hub.upload_folder)"),
            ("save_peft_format=False", not save_peft_format, "lorakit writes PEFT's key names only"),
            ("distributed_checkpoint=True", distributed_checkpoint, "pass the gathered state_dict= instead"),
        ):
            if given:
                raise ConfigError(
                    f"save_pretrained({flag}) is not supported on a model with lorakit adapters: {instead}"
                )
        names = M.active_adapters(self.model) if selected_adapters is None else list(selected_adapters)
        if not names:
            raise ConfigError(
                f"save_pretrained({str(save_directory)!r}): no active adapter to save; attached: "
                f"{', '.join(M.adapter_names(self.model)) or '(none)'} (set_active() one, or pass selected_adapters=)"
            )
        if Path(save_directory).is_file():
            raise ConfigError(f"save_pretrained: {save_directory} is a file; expected a directory")
        if not is_main_process:
            return
        for name in names:
            save_adapter(self.model, save_directory, name, state_dict=state_dict)


class AdapterStateLoad:
    """load_state_dict post-hook: when everything that was loaded is lorakit's (adapter tensors, modules_to_save
    copies, trainable biases), the frozen base weights the state did not hold are not reported missing.

    That is what transformers' Trainer loads when it resumes from (or loads the best) adapter-only checkpoint.
    A state that holds any frozen base weight is reported as PyTorch does.
    """

    def __call__(self, model: nn.Module, incompatible: Any) -> None:
        missing = set(incompatible.missing_keys)
        owned = set(trainable_state(model))
        loaded = set(model.state_dict()) - missing
        if loaded and loaded <= owned:
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k in owned]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes, under `model.state_dict()`'s keys: every adapter's tensors (active or not), the
    modules_to_save copies and the trainable parameters (biases with bias="all" / "lora_only")."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {
        key: tensor for key, tensor in model.state_dict(keep_vars=True).items()
        if any(infix in key for infix in _LORAKIT_INFIXES) or id(tensor) in trainable
    }


def install(model: nn.Module) -> None:
    """Give `model` (a transformers PreTrainedModel, or anything whose class has save_pretrained) the adapter
    save_pretrained and the adapter-state load hook; idempotent, this object only (attach calls it)."""
    if _STATE in model.__dict__:
        return
    handle = model.register_load_state_dict_post_hook(AdapterStateLoad())
    model.__dict__[_STATE] = _Installed(handle.id)
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = AdapterSavePretrained(model)


def uninstall(model: nn.Module) -> None:
    """Remove what install() added: save_pretrained is the class's again (a plain model's files)."""
    installed: _Installed | None = model.__dict__.pop(_STATE, None)
    if installed is None:
        return
    model._load_state_dict_post_hooks.pop(installed.post_hook_id, None)  # by id: a deepcopy's handle points back
    if isinstance(model.__dict__.get("save_pretrained"), AdapterSavePretrained):
        del model.__dict__["save_pretrained"]


M.register_extension(install, uninstall)  # model.attach installs save_pretrained in PEFT's layout
