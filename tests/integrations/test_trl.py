"""TRL's SFTTrainer on a model with lorakit adapters (a plain transformers model to TRL: no PeftModel, no
peft_config): the adapter trains, and save_model / step checkpoints hold it in PEFT's layout, loading with equal
logits through peft, transformers and lorakit. Real trl, tiny Llama and word-level tokenizer built offline."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from conftest import max_abs_diff
from model_dirs import build_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TEXTS = ["one two three four five six", "red green blue yellow", "the cat and the dog", "add two and three"] * 4


def base_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def eval_logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_sft_trainer_saves_a_lorakit_adapter_that_every_loader_reads(tmp_path):
    tokenizer = build_tokenizer()
    model = lorakit.attach(base_model(tokenizer).train(), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
        save_strategy="steps", save_steps=3, max_length=16, seed=0, dataloader_num_workers=0,
        bf16=False,  # SFTConfig defaults to bf16 autocast, which accelerate leaves on model.forward: compare in fp32
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                             processing_class=tokenizer, callbacks=[lorakit.AdapterCheckpointCallback()])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    assert lorakit.adapter_names(model) == ["default"]  # TRL did not wrap the model in its own PEFT
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    ids = torch.tensor([tokenizer("the cat and the dog")["input_ids"]])
    expected = eval_logits(model, ids)
    assert max_abs_diff(expected, eval_logits(base_model(tokenizer), ids)) > 1e-3  # the adapter trained
    for directory in (tmp_path / "final", tmp_path / "run" / "checkpoint-3"):
        assert (directory / "adapter_model.safetensors").is_file() and not (directory / "config.json").exists()
        via_peft = peft.PeftModel.from_pretrained(base_model(tokenizer), directory)
        hf = base_model(tokenizer)
        hf.load_adapter(str(directory))
        via_lorakit = lorakit.load_adapter(base_model(tokenizer), directory)
        for loaded in (via_peft, hf, via_lorakit):
            assert max_abs_diff(eval_logits(loaded, ids), expected) < 1e-5
