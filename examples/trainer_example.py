"""LoRA with transformers' Trainer, unchanged: lorakit.attach the adapters, hand the model to Trainer, save it with
trainer.save_model() (the adapter, in PEFT's layout).

    .venv/bin/python examples/trainer_example.py --out runs/trainer_example --steps 200

Builds a 2-layer Llama from a config (no download), trains rank-8 LoRA on every linear layer to continue
counting sequences ("3 4 5 6 ..." modulo the vocabulary), and saves the adapter in PEFT's layout.

What to know when lorakit meets Trainer: nothing special. The model keeps its class, config and forward
signature, so label handling, loss, gradient accumulation, mixed precision and activation (gradient) checkpointing
work as for any model; its save_pretrained writes the adapter in PEFT's layout, so `trainer.save_model()` and
Trainer's step checkpoints hold the adapter (loadable by peft, transformers' load_adapter and lorakit).
`lorakit.AdapterCheckpointCallback` adds what Trainer needs to resume from those checkpoints
(`resume_from_checkpoint`) or to load the best one (`load_best_model_at_end`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainingArguments

import lorakit

VOCAB = 64
# transformers >= 5.x renamed TrainingArguments.gradient_checkpointing to activation_checkpointing
CHECKPOINTING_ARG = ("activation_checkpointing"
                     if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
                     else "gradient_checkpointing")


def build_model(seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny Llama (2 layers, hidden 64) built from a config: no download."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


class CountingData(torch.utils.data.Dataset):
    """Sequences start, start+1, start+2, ... (mod VOCAB); labels = input_ids (the model shifts them)."""

    def __init__(self, size: int = 256, length: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (size, 1), generator=gen)
        self.ids = (starts + torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(
    out_dir: str | Path,
    steps: int = 200,
    r: int = 8,
    learning_rate: float = 3e-3,
    batch_size: int = 16,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    work_dir: str | Path | None = None,
    save_steps: int | None = None,
) -> dict[str, Any]:
    """Attach LoRA, train with Trainer for `steps` steps, save the adapter to `out_dir` (trainer.save_model).

    With `save_steps`, Trainer checkpoints every `save_steps` steps into `work_dir` (default: a temporary
    directory); each holds the adapter in PEFT's layout and can be resumed from.
    Returns the model, the Trainer, the logged losses and the adapter directory.
    """
    model = build_model(seed)
    lorakit.attach(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear", dropout=0.0))
    trainable, total = lorakit.trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.1%})")

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=str(work_dir or tmp),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            logging_steps=max(1, steps // 10),
            save_strategy="steps" if save_steps else "no",
            save_steps=save_steps or 500,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=seed,
            **{CHECKPOINTING_ARG: gradient_checkpointing},
        )
        trainer = Trainer(model=model, args=args, train_dataset=CountingData(seed=seed),
                          callbacks=[lorakit.AdapterCheckpointCallback()])
        result = trainer.train()
        trainer.save_model(str(out_dir))  # the model's save_pretrained: the adapter in PEFT's layout
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    adapter_dir = Path(out_dir)
    return {"model": model, "trainer": trainer, "losses": losses, "train_loss": result.training_loss,
            "adapter_dir": adapter_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/trainer_example", help="where the adapter is saved")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--save-steps", type=int, default=None, help="Trainer checkpoints (the adapter) every N steps")
    parser.add_argument("--work-dir", default=None, help="Trainer's output_dir (checkpoints); default: a temporary one")
    args = parser.parse_args()
    out = train(args.out, steps=args.steps, gradient_checkpointing=args.gradient_checkpointing,
                save_steps=args.save_steps, work_dir=args.work_dir)
    first, last = out["losses"][0], out["losses"][-1]
    print(f"loss {first:.3f} -> {last:.3f} (ln {VOCAB} = {math.log(VOCAB):.3f} is chance)")
    print(f"adapter saved to {out['adapter_dir']}")


if __name__ == "__main__":
    main()
