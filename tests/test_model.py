"""The model-level API on tiny Llama / GPT-2 / BERT models built from configs."""

from __future__ import annotations

import builtins
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import HIDDEN, max_abs_diff, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from lorakit.layers import LoraLayer, SavedModule

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_CONV1DS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def wrapped(model: nn.Module) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, LoraLayer))


def llama_paths(names: list[str], layers=(0, 1)) -> list[str]:
    out = []
    for i in layers:
        for n in names:
            block = "self_attn" if n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append(f"model.layers.{i}.{block}.{n}")
    return sorted(out)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------
# targeting
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (["model.layers.0.self_attn.q_proj"], ["model.layers.0.self_attn.q_proj"]),  # exact path
        (["q_proj"], llama_paths(["q_proj"])),  # a leaf name matches as a dotted suffix
        (["self_attn.v_proj", "mlp.up_proj"], llama_paths(["v_proj", "up_proj"])),  # dotted suffixes
        (r".*\.layers\.1\.self_attn\.(q|v)_proj", llama_paths(["q_proj", "v_proj"], layers=(1,))),  # regex
        (r"model\.layers\.\d\.mlp\..*_proj", llama_paths(["gate_proj", "up_proj", "down_proj"])),
        ("all-linear", llama_paths(LLAMA_LINEARS)),
    ],
    ids=["exact", "suffix", "dotted-suffix", "regex", "regex-mlp", "all-linear"],
)
def test_targeting_llama(target, expected: list[str]) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=target))
    assert wrapped(model) == expected
    assert not isinstance(model.lm_head, LoraLayer)
    assert not isinstance(model.model.embed_tokens, LoraLayer)


def test_all_linear_gpt2_takes_conv1d_and_excludes_lm_head() -> None:
    model = tiny_gpt2()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    expected = sorted(f"transformer.h.{i}.{n}" for i in (0, 1) for n in GPT2_CONV1DS)
    assert wrapped(model) == expected
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight  # weight tying survives


@pytest.mark.parametrize(
    "target",
    [["proj"], "q_proj", r"model\.layers\.0"],
    ids=["partial-name-is-not-a-suffix", "string-is-a-full-match-regex", "regex-prefix-only"],
)
def test_targeting_does_not_match_partially(target) -> None:
    with pytest.raises(lorakit.TargetError):
        lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=target))


def test_exclude_modules() -> None:
    model = tiny_llama()
    config = lorakit.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]
    )
    lorakit.attach(model, config)
    assert wrapped(model) == sorted(
        ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    )
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules="all-linear", exclude_modules=r".*mlp\..*"))
    assert wrapped(model) == llama_paths(["q_proj", "k_proj", "v_proj", "o_proj"])


def test_layers_to_transform() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert wrapped(model) == llama_paths(["q_proj", "v_proj"], layers=(1,))
    model = tiny_llama()
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")
    lorakit.attach(model, config)
    assert wrapped(model) == ["model.layers.0.self_attn.q_proj"]
    model = tiny_gpt2()
    config = lorakit.LoraConfig(r=2, target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h")
    lorakit.attach(model, config)
    assert wrapped(model) == ["transformer.h.1.attn.c_attn"]


def test_rank_and_alpha_patterns() -> None:
    model = tiny_llama()
    config = lorakit.LoraConfig(
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={r"model\.layers\.0\.self_attn\.q_proj": 3, "v_proj": 10},
    )
    lorakit.attach(model, config)
    v_out = 2 * (HIDDEN // 4)  # 2 kv heads of head_dim 8
    expected = {  # path: (r, alpha, out_features)
        "model.layers.0.self_attn.q_proj": (4, 3, HIDDEN),
        "model.layers.1.self_attn.q_proj": (6, 8, HIDDEN),
        "model.layers.0.self_attn.v_proj": (2, 10, v_out),
        "model.layers.1.self_attn.v_proj": (2, 10, v_out),
    }
    for path, (r, alpha, out) in expected.items():
        adapter = model.get_submodule(path).adapters["default"]
        assert adapter.r == r, path
        assert tuple(adapter.lora_A.shape) == (r, HIDDEN), path
        assert tuple(adapter.lora_B.shape) == (out, r), path
        assert adapter.scale == pytest.approx(alpha / r), path


def test_rslora_scale() -> None:
    model = tiny_llama()
    lorakit.attach(
        model,
        lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_rslora=True, rank_pattern={"q_proj": 16}),
    )
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.scale == pytest.approx(8 / math.sqrt(16))


# ---------------------------------------------------------------------------------------------------------
# modules_to_save, biases, parameter counts
# ---------------------------------------------------------------------------------------------------------
def test_modules_to_save_trainable_copy_and_disabled_uses_original() -> None:
    model = tiny_bert()
    ids = token_ids()
    base = logits(model, ids)
    original = model.classifier
    w0 = original.weight.detach().clone()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier, SavedModule)
    assert model.classifier.original_module is original
    copy_ = model.classifier.copies["default"]
    assert copy_ is not original
    assert all(p.requires_grad for p in copy_.parameters())
    assert not any(p.requires_grad for p in original.parameters())
    assert model.classifier.weight is original.weight  # attribute access reaches the original

    # one training step changes the copy, never the original
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss = model(input_ids=ids, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert copy_.weight.grad is not None and copy_.weight.grad.abs().sum() > 0
    assert original.weight.grad is None
    opt.step()
    assert torch.equal(original.weight, w0)
    assert max_abs_diff(copy_.weight, w0) > 0

    trained = logits(model, ids)
    assert max_abs_diff(trained, base) > 1e-4
    with lorakit.disabled(model):
        assert max_abs_diff(logits(model, ids), base) <= 1e-6
    assert torch.equal(logits(model, ids), trained)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_trainable_sets(bias: str) -> None:
    model = tiny_llama(attention_bias=True)
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias=bias))
    paths = llama_paths(["q_proj", "v_proj"])
    adapters = {f"{p}.adapters.default.lora_{ab}" for p in paths for ab in "AB"}
    lora_biases = {f"{p}.base_layer.bias" for p in paths}
    other_biases = {f"{p}.bias" for p in llama_paths(["k_proj", "o_proj"])}
    expected = {
        "none": adapters,
        "lora_only": adapters | lora_biases,
        "all": adapters | lora_biases | other_biases,
    }[bias]
    assert trainable_names(model) == expected


