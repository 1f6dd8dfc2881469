"""transformers' Trainer on a model with lorakit adapters: save_model and its step checkpoints hold the adapter in
PEFT's layout (loads with equal logits through peft, transformers and lorakit), and with AdapterCheckpointCallback
resume_from_checkpoint and load_best_model_at_end work from those adapter-only checkpoints."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import lorakit
from conftest import Counting, max_abs_diff, tiny_llama, token_ids
from lorakit.integrations import trainable_state

CONFIG = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear")


def adapted() -> torch.nn.Module:
    return lorakit.attach(tiny_llama().train(), CONFIG)


def trainer_for(model, out, max_steps=4, **extra) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
        save_strategy="steps", save_steps=2, seed=0, dataloader_num_workers=0, **extra,
    )
    return Trainer(model=model, args=args, train_dataset=Counting(), eval_dataset=Counting(size=8),
                   callbacks=[lorakit.AdapterCheckpointCallback()])


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(token_ids()).logits


def assert_loaders_agree(directory, expected: torch.Tensor) -> None:
    assert max_abs_diff(expected, eval_logits(tiny_llama())) > 1e-3  # training moved the adapter off zero
    via_peft = peft.PeftModel.from_pretrained(tiny_llama(), directory)
    hf = tiny_llama()
    hf.load_adapter(str(directory))
    via_lorakit = lorakit.load_adapter(tiny_llama(), directory)
    for loaded in (via_peft, hf, via_lorakit):
        assert max_abs_diff(eval_logits(loaded), expected) < 1e-5


def test_save_model_and_step_checkpoints_hold_the_adapter(tmp_path):
    model = adapted()
    trainer = trainer_for(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    expected = eval_logits(model)
    assert not (tmp_path / "final" / "model.safetensors").exists()  # adapter only
    assert_loaders_agree(tmp_path / "final", expected)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert_loaders_agree(checkpoint, expected)
    # the callback's resume file holds the adapter's tensors only
    state = lorakit.io.files.load_file(str(checkpoint / "model.safetensors"))
    assert state.keys() == trainable_state(model).keys()


def test_resume_from_an_adapter_only_checkpoint_continues_the_same_run(tmp_path):
    straight = adapted()
    trainer_for(straight, tmp_path / "straight").train()
    expected = eval_logits(straight)

    first = adapted()
    trainer_for(first, tmp_path / "resumed", max_steps=2).train()
    resumed = adapted()  # a fresh model: its adapter starts from the init, not from step 2
    assert max_abs_diff(eval_logits(resumed), eval_logits(first)) > 1e-4
    trainer = trainer_for(resumed, tmp_path / "resumed", max_steps=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert max_abs_diff(eval_logits(resumed), expected) < 1e-5


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    model = adapted()
    trainer = trainer_for(model, tmp_path / "run", max_steps=4, eval_strategy="steps", eval_steps=2,
                          load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer.train()  # "best" = highest loss: the step-2 checkpoint, not the last one
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = lorakit.load_adapter(tiny_llama(), trainer.state.best_model_checkpoint)
    assert max_abs_diff(eval_logits(model), eval_logits(best)) < 1e-5
    last = lorakit.load_adapter(tiny_llama(), tmp_path / "run" / "checkpoint-4")
    assert max_abs_diff(eval_logits(model), eval_logits(last)) > 1e-4


def test_the_callback_refuses_a_model_without_adapters(tmp_path):
    trainer = trainer_for(tiny_llama().train(), tmp_path / "run", max_steps=2)
    with pytest.raises(lorakit.ConfigError, match="no lorakit adapter"):
        trainer.train()
