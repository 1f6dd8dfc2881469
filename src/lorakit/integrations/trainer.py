"""AdapterCheckpointCallback: makes transformers' Trainer (and TRL's trainers) resume from, and load the best of,
checkpoints that hold only a lorakit adapter.

Trainer's checkpoints of a lorakit model hold the adapter in PEFT's layout (the model's save_pretrained). Trainer
itself reads a checkpoint's adapter files only for a `peft.PeftModel` (an isinstance check); for any other model
`resume_from_checkpoint` and `load_best_model_at_end` read `model.safetensors` with `load_state_dict(strict=False)`.
This callback writes that file into each checkpoint: the trainable state only (every adapter's tensors, the
modules_to_save copies, trainable biases; a few MB), under the model's own keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from ..adapter_steps import training_hooks
from ..errors import ConfigError
from ..io.files import atomic_write
from ..model import adapter_names
from ..train.checkpoint import HOOKS_NAME
from .save_pretrained import trainable_state


class AdapterStepCallback(TrainerCallback):
    """Run the step hooks of the model's adapters (lorakit.training_hooks: AdaLoRA's rank allocation, Delta-LoRA's
    update of W0) after each optimizer step of transformers' Trainer, with the gradients still present; nothing
    for LoRA / DoRA. No manual call in the loop, unlike PEFT's `update_and_allocate`.

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[lorakit.AdapterStepCallback()])

    It also carries the hooks' run state (AdaLoRA's importance averages, masks and uncut factors) through
    Trainer's checkpoints: `step_hooks.pt` in each `checkpoint-<step>`, read back when a run resumes from one.
    """

    def __init__(self) -> None:
        self.hooks: list[Any] = []

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        """Make the hooks; a resumed run (global_step > 0) loads their state from its checkpoint's step_hooks.pt.

        Raises:
            ConfigError: the checkpoint's hook state does not fit the model's adapters.
        """
        self.hooks = training_hooks(model) if model is not None else []
        saved = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / HOOKS_NAME
        if state.global_step > 0 and self.hooks and saved.is_file():
            states = torch.load(saved, map_location="cpu", weights_only=True)
            if len(states) != len(self.hooks):
                raise ConfigError(f"{saved}: the state of {len(states)} step hook(s), the model has {len(self.hooks)}")
            for hook, hook_state in zip(self.hooks, states):
                try:
                    hook.load_state_dict(hook_state)
                except (KeyError, TypeError, ValueError) as err:
                    raise ConfigError(f"{saved}: does not fit the model's adapters ({err})") from err

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Write the hooks' state into the checkpoint Trainer just wrote (main process; none without state)."""
        states = [hook.state_dict() for hook in self.hooks]
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and any(states) and checkpoint.is_dir():
            atomic_write(checkpoint, {HOOKS_NAME: lambda path: torch.save(states, path)})

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        for hook in self.hooks:
            hook.after_optimizer_step(state.global_step + 1)  # global_step counts the steps already finished


class AdapterCheckpointCallback(TrainerCallback):
    """Add the adapter's training state (`model.safetensors`, adapter tensors only) to each Trainer checkpoint.

    With it, `trainer.train(resume_from_checkpoint=...)` continues from the checkpoint's adapter, and
    `load_best_model_at_end=True` loads the best checkpoint's adapter; the checkpoint's PEFT files
    (adapter_config.json, adapter_model.safetensors) are unchanged.

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCheckpointCallback()])
    """

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
        **kwargs: Any,
    ) -> None:
        """Write `<output_dir>/checkpoint-<step>/model.safetensors` (main process only).

        Raises:
            ConfigError: the model has no lorakit adapter, or the checkpoint directory Trainer just wrote is absent.
        """
        if not args.should_save:
            return
        if model is None or not adapter_names(model):
            raise ConfigError(
                "AdapterCheckpointCallback: the Trainer's model has no lorakit adapter "
                "(lorakit.attach or lorakit.load_adapter(..., trainable=True) first)"
            )
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not checkpoint.is_dir():
            raise ConfigError(f"AdapterCheckpointCallback: Trainer's checkpoint {checkpoint} does not exist")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable_state(model).items()}
        atomic_write(checkpoint, {SAFE_WEIGHTS_NAME: lambda path: save_file(tensors, str(path), {"format": "pt"})})