def test_trainable_parameters_exact_count() -> None:
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    r = 4
    lorakit.attach(model, lorakit.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    v_out = 2 * (HIDDEN // 4)
    per_layer = r * (HIDDEN + HIDDEN) + r * (HIDDEN + v_out)  # q: 32 -> 32, v: 32 -> 16
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == 2 * per_layer == 896
    assert total == total_before + trainable
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_trainable_parameters_counts_tied_weights_once() -> None:
    model = tiny_gpt2()
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == 2 * 2 * (HIDDEN + 3 * HIDDEN)  # 2 layers, c_attn: 32 -> 96
    assert total == unique + trainable


def test_set_trainable() -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.set_trainable(model, "default", False)
    assert lorakit.trainable_parameters(model)[0] == 0
    lorakit.set_trainable(model, "default", True)
    assert lorakit.trainable_parameters(model)[0] == 2 * 2 * (HIDDEN + HIDDEN)


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "checkpointing_kwargs",
    [None, {"use_reentrant": False}, {"use_reentrant": True}],
    ids=["default", "non-reentrant", "reentrant"],
)
def test_gradient_checkpointing_needs_no_extra_call(checkpointing_kwargs) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="random"))
    if checkpointing_kwargs is None:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    model.train()
    ids = token_ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, name


def test_reentrant_checkpointing_without_transformers_input_grads_hook() -> None:
    """Older transformers do not make the embedding output require grad when checkpointing is enabled
    (PEFT users then hit 'element 0 of tensors does not require grad'); lorakit's own hook covers it."""
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="random"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()  # remove transformers' hook: only lorakit's is left
    model.train()
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_training_reduces_loss_on_memorisation_task() -> None:
    model = tiny_llama(layers=1)
    config = lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])
    lorakit.attach(model, config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(1, 10)
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in model.named_parameters():  # the base model did not move
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---------------------------------------------------------------------------------------------------------
# merge_and_unload, active sets, files
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_and_unload_save_pretrained_round_trip(builder, tmp_path: Path) -> None:
    model = builder()
    ids = token_ids()
    base = logits(model, ids)
    target = ["q_proj", "v_proj"] if builder is tiny_llama else ["c_attn", "c_fc"]
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=target, init="random"))
    randomize_adapters(model)
    want = logits(model, ids)
    assert max_abs_diff(want, base) > 1e-3
    merged = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in merged.modules())
    assert max_abs_diff(logits(merged, ids), want) <= 1e-5
    merged.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert max_abs_diff(logits(reloaded, ids), want) <= 1e-5


def test_merge_and_unload_keeps_modules_to_save_copy() -> None:
    model = tiny_bert()
    ids = token_ids()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(0.5)
    want = logits(model, ids)
    lorakit.merge_and_unload(model)
    assert type(model.classifier) is nn.Linear
    assert max_abs_diff(logits(model, ids), want) <= 1e-5


def test_set_active_two_adapters_sum() -> None:
    model = tiny_llama()
    ids = token_ids()
    base = logits(model, ids)
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="a")
    lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=3, target_modules=["v_proj", "down_proj"]), name="b")
    randomize_adapters(model)
    assert lorakit.adapter_names(model) == ["a", "b"]
    assert lorakit.active_adapters(model) == ["b"]  # the latest attach is active
    lorakit.set_active(model, "a")
    out_a = logits(model, ids)
    lorakit.set_active(model, ["b"])
    out_b = logits(model, ids)
    lorakit.set_active(model, ["a", "b"])
    assert lorakit.active_adapters(model) == ["a", "b"]
    out_ab = logits(model, ids)
    assert max_abs_diff(out_a, base) > 1e-3 and max_abs_diff(out_b, base) > 1e-3
    assert max_abs_diff(out_a, out_b) > 1e-3
    # the model is non-linear: compare per-layer additivity on a single wrapped layer instead of logits
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_v = layer.base_layer(x)
        lorakit.set_active(model, ["a"])
        va = layer(x)
        lorakit.set_active(model, ["b"])
        vb = layer(x)
        lorakit.set_active(model, ["a", "b"])
        vab = layer(x)
    assert max_abs_diff(vab - base_v, (va - base_v) + (vb - base_v)) <= 1e-5
    assert max_abs_diff(out_ab, out_a) > 1e-4 and max_abs_diff(out_ab, out_b) > 1e-4


