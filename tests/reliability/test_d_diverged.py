"""A diverged run (NaN loss) names a checkpoint to resume from whose saved trainable tensors are really finite: the
weights can go NaN in the step that writes a checkpoint, one step before the loss shows it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train.callbacks import Callback
from lorakit.train.config import TrainConfig
from lorakit.train.loop import TrainingError, train

RECORDS = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(4) for b in range(4)]


class PoisonGradients(Callback):
    """At optimizer step `at`, every gradient becomes NaN after clipping (the loss of that step is finite): the
    optimizer writes NaN weights, which the checkpoint of that step saves; the next step's loss is NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_pre_optimizer_step(self, trainer, step, loss) -> None:
        if step == self.at:
            for param in trainer.params:
                if param.grad is not None:
                    param.grad.fill_(float("nan"))


def _config(tmp_path, model_dir, method: str) -> TrainConfig:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return TrainConfig(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_steps=8, save_steps=2,
                       per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, lora_dropout=0.0,
                       diagnostics_steps=0, progress=False, seed=3, method=method, warmup_steps=0)


def _weights(checkpoint, method: str) -> dict[str, torch.Tensor]:
    name = "adapter/adapter_model.safetensors" if method == "lora" else "trainable.safetensors"
    return load_file(str(checkpoint / name))


def _finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_stop_names_the_newest_checkpoint_with_finite_weights(tmp_path, causal_lm_dir, method):
    with pytest.raises(TrainingError) as stopped:
        train(_config(tmp_path, causal_lm_dir, method), callbacks=[PoisonGradients(at=4)])
    message = str(stopped.value)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not _finite(_weights(checkpoints / "step-0000004", method))  # the newest checkpoint diverged
    assert _finite(_weights(checkpoints / "step-0000002", method))
    assert "loss became nan at step 5" in message
    assert f"{checkpoints / 'step-0000002'}" in message and "step-0000004" not in message


def test_the_stop_says_when_no_checkpoint_is_finite(tmp_path, causal_lm_dir):
    with pytest.raises(TrainingError) as stopped:
        train(_config(tmp_path, causal_lm_dir, "lora"), callbacks=[PoisonGradients(at=2)])
    message = str(stopped.value)
    assert "loss became nan at step 3" in message
    assert "none of the 1 checkpoint(s) has finite weights" in message and "--resume" not in message


def test_weights_that_diverge_in_the_last_step_are_not_saved(tmp_path, causal_lm_dir):
    """No later loss sees the last step's update: the run checks the weights before the final save."""
    cfg = _config(tmp_path, causal_lm_dir, "lora")
    cfg.max_steps = 4
    with pytest.raises(TrainingError) as stopped:
        train(cfg, callbacks=[PoisonGradients(at=4)])
    message = str(stopped.value)
    assert "weights became non-finite at step 4" in message
    assert f"{tmp_path / 'run' / 'checkpoints' / 'step-0000002'}" in message
    assert not (tmp_path / "run" / "adapter").exists()  # no adapter of NaN weights
