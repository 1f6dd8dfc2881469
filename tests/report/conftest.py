"""Fixtures of the `lorakit report` tests: a tiny `lorakit train` run (metrics, diagnostics, eval, checkpoints,
adapter) and a tiny adapter saved by the real `peft` (save_pretrained, B made non-zero)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from report_helpers import RUN_STEPS

LM_RECORDS = [
    {"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(6) for b in range(6)
]


@pytest.fixture(scope="session")
def report_run(tmp_path_factory, causal_lm_dir) -> Path:
    """A run directory of `lorakit train`: 8 steps, diagnostics and eval every 4, checkpoints at 4 and 8."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    root = tmp_path_factory.mktemp("report_run")
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in LM_RECORDS) + "\n")
    train(TrainConfig(model=str(causal_lm_dir), data=str(data), out=str(root / "run"), max_steps=RUN_STEPS,
                      per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, diagnostics_steps=4,
                      eval_fraction=0.2, eval_steps=4, save_steps=4, progress=False, seed=3, warmup_steps=2))
    return root / "run"


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory, causal_lm_dir) -> Path:
    """A LoRA adapter (r=4, alpha=8, q_proj / v_proj) saved with peft's save_pretrained, lora_B randomised."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(causal_lm_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    out = tmp_path_factory.mktemp("peft_adapter")
    pm.save_pretrained(str(out))
    return out