def test_get_config() -> None:
    model = tiny_llama()
    config = lorakit.LoraConfig(r=3, alpha=6, target_modules=["q_proj"])
    lorakit.attach(model, config, name="mine")
    got = lorakit.get_config(model, "mine")
    assert got.r == 3 and got.alpha == 6 and got.target_modules == ["q_proj"]


def test_load_adapter_keeps_the_active_set(tmp_path: Path) -> None:
    source = tiny_llama()
    lorakit.attach(source, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), name="b")
    randomize_adapters(source)
    lorakit.save_adapter(source, tmp_path, name="b")
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()

    model = tiny_llama()
    ids = token_ids()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="a")
    randomize_adapters(model, seed=5)
    out_a = logits(model, ids)
    lorakit.load_adapter(model, tmp_path, name="b")
    assert lorakit.adapter_names(model) == ["a", "b"]
    assert lorakit.active_adapters(model) == ["a"]
    assert torch.equal(logits(model, ids), out_a)
    # loaded adapters are frozen unless asked for
    assert not any(p.requires_grad for p in model.model.layers[0].self_attn.v_proj.adapters["b"].parameters())
    lorakit.set_active(model, ["b"])
    assert max_abs_diff(logits(model, ids), logits(source, ids)) <= 1e-6


def test_load_adapter_on_a_fresh_model_makes_it_active(tmp_path: Path) -> None:
    source = tiny_gpt2()
    lorakit.attach(source, lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    randomize_adapters(source)
    lorakit.save_adapter(source, tmp_path)
    model = tiny_gpt2()
    lorakit.load_adapter(model, tmp_path, trainable=True)
    assert lorakit.active_adapters(model) == ["default"]
    assert lorakit.trainable_parameters(model)[0] == lorakit.trainable_parameters(source)[0]
    ids = token_ids()
    assert torch.equal(logits(model, ids), logits(source, ids))


def _save_then_make_legacy(tmp_path: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    source = tiny_llama()
    lorakit.attach(source, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(source)
    lorakit.save_adapter(source, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_model.safetensors").unlink()
    return source, tensors


def test_legacy_bin_loads(tmp_path: Path) -> None:
    source, tensors = _save_then_make_legacy(tmp_path)
    torch.save(tensors, tmp_path / "adapter_model.bin")
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path)
    ids = token_ids()
    assert torch.equal(logits(model, ids), logits(source, ids))


class _CreatesFileWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_legacy_bin_with_pickled_code_is_refused_without_running_it(tmp_path: Path) -> None:
    _, tensors = _save_then_make_legacy(tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-pwned.txt"
    tensors["base_model.model.extra"] = _CreatesFileWhenUnpickled(marker)
    torch.save(tensors, tmp_path / "adapter_model.bin")
    assert not marker.exists()
    model = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError, match=re.escape("adapter_model.bin")):
        lorakit.load_adapter(model, tmp_path)
    assert not marker.exists(), "loading the .bin ran pickled code"
    assert lorakit.adapter_names(model) == []
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_bias_all_keeps_the_modules_to_save_original_frozen() -> None:
    """bias="all" trains every base bias, but not the frozen original of a modules_to_save head (as PEFT)."""
    model = tiny_bert()
    config = lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"], bias="all")
    lorakit.attach(model, config)
    assert "classifier.copies.default.bias" in trainable_names(model)
    assert "bert.pooler.dense.bias" in trainable_names(model)
    assert "classifier.original_module.bias" not in trainable_names(model)


def test_bias_all_with_modules_to_save_saves_the_trained_copy(tmp_path: Path) -> None:
    """The file's `classifier.bias` is the trained copy's (not the original's), and loading it leaves the
    fresh model's original head untouched."""
    model = tiny_bert()
    ids = token_ids()
    base = logits(model, ids)
    config = lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"], bias="all")
    lorakit.attach(model, config)
    with torch.no_grad():
        model.classifier.copies["default"].bias.add_(1.0)  # "trained" head bias
    want = logits(model, ids)
    assert max_abs_diff(want, base) > 0.5
    lorakit.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.classifier.bias"], model.classifier.copies["default"].bias)
    fresh = tiny_bert()
    lorakit.load_adapter(fresh, tmp_path)
    assert max_abs_diff(logits(fresh, ids), want) <= 1e-6
    with lorakit.disabled(fresh):
        assert max_abs_diff(logits(fresh, ids), base) <= 1e-6
