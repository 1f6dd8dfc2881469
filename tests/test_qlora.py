"""QLoRA: adapters on NF4 bases (LoRA, rsLoRA, DoRA), training, merging (dense and re-quantised), the CLI.

References are dense models whose Linear weights are the dequantised NF4 weights, with the same adapters: an
adapter on an NF4 layer must compute exactly what it computes on that dense layer.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lorakit
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from lorakit.layers import LoraLayer
from lorakit.quant import NF4Linear
from lorakit.quant.merge import LossyMergeWarning
from lorakit.train.config import TrainConfig

HIDDEN = 128  # in_features a multiple of 64: every block lies within one row


def _nf4_and_dense(compute_dtype=torch.float32, hidden=HIDDEN):
    """(NF4 model, dense fp32 model whose Linear weights are the NF4 model's dequantised weights)."""
    dense = tiny_llama(hidden=hidden)
    nf4 = lorakit.quantize(copy.deepcopy(dense), "nf4", compute_dtype=compute_dtype)
    with torch.no_grad():
        for name, module in nf4.named_modules():
            if isinstance(module, NF4Linear):
                dense.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    return nf4, dense


def _attach_same(models, config):
    for model in models:
        torch.manual_seed(1)
        lorakit.attach(model, config)
        randomize_adapters(model, std=0.05, seed=7)


def _nf4_layers(model):
    return [m for m in model.modules() if isinstance(m, NF4Linear)]


def _weight_shapes(model):
    return {s for m in _nf4_layers(model) for s in ((m.out_features, m.in_features), (m.in_features, m.out_features))}


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_adapter_on_nf4_equals_dense_reference(extra):
    nf4, dense = _nf4_and_dense()
    _attach_same((nf4, dense), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", **extra))
    layers = [m for m in nf4.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14 and all(layer.kind.name == "nf4_linear" for layer in layers)
    ids = token_ids(2, 9)
    out, ref = nf4(ids).logits, dense(ids).logits
    assert (out - ref).abs().max() <= 1e-5
    out.square().mean().backward()
    ref.square().mean().backward()
    grads = {n: p.grad for n, p in nf4.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and len(grads) == 14 * (3 if extra.get("use_dora") else 2)
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-6, rtol=1e-4), name


def test_lora_on_nf4_runs_as_one_fused_op(monkeypatch):
    """LoRA on an NF4Linear is one op (ops.lora.lora_linear with W0 dequantised on demand), not the base layer's
    forward followed by the adapter; dropout draws the same masks as on a dense layer."""
    import lorakit.layer_kinds as kinds
    import lorakit.quant.kinds as quant_kinds

    nf4, dense = _nf4_and_dense()
    _attach_same((nf4, dense), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.2))
    calls = []
    real = kinds.lora_linear
    monkeypatch.setattr(kinds, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(quant_kinds, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(NF4Linear, "forward", lambda self, x: pytest.fail("NF4Linear.forward ran"))
    ids = token_ids(2, 9)
    outs = []
    for model in (nf4, dense):
        model.train()
        torch.manual_seed(3)
        outs.append(model(ids).logits)
    assert len(calls) == 28  # 14 layers in each model
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_only_adapters_train_and_no_dense_weight_is_held(use_dora):
    nf4, _ = _nf4_and_dense(hidden=256)  # no NF4 weight shape equals the embedding's or the head's (vocab 64)
    lorakit.attach(nf4, lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora, dropout=0.1))
    nf4.train()

    def held(model):
        tensors = [*model.parameters(), *model.buffers()]
        tensors += [v[1] for m in model.modules() for v in [getattr(m, "_w0_sq", None)] if v is not None]
        return {(tuple(t.shape), t.dtype) for t in tensors}, sum(t.numel() * t.element_size() for t in tensors)

    shapes_before, bytes_before = held(nf4)
    opt = torch.optim.AdamW([p for p in nf4.parameters() if p.requires_grad], lr=1e-2)
    saved = []
    for _ in range(2):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss = nf4(token_ids(2, 9), labels=token_ids(2, 9)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trainable = {n for n, p in nf4.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    assert all(p.grad is None for p in nf4.parameters())  # zero_grad(set_to_none) left nothing; nothing else got one
    shapes_after, bytes_after = held(nf4)
    assert shapes_after == shapes_before and bytes_after == bytes_before  # nothing new held between steps
    full = _weight_shapes(nf4)
    assert not any(s[0] in full for s in shapes_after if len(s[0]) == 2)  # no dense weight anywhere in the model
    assert not full.intersection(saved)  # and none saved for backward
    nf4_bytes = sum(t.numel() * t.element_size() for m in _nf4_layers(nf4) for t in m.buffers())
    assert nf4_bytes / sum(m.in_features * m.out_features for m in _nf4_layers(nf4)) <= 0.52


def test_dora_row_norms_computed_once_per_weight(monkeypatch):
    from lorakit.variants import dora

    nf4, _ = _nf4_and_dense()
    calls = []
    real = dora.row_norms_sq
    monkeypatch.setattr(dora, "row_norms_sq", lambda w, layout: calls.append(w.shape) or real(w, layout))
    lorakit.attach(nf4, lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert len(calls) == 2  # one per layer, at attach
    for _ in range(3):
        nf4(token_ids()).logits.sum().backward()
    assert len(calls) == 2  # the cache keys on the NF4 codes, not on the fresh dequantised tensor


def test_merge_and_unload_returns_dense_linear_and_warns():
    def adapted():
        nf4, _ = _nf4_and_dense(compute_dtype=torch.bfloat16)
        _attach_same((nf4,), lorakit.LoraConfig(r=4, target_modules="all-linear"))
        return nf4

    nf4 = adapted()
    ids = token_ids(2, 9)
    with torch.no_grad():
        before = nf4(ids).logits
    with pytest.warns(LossyMergeWarning, match="dequantised weights"):
        merged = lorakit.merge_and_unload(nf4, dtype=torch.float32)
    assert not _nf4_layers(merged) and not any(isinstance(m, LoraLayer) for m in merged.modules())
    linears = [m for m in merged.model.layers.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 14 and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    with torch.no_grad():
        after = merged(ids).logits
    assert (after - before).norm() / before.norm() < 0.02  # the NF4 model multiplies in bf16, the merged one in fp32

    with pytest.warns(LossyMergeWarning):
        in_bf16 = lorakit.merge_and_unload(adapted())  # default: the compute dtype
    assert in_bf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_merge_and_unload_fp32_logits_and_untargeted_nf4_layers():
    nf4, _ = _nf4_and_dense()
    _attach_same((nf4,), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    ids = token_ids(2, 9)
    with torch.no_grad():
        before = nf4(ids).logits
    with pytest.warns(LossyMergeWarning):
        merged = lorakit.merge_and_unload(nf4)
    assert not _nf4_layers(merged)  # o_proj, mlp, ... were not adapted: dequantised as well
    with torch.no_grad():
        assert (merged(ids).logits - before).abs().max() <= 1e-4


def test_merge_in_place_is_refused_unless_requantize():
    nf4, _ = _nf4_and_dense()
    _attach_same((nf4,), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    q_proj = nf4.model.layers[0].self_attn.q_proj
    old_packed = q_proj.base_layer.packed.clone()
    with pytest.raises(lorakit.MergeError, match="model.layers.0.self_attn.q_proj.*NF4.*requantize=True"):
        lorakit.merge(nf4)
    assert torch.equal(q_proj.base_layer.packed, old_packed) and not q_proj.merged

    ids = token_ids(2, 9)
    with torch.no_grad():
        unmerged = nf4(ids).logits
        with lorakit.disabled(nf4):
            base_only = nf4(ids).logits
    old_w = q_proj.base_layer.dequantize(torch.float32)
    delta = q_proj.adapters["default"].delta_weight(q_proj.base_layer)
    with pytest.warns(LossyMergeWarning, match="re-quantis"):
        report = lorakit.merge(nf4, requantize=True)
    assert set(report) == {layer.path for layer in nf4.modules() if isinstance(layer, LoraLayer)}
    new_w = q_proj.base_layer.dequantize(torch.float32)
    err = new_w - (old_w + delta)
    entry = report["model.layers.0.self_attn.q_proj"]
    assert entry["max_abs_error"] == pytest.approx(err.abs().max().item(), rel=1e-5)
    assert entry["rel_fro_error"] == pytest.approx((err.norm() / (old_w + delta).norm()).item(), rel=1e-4)
    assert entry["update_rel_error"] == pytest.approx((err.norm() / delta.norm()).item(), rel=1e-4)
    assert 0 < entry["rel_fro_error"] < 0.2 and q_proj.merged == ["default"]
    with torch.no_grad():
        merged = nf4(ids).logits
        with lorakit.disabled(nf4):  # takes the merge out (the old codes, bit for bit) and puts it back
            assert torch.equal(nf4(ids).logits, base_only)
        assert torch.equal(nf4(ids).logits, merged)
    assert 0 < (merged - unmerged).norm() < (base_only - unmerged).norm()  # the update is in, not exactly
    lorakit.unmerge(nf4)
    assert torch.equal(q_proj.base_layer.packed, old_packed)
    with torch.no_grad():
        assert torch.equal(nf4(ids).logits, unmerged)


def test_pissa_on_nf4_is_refused():
    nf4, _ = _nf4_and_dense()
    with pytest.raises(lorakit.ConfigError, match="init='pissa'.*quantised.*NF4Linear"):
        lorakit.attach(nf4, lorakit.LoraConfig(r=4, target_modules="all-linear", init="pissa"))
    assert not any(isinstance(m, LoraLayer) for m in nf4.modules())


# -- lorakit train --quantize nf4, lorakit merge ---------------------------------------------------------------
RECORDS = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(6) for b in range(4)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return path


def _train_argv(model_dir, data, out, *extra, steps=24):
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "8", "--learning-rate", "2e-2", "--progress", "false", "--logging-steps", "1",
            "--lora-dropout", "0", "--warmup-steps", "0", "--lr-scheduler-type", "constant", "--seed", "3", *extra]


def test_train_quantize_nf4_loss_falls_and_merge_cli(tmp_path, causal_lm_dir, data_file, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lorakit.cli.main import main
    from lorakit.train import loop

    seen = {}
    attach = loop.attach_for_training

    def spy(model, cfg, task):
        seen["types"] = {type(m).__name__ for m in model.model.layers.modules()}
        seen["head"] = type(model.lm_head).__name__
        attach(model, cfg, task)

    def no_full_precision_quantize(*args, **kwargs):
        raise AssertionError("the base was loaded in full precision and then quantised, not quantised as it was read")

    monkeypatch.setattr(loop, "attach_for_training", spy)
    monkeypatch.setattr(loop, "quantize_base", no_full_precision_quantize)
    out = tmp_path / "run"
    assert main(_train_argv(causal_lm_dir, data_file, out, "--quantize", "nf4",
                            "--quantize-compute-dtype", "fp32")) == 0
    assert "NF4Linear" in seen["types"] and "Linear" not in seen["types"] and seen["head"] == "Linear"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 24 and sum(losses[-3:]) < 0.97 * sum(losses[:3])  # last epoch vs first (3 batches each)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False  # a plain LoRA file

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(causal_lm_dir), "--adapter", str(out / "adapter"),
                 "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
    base = AutoModelForCausalLM.from_pretrained(causal_lm_dir, local_files_only=True).eval()
    lorakit.load_adapter(base, out / "adapter")
    nf4 = lorakit.quantize(AutoModelForCausalLM.from_pretrained(causal_lm_dir, local_files_only=True).eval(),
                           compute_dtype=torch.float32)
    lorakit.load_adapter(nf4, out / "adapter")
    ids = torch.randint(0, 60, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits, base_logits, nf4_logits = merged(ids).logits, base(ids).logits, nf4(ids).logits
    assert (merged_logits - base_logits).abs().max() <= 1e-5  # W0 + s B A on the full-precision base
    assert (merged_logits - nf4_logits).norm() / nf4_logits.norm() < 0.2  # close to what was trained


@pytest.mark.parametrize("method", ["dora", "lora_fa"])
def test_train_quantize_nf4_with_dora_and_lora_fa(tmp_path, causal_lm_dir, data_file, method):
    from safetensors.torch import load_file

    from lorakit.cli.main import main

    out = tmp_path / "run"
    assert main(_train_argv(causal_lm_dir, data_file, out, "--quantize", "nf4", "--method", method, steps=3)) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert config["use_dora"] is (method == "dora")
    assert any(k.endswith("lora_magnitude_vector") for k in keys) is (method == "dora")


def test_quantize_base_keeps_heads_and_refuses_a_model_without_linear_layers():
    from lorakit.train.loop import quantize_base

    bert = tiny_bert()
    quantize_base(bert, TrainConfig(quantize="nf4"), "classification", torch.device("cpu"))
    assert type(bert.classifier) is nn.Linear and isinstance(bert.bert.pooler.dense, NF4Linear)
    with pytest.raises(lorakit.ConfigError, match="GPT2LMHeadModel has no nn.Linear layer to quantise"):
        quantize_base(tiny_gpt2(), TrainConfig(quantize="nf4"), "causal-lm", torch.device("cpu"))


@pytest.mark.parametrize(("fields", "match"), [
    ({"quantize": "int8"}, "quantize must be one of"),
    ({"quantize": "nf4", "method": "full"}, "method 'full'"),
    ({"quantize": "nf4", "quantize_compute_dtype": "fp64"}, "quantize_compute_dtype must be one of"),
])
def test_train_config_refuses_bad_quantize_options(fields, match):
    with pytest.raises(lorakit.ConfigError, match=match):
        TrainConfig(**fields)
    assert TrainConfig(quantize="none").quantize is None


def test_train_with_unusable_compute_dtype(tmp_path, causal_lm_dir, data_file, monkeypatch):
    from lorakit.train.loop import train

    real_linear = nn.functional.linear

    def no_fp16(x, w, b=None):
        if x.dtype == torch.float16:
            raise RuntimeError('"addmm" not implemented for \'Half\'')
        return real_linear(x, w, b)

    monkeypatch.setattr(nn.functional, "linear", no_fp16)  # a device without float16 matmul
    cfg = TrainConfig(model=str(causal_lm_dir), data=str(data_file), out=str(tmp_path / "run"), max_steps=1,
                      quantize="nf4", quantize_compute_dtype="fp16", progress=False)
    with pytest.raises(lorakit.ConfigError, match="float16 cannot be used on device cpu"):
        train(cfg)


# -- bitsandbytes Linear4bit (a transformers model loaded with BitsAndBytesConfig(load_in_4bit=True)) ---------------
@pytest.fixture(scope="module")
def bnb_model_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes", minversion="0.50.2")
    path = tmp_path_factory.mktemp("bnb_base")
    tiny_llama(hidden=HIDDEN).save_pretrained(path)
    return path


def _load_4bit(path):
    """The model with Linear4bit layers, in train mode (no dropout in it): in eval mode without gradients,
    bitsandbytes 0.50.2 repacks the weight on an AVX512-BF16 CPU for a bf16 kernel, with bf16 block scales."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                                device_map="cpu", local_files_only=True).train()


@pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes", "ignore::FutureWarning")
@pytest.mark.parametrize("extra", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_linear4bit_adapter_equals_peft_and_lorakit_nf4(tmp_path, bnb_model_dir, extra):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ours = _load_4bit(bnb_model_dir)
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", **extra)
    _attach_same((ours,), config)
    layers = [m for m in ours.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14 and {layer.kind.name for layer in layers} == {"bnb_linear4bit"}
    lorakit.save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_load_4bit(bnb_model_dir), tmp_path / "adapter").train()
    nf4 = lorakit.quantize(AutoModelForCausalLM.from_pretrained(bnb_model_dir, local_files_only=True).eval(),
                           compute_dtype=torch.float32)  # the same codes, bit for bit (test_nf4.py)
    lorakit.load_adapter(nf4, tmp_path / "adapter")
    ids = token_ids(2, 9)
    with torch.no_grad():
        out, peft_out, nf4_out = ours(ids).logits, theirs(ids).logits, nf4(ids).logits
    assert (out - peft_out).abs().max() <= 1e-5 and (out - nf4_out).abs().max() <= 1e-5

    ours(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert with_grad and all(".adapters." in n for n in with_grad)
    with pytest.warns(LossyMergeWarning):
        merged = lorakit.merge_and_unload(ours)
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        assert (merged(ids).logits - out).abs().max() <= 1e-4


@pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes", "ignore::FutureWarning")
def test_linear4bit_requantize_merge_and_unmerge(bnb_model_dir):
    model = _load_4bit(bnb_model_dir)
    _attach_same((model,), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    q_proj = model.model.layers[0].self_attn.q_proj
    old = q_proj.base_layer.weight.data.clone()
    ids = token_ids(2, 9)
    with torch.no_grad():
        unmerged = model(ids).logits
    with pytest.raises(lorakit.MergeError, match="Linear4bit"):
        lorakit.merge(model)
    with pytest.warns(LossyMergeWarning):
        report = lorakit.merge(model, requantize=True)
    assert set(report) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert not torch.equal(q_proj.base_layer.weight.data, old) and 0 < report[q_proj.path]["rel_fro_error"] < 0.2
    lorakit.unmerge(model)
    assert torch.equal(q_proj.base_layer.weight.data, old)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, unmerged)
