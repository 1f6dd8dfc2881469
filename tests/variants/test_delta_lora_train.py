"""Delta-LoRA in training loops and on disk: lorakit's Trainer and transformers' Trainer (with AdapterStepCallback)
move the base weights by exactly λ s B_T A_T (the telescoped per-step changes, B_0 = 0) and lower the loss;
save_delta_lora's merged model, base and plain-LoRA adapter reload with equal logits through transformers, lorakit
and the real peft, on Llama, GPT-2 and BERT built from configs."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import lorakit
from conftest import Counting, max_abs_diff, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from lorakit.io.delta_lora import save_delta_lora
from lorakit.layers import LoraLayer
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer as LorakitTrainer

LAMBDA = 0.5


def delta_config(**extra) -> lorakit.LoraConfig:
    fields = dict(r=4, alpha=8, method="delta_lora", target_modules="all-linear",
                  options={"delta_lambda": LAMBDA, "update_start_step": 1})
    fields.update(extra)
    return lorakit.LoraConfig(**fields)


def base_weights(model) -> dict[str, torch.Tensor]:
    return {layer.path: layer.base_layer.weight.detach().clone() for layer in lorakit.model.lora_layers(model)}


def assert_w0_moved_by_lambda_s_bt_at(model, before: dict[str, torch.Tensor]) -> None:
    """Σ_t λ s (B_t A_t - B_{t-1} A_{t-1}) telescopes to λ s B_T A_T (B_0 = 0): checked on every adapted layer."""
    moved = 0.0
    for layer in lorakit.model.lora_layers(model):
        adapter = layer.adapters["default"]
        b, a = adapter.lora_B.detach().double(), adapter.lora_A.detach().double()
        want = before[layer.path].double() + LAMBDA * adapter.scale * (b @ a)
        assert max_abs_diff(layer.base_layer.weight, want) < 1e-5, layer.path
        moved = max(moved, max_abs_diff(layer.base_layer.weight, before[layer.path]))
    assert moved > 1e-4, "training did not move the base weights"


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_lorakit_trainer_moves_w0_and_lowers_the_loss(tmp_path) -> None:
    model = lorakit.attach(tiny_llama().train(), delta_config())
    before = base_weights(model)
    data = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in Counting(size=32).ids]
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=16, per_device_train_batch_size=8, learning_rate=1e-2,
                      lr_scheduler_type="constant", lora_dropout=0.0, diagnostics_steps=0, progress=False,
                      logging_steps=1, seed=0)
    result = LorakitTrainer(model, cfg, data).fit()
    assert len(result.losses) == 16
    assert mean(result.losses[-4:]) < mean(result.losses[:4]) - 0.05
    assert_w0_moved_by_lambda_s_bt_at(model, before)


def test_transformers_trainer_with_the_step_callback_moves_w0_and_lowers_the_loss(tmp_path) -> None:
    model = lorakit.attach(tiny_llama().train(), delta_config())
    before = base_weights(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=8,
                             learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Counting(), callbacks=[lorakit.AdapterStepCallback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 16 and mean(losses[-4:]) < mean(losses[:4]) - 0.05
    assert_w0_moved_by_lambda_s_bt_at(model, before)


def test_without_the_callback_transformers_trainer_leaves_w0(tmp_path) -> None:
    model = lorakit.attach(tiny_llama().train(), delta_config())
    before = base_weights(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=Counting()).train()
    assert all(torch.equal(layer.base_layer.weight, before[layer.path]) for layer in lorakit.model.lora_layers(model))


# builder, targets, extra config, the loss of a batch
MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], {}, lambda m, ids: m(ids, labels=ids).loss),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], {}, lambda m, ids: m(ids, labels=ids).loss),
    "bert": (tiny_bert, ["query", "value"], {"modules_to_save": ["classifier"]},
             lambda m, ids: m(ids, labels=torch.tensor([0, 2])).loss),
}


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(token_ids()).logits


@pytest.mark.parametrize("arch", list(MODELS))
def test_save_delta_lora_reloads_with_equal_logits(arch: str, tmp_path) -> None:
    build, targets, extra, loss_of = MODELS[arch]
    model = lorakit.attach(build(), delta_config(target_modules=targets, **extra))
    (hook,) = lorakit.training_hooks(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = token_ids()
    for step in range(1, 5):
        model.train()
        loss_of(model, ids).backward()
        optimizer.step()
        hook.after_optimizer_step(step)
        optimizer.zero_grad()
    want = logits(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    out = save_delta_lora(model, tmp_path / "run", with_base=True)
    assert out == tmp_path / "run"
    assert torch.equal(logits(model), want), "saving changed the live model"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    cls = type(build())
    merged = cls.from_pretrained(out / "model")  # transformers alone: the merged model W0' + s B A
    assert max_abs_diff(logits(merged), want) < 1e-5
    via_lorakit = lorakit.load_adapter(cls.from_pretrained(out / "base"), out / "adapter")  # W0' + the LoRA file
    assert max_abs_diff(logits(via_lorakit), want) < 1e-5
    via_peft = peft.PeftModel.from_pretrained(cls.from_pretrained(out / "base"), out / "adapter")
    assert max_abs_diff(logits(via_peft), want) < 1e-5
    # the base moved: the same adapter on the original base is another model
    assert max_abs_diff(logits(lorakit.load_adapter(build(), out / "adapter")), want) > 1e-4


def test_save_delta_lora_refuses_a_model_without_that_adapter(tmp_path) -> None:
    model = lorakit.attach(tiny_llama(), delta_config(target_modules=["q_proj"]))
    with pytest.raises(lorakit.AdapterNameError, match="no adapter named 'other'"):
        save_delta_lora(model, tmp_path, name="other")
    assert not any(tmp_path.iterdir())
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLayer)
