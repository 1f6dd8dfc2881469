"""Helpers of the `lorakit report` tests: a tiny `lorakit train` run and a tiny adapter saved by the real `peft`
(made into fixtures by each test module: a conftest.py here would shadow tests/conftest.py's `from conftest import`),
the page's inlined data, and the rank-k numbers computed independently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lorakit.analysis import lowrank_singular_values

RUN_STEPS = 8


def inlined_data(html: str) -> dict:
    """The JSON the page inlines in <script type="application/json" id="report-data">."""
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert found, "the page has no inlined data"
    return json.loads(found.group(1))


def expected_rank_k(adapter_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """{module: [(energy kept, relative error) for k = 1..r]} computed here from the factors in the file, with
    the truncation error as ||ΔW - ΔW_k||_F / ||ΔW||_F from torch's SVD of the small product (independent of
    lorakit.report)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        b = tensors[key.replace("lora_A", "lora_B")]
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        scale = cfg["lora_alpha"] / cfg["r"]
        sv = lowrank_singular_values(b, a, scale).tolist()
        dense = scale * (b.double() @ a.double())  # tiny model: the dense check is cheap here
        u, s, vh = torch.linalg.svd(dense)
        rows = []
        for k in range(1, a.shape[0] + 1):
            truncated = (u[:, :k] * s[:k]) @ vh[:k]
            rows.append((sum(x * x for x in sv[:k]) / sum(x * x for x in sv),
                         float(torch.linalg.norm(dense - truncated) / torch.linalg.norm(dense))))
        out[module] = rows
    return out


LM_RECORDS = [
    {"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(6) for b in range(6)
]


def build_report_run(tmp_path_factory, causal_lm_dir) -> Path:
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


def build_peft_adapter(tmp_path_factory, causal_lm_dir) -> Path:
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
