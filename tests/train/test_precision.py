"""Precision in `lorakit train`: fp16 loss scaling (unscale before clipping, skipped steps, exact resume with
the scaler's state, a collapsed scale stops the run), and a bf16 base with fp32 adapters."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from test_loop import lm_config as loop_config

import lorakit
from lorakit.errors import ConfigError
from lorakit.train import precision
from lorakit.train.config import TrainConfig
from lorakit.train.loop import TrainingError, train


class InfGrad(torch.autograd.Function):
    """Identity forward; backward sends inf: the gradients of every weight overflow, as in fp16."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def lm_config(tmp_path, model_dir, **overrides) -> TrainConfig:
    return loop_config(tmp_path, model_dir, **{"max_steps": 8, "diagnostics_steps": 0, **overrides})


def overflow_at(monkeypatch, bad_steps):
    """Make the gradients inf at the given optimizer steps (one forward per step), the loss itself finite."""
    calls = {"n": 0}
    original = torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return InfGrad.apply(loss) if bad_steps(calls["n"]) else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)


def metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


@pytest.mark.parametrize("precision_, trainable, frozen, expected", [
    ("fp16", [torch.float32], [torch.float32], True),
    ("bf16", [torch.float32], [torch.float32], False),
    ("no", [torch.float32], [torch.float32], False),
    ("bf16", [torch.float32], [torch.bfloat16], False),
    ("no", [torch.float32], [torch.float16], True),  # a frozen fp16 base: fp16 activations and gradients
    ("fp16", [torch.float16], [torch.float16], False),  # GradScaler cannot unscale fp16 gradients
])
def test_loss_scaling_is_on_only_where_fp16_gradients_flow(precision_, trainable, frozen, expected):
    assert precision.wants_loss_scaling(precision_, trainable, frozen) is expected


def test_fp16_clips_the_unscaled_gradients(tmp_path, causal_lm_dir, monkeypatch):
    norms: dict[str, list[float]] = {}
    original = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        params = list(params)
        total = original(params, max_norm, *args, **kwargs)
        norms.setdefault(mode, []).append(float(total))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    for mode in ("no", "fp16"):
        train(lm_config(tmp_path / mode, causal_lm_dir, max_steps=3, mixed_precision=mode))
    scale = torch.amp.GradScaler("cpu").get_scale()
    assert scale > 1000  # scaled gradients would be this many times too large
    for fp32, fp16 in zip(norms["no"], norms["fp16"], strict=True):
        assert math.isfinite(fp16) and fp16 == pytest.approx(fp32, rel=0.05)


def test_fp16_skips_overflowing_steps_and_resumes_with_the_loss_scale(tmp_path, causal_lm_dir, monkeypatch):
    overflow_at(monkeypatch, lambda n: n == 2)
    full = train(lm_config(tmp_path / "full", causal_lm_dir, mixed_precision="fp16", save_steps=4))
    scales = [x["loss_scale"] for x in metrics(tmp_path / "full" / "run")]
    initial = torch.amp.GradScaler("cpu").get_scale()
    assert scales[0] == initial and all(s == initial / 2 for s in scales[1:])  # step 2 skipped, scale halved
    assert all(math.isfinite(x) for x in full.losses)
    monkeypatch.undo()
    checkpoint = tmp_path / "full" / "run" / "checkpoints" / "step-0000004"
    resumed = train(lm_config(tmp_path / "full", causal_lm_dir, mixed_precision="fp16", save_steps=4,
                              resume=str(checkpoint), out=str(tmp_path / "resumed")))
    assert resumed.losses == full.losses  # bit-identical
    assert [x["loss_scale"] for x in metrics(tmp_path / "resumed")] == scales[4:]  # the scale came back


def test_fp16_skipped_step_leaves_the_adapter_unchanged(tmp_path, causal_lm_dir, monkeypatch):
    overflow_at(monkeypatch, lambda n: n >= 3)
    train(lm_config(tmp_path, causal_lm_dir, mixed_precision="fp16", max_steps=4, save_steps=2,
                    save_total_limit=3))
    saved = {}
    for step in (2, 4):
        path = tmp_path / "run" / "checkpoints" / f"step-{step:07d}" / "adapter" / "adapter_model.safetensors"
        with safe_open(str(path), "pt") as f:
            saved[step] = {k: f.get_tensor(k) for k in f.keys()}
    assert saved[2].keys() == saved[4].keys()
    assert all(torch.equal(saved[2][k], saved[4][k]) for k in saved[2])  # steps 3, 4 skipped, no nan written


def test_collapsed_loss_scale_stops_with_a_clear_message(tmp_path, causal_lm_dir, monkeypatch):
    first_bad = 3
    overflow_at(monkeypatch, lambda n: n >= first_bad)
    initial = torch.amp.GradScaler("cpu").get_scale()
    skips = int(math.log2(initial / precision.MIN_LOSS_SCALE)) + 1  # halvings until the scale is below the floor
    last = first_bad + skips - 1
    cfg = lm_config(tmp_path, causal_lm_dir, mixed_precision="fp16", max_steps=last + 20, save_steps=2)
    with pytest.raises(TrainingError) as caught:
        train(cfg)
    text = str(caught.value)
    assert f"at step {last}," in text and f"after {skips} skipped steps" in text
    assert "bf16" in text and "learning-rate" in text
    named = tmp_path / "run" / "checkpoints" / f"step-{last - last % 2:07d}"
    assert str(named) in text and (named / "adapter" / "adapter_model.safetensors").is_file()


def test_bf16_base_with_fp32_adapters_trains_and_reloads_with_equal_logits(tmp_path, causal_lm_dir):
    from transformers import AutoModelForCausalLM

    from lorakit.hf import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(causal_lm_dir, dtype=torch.bfloat16)
    result = train(lm_config(tmp_path, causal_lm_dir, max_steps=20, lora_dropout=0.0, dtype="bf16"),
                   model=model, tokenizer=load_tokenizer(causal_lm_dir))
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    adapters = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and set(adapters.values()) == {torch.float32}
    assert model.model.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.bfloat16
    with safe_open(str(result.saved_dir / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        reloaded = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(causal_lm_dir, dtype=torch.bfloat16),
                                        result.saved_dir)
        base = AutoModelForCausalLM.from_pretrained(causal_lm_dir, dtype=torch.bfloat16)
        assert (base(ids).logits.float() - trained.float()).abs().max() > 1e-3  # the adapter learned something
        assert torch.equal(reloaded(ids).logits, trained)


def test_dtype_is_validated_and_must_match_on_resume(tmp_path, causal_lm_dir):
    with pytest.raises(ConfigError, match="dtype must be one of auto, fp32, bf16, fp16; got 'fp8'"):
        lm_config(tmp_path, causal_lm_dir, dtype="fp8")
    train(lm_config(tmp_path, causal_lm_dir, max_steps=2, save_steps=2))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    with pytest.raises(Exception, match="dtype was 'auto' there, 'bf16' now"):
        train(lm_config(tmp_path, causal_lm_dir, max_steps=2, dtype="bf16", resume=str(checkpoint)))
