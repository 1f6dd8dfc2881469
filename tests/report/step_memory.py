"""Measure the peak memory of one LoRA training step of a tiny Llama in a fresh process (run as a script by
test_plan.py; prints one JSON line). The approach of benchmarks/child.py: the resident set before the model is
built, then the kernel's RSS high-water mark reset (/proc/self/clear_refs) after it is built, so that the high-water
mark after forward + backward + AdamW step is the peak of that step; measured total = peak - RSS before the model.
The mark is read as VmHWM from /proc/self/status, not ru_maxrss: on Linux ru_maxrss also keeps the peak of the
process this one was exec'd from (a pytest process of ~1 GB), which clear_refs does not reset.
A warm-up step of a 1-layer, 32-wide model on 8 tokens first, so that lazy imports and kernel set-up are not
counted (it leaves well under 1 MB of freed memory that the measured model may reuse)."""

from __future__ import annotations

import gc
import json
import sys
from typing import Any


def rss() -> int:
    """Resident bytes now (from /proc/self/statm)."""
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def high_water_mark() -> int:
    """The peak resident bytes of this process's memory since the last reset (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def build(spec: dict, **overrides: int) -> tuple[Any, Any]:
    """The tiny Llama of `spec` (its config with `overrides`), LoRA attached, in train mode, and its AdamW."""
    import torch
    import transformers

    import lorakit

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**spec["config"], **overrides}))
    lorakit.attach(model, lorakit.LoraConfig(r=spec["r"], target_modules=spec["target_modules"]))
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def step(model: Any, optimizer: Any, ids: Any) -> float:
    """One training step: forward with labels, backward, AdamW, gradients set to None. Returns the loss."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main(spec: dict) -> dict:
    import torch

    import lorakit

    torch.set_num_threads(1)
    lorakit.tune_cpu_allocator()  # as `lorakit train` on the CPU: freed step memory is kept and reused
    vocab = spec["config"]["vocab_size"]
    warm, warm_opt = build(spec, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    step(warm, warm_opt, torch.randint(0, vocab, (1, 8)))
    del warm, warm_opt
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq_len"]), generator=torch.Generator().manual_seed(0))
    gc.collect()
    before = rss()
    model, optimizer = build(spec)
    gc.collect()
    built = rss()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    loss = step(model, optimizer, ids)
    peak = high_water_mark()
    return {"before": before, "built": built, "peak": peak, "weights": built - before, "step": peak - built,
            "total": peak - before, "attention": model.config._attn_implementation, "loss": loss,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
