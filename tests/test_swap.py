"""Hot swap (lorakit.swap): prepare_swap pads to a declared max rank, swap_adapter replaces an adapter's weights
from a file in place. A swap must give the logits of a fresh load of the same file, keep every Parameter object,
not recompile a torch.compile'd model, save the file's true rank (PEFT loads it), and leave the adapter
unchanged when the file is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from conftest import VOCAB, max_abs_diff, randomize_adapters, tiny_gpt2, tiny_llama, token_ids

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=token_ids() if ids is None else ids).logits


def adapter_file(tmp: Path, label: str, seed: int, build=tiny_llama, **config) -> Path:
    """Attach a LoRA adapter (config) to a fresh base, give it random weights (seed), save it; return its dir."""
    model = build()
    lorakit.attach(model, lorakit.LoraConfig(**config))
    randomize_adapters(model, seed=seed)
    return lorakit.save_adapter(model, tmp / label)


def fresh_load(path: Path, build=tiny_llama) -> torch.Tensor:
    model = build()
    lorakit.load_adapter(model, path)
    return logits(model)


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], ids_before: set[int]) -> None:
    params = parameters_of(model)
    assert {id(p) for p in params.values()} == ids_before
    for name, p in params.items():
        assert torch.equal(p.detach(), before[name]), name


# -- swap equals a fresh load ------------------------------------------------------------------------------
def test_swap_same_rank_equals_fresh_load(tmp_path: Path) -> None:
    first = adapter_file(tmp_path, "a", seed=1, r=4, alpha=8, target_modules=LLAMA_TARGETS)
    second = adapter_file(tmp_path, "b", seed=2, r=4, alpha=8, target_modules=LLAMA_TARGETS)
    model = tiny_llama()
    lorakit.load_adapter(model, first)
    params = {id(p) for p in model.parameters()}
    assert max_abs_diff(logits(model), fresh_load(first)) == 0.0
    lorakit.swap_adapter(model, "default", second)
    want = fresh_load(second)
    assert max_abs_diff(want, fresh_load(first)) > 1e-2  # the two adapters differ: the check is not vacuous
    assert max_abs_diff(logits(model), want) <= 1e-6
    assert {id(p) for p in model.parameters()} == params  # no new Parameter
    lorakit.swap_adapter(model, "default", first)  # and back
    assert max_abs_diff(logits(model), fresh_load(first)) <= 1e-6


def test_smaller_rank_other_alpha_into_padded_adapter(tmp_path: Path) -> None:
    big = adapter_file(tmp_path, "big", seed=1, r=8, alpha=16, target_modules=LLAMA_TARGETS)
    small = adapter_file(tmp_path, "small", seed=2, r=2, alpha=5, target_modules=LLAMA_TARGETS)
    rs = adapter_file(tmp_path, "rs", seed=3, r=3, alpha=7, use_rslora=True, target_modules=LLAMA_TARGETS,
                      rank_pattern={"v_proj": 6}, alpha_pattern={"down_proj": 2.5})
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS))
    randomize_adapters(model, seed=7)
    before = logits(model)
    lorakit.prepare_swap(model, max_rank=8)
    assert max_abs_diff(logits(model), before) <= 1e-6  # zero padding keeps the output
    layer = model.model.layers[0].self_attn.q_proj
    assert tuple(layer.adapters["default"].lora_A.shape) == (8, 32)
    for path in (small, big, rs, small):
        lorakit.swap_adapter(model, "default", path)
        assert max_abs_diff(logits(model), fresh_load(path)) <= 1e-6, path.name
    assert tuple(layer.adapters["default"].lora_A.shape) == (8, 32)  # the shapes never change


def test_prepare_swap_then_save_writes_the_original_tensors(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=3, alpha=6, target_modules=LLAMA_TARGETS))
    randomize_adapters(model, seed=4)
    plain = load_file(lorakit.save_adapter(model, tmp_path / "plain") / "adapter_model.safetensors")
    lorakit.prepare_swap(model, max_rank=16)
    padded_dir = lorakit.save_adapter(model, tmp_path / "padded")
    padded = load_file(padded_dir / "adapter_model.safetensors")
    assert plain.keys() == padded.keys()
    assert all(torch.equal(plain[k], padded[k]) for k in plain)
    assert json.loads((padded_dir / "adapter_config.json").read_text())["r"] == 3


def test_peft_file_swaps_in_and_save_after_swap_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=LLAMA_TARGETS))
    randomize_adapters_peft(pm)
    want = logits(pm)
    pm.save_pretrained(str(tmp_path / "peft"))

    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS))
    randomize_adapters(model, seed=5)
    lorakit.prepare_swap(model, max_rank=4)
    lorakit.swap_adapter(model, "default", tmp_path / "peft")
    assert max_abs_diff(logits(model), want) <= 1e-5

    out = lorakit.save_adapter(model, tmp_path / "again")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 6)
    saved = load_file(out / "adapter_model.safetensors")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert saved.keys() == original.keys()
    for key in saved:
        assert saved[key].shape == original[key].shape, key
        torch.testing.assert_close(saved[key], original[key], rtol=1e-6, atol=0.0)  # B went through the gain
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(out))
    assert max_abs_diff(logits(reloaded), want) <= 1e-5


def randomize_adapters_peft(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_subset_file_zeroes_the_other_modules(tmp_path: Path) -> None:
    subset = adapter_file(tmp_path, "subset", seed=2, r=4, alpha=8, target_modules=["q_proj"])
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS))
    randomize_adapters(model, seed=3)
    lorakit.swap_adapter(model, "default", subset)
    assert max_abs_diff(logits(model), fresh_load(subset)) <= 1e-6
    v_proj = model.model.layers[1].self_attn.v_proj.adapters["default"]
    assert not v_proj.lora_A.any() and not v_proj.lora_B.any()


def test_dora_swap_smaller_rank_and_subset(tmp_path: Path) -> None:
    small = adapter_file(tmp_path, "small", seed=2, r=2, alpha=3, use_dora=True, target_modules=LLAMA_TARGETS)
    subset = adapter_file(tmp_path, "subset", seed=3, r=4, alpha=8, use_dora=True, target_modules=["v_proj"])
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=LLAMA_TARGETS))
    randomize_adapters(model, seed=4)
    lorakit.prepare_swap(model, max_rank=4)
    for path in (small, subset):
        lorakit.swap_adapter(model, "default", path)
        assert max_abs_diff(logits(model), fresh_load(path)) <= 1e-5, path.name
    out = load_file(lorakit.save_adapter(model, tmp_path / "again") / "adapter_model.safetensors")
    original = load_file(subset / "adapter_model.safetensors")
    for key, tensor in original.items():
        torch.testing.assert_close(out[key], tensor, rtol=1e-6, atol=0.0)


def test_gpt2_conv1d_and_embedding(tmp_path: Path) -> None:
    targets = ["c_attn", "c_fc", "wte"]
    small = adapter_file(tmp_path, "small", seed=2, build=tiny_gpt2, r=2, alpha=4, target_modules=targets)
    model = tiny_gpt2()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=4, target_modules=targets))
    randomize_adapters(model, seed=6)
    lorakit.prepare_swap(model, max_rank=6)
    lorakit.swap_adapter(model, "default", small)
    assert max_abs_diff(logits(model), fresh_load(small, build=tiny_gpt2)) <= 1e-6
    out = lorakit.save_adapter(model, tmp_path / "again")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert max_abs_diff(fresh_load(out, build=tiny_gpt2), fresh_load(small, build=tiny_gpt2)) <= 1e-6


# -- torch.compile ------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Embedding + two Linear layers: small enough for dynamo to trace in well under a second."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids))))


def tinynet_file(tmp: Path, label: str, seed: int, **config) -> Path:
    model = TinyNet()
    lorakit.attach(model, lorakit.LoraConfig(target_modules=["embed", "up", "down"], **config))
    randomize_adapters(model, seed=seed)
    return lorakit.save_adapter(model, tmp / label)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_compiled_model_is_not_recompiled(tmp_path: Path, use_dora: bool, grad: bool) -> None:
    files = [
        tinynet_file(tmp_path, "same", seed=2, r=8, alpha=16, use_dora=use_dora),
        tinynet_file(tmp_path, "small", seed=3, r=2, alpha=3, use_dora=use_dora),  # another rank and scale
        tinynet_file(tmp_path, "rs", seed=4, r=5, alpha=4, use_rslora=True, use_dora=use_dora),
    ]
    model = TinyNet()
    lorakit.attach(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["embed", "up", "down"], use_dora=use_dora))
    randomize_adapters(model, seed=1)
    lorakit.prepare_swap(model, max_rank=8)
    model.eval()
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    ids = token_ids()
    with torch.set_grad_enabled(grad):
        compiled(ids)
        compiled_once = len(graphs)
        assert compiled_once > 0
        for path in files:
            lorakit.swap_adapter(compiled, "default", path)
            got = compiled(ids)
            reference = TinyNet()
            lorakit.load_adapter(reference, path)
            reference.eval()
            assert max_abs_diff(got, reference(ids)) <= 1e-6, path.name
    assert len(graphs) == compiled_once, "a swap made torch.compile recompile"
    torch._dynamo.reset()


# -- bad input leaves the adapter unchanged -----------------------------------------------------------------
@pytest.fixture
def loaded(tmp_path: Path) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor], set[int]]:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS))
    randomize_adapters(model, seed=8)
    lorakit.prepare_swap(model, max_rank=6)
    return model, logits(model), snapshot(model), {id(p) for p in model.parameters()}


def test_rank_above_declared_max_is_refused(tmp_path: Path, loaded) -> None:
    model, before, state, ids = loaded
    big = adapter_file(tmp_path, "big", seed=2, r=8, alpha=8, target_modules=LLAMA_TARGETS)
    with pytest.raises(lorakit.ShapeMismatchError, match=r"rank 8 .*above.* 6.*prepare_swap\(model, max_rank=8\)"):
        lorakit.swap_adapter(model, "default", big)
    assert_unchanged(model, state, ids)
    assert max_abs_diff(logits(model), before) == 0.0


def test_mismatched_shapes_are_refused(tmp_path: Path, loaded) -> None:
    model, before, state, ids = loaded
    other = adapter_file(tmp_path, "other", seed=2, build=lambda: tiny_llama(hidden=48), r=4, alpha=8,
                         target_modules=LLAMA_TARGETS)
    with pytest.raises(lorakit.ShapeMismatchError, match=r"module 'model\.layers\.0\..*has shape .*48.*expects"):
        lorakit.swap_adapter(model, "default", other)
    assert_unchanged(model, state, ids)


def test_unknown_adapter_name_is_refused(tmp_path: Path, loaded) -> None:
    model, _, state, ids = loaded
    path = adapter_file(tmp_path, "a", seed=2, r=4, alpha=8, target_modules=LLAMA_TARGETS)
    with pytest.raises(lorakit.AdapterNameError, match=r"no adapter named 'nope'.*default"):
        lorakit.swap_adapter(model, "nope", path)
    assert_unchanged(model, state, ids)


def test_module_outside_the_adapter_is_refused(tmp_path: Path, loaded) -> None:
    model, _, state, ids = loaded
    wider = adapter_file(tmp_path, "wider", seed=2, r=4, alpha=8, target_modules=LLAMA_TARGETS + ["k_proj"])
    with pytest.raises(lorakit.AdapterFileError, match=r"k_proj.*cannot adapt another module"):
        lorakit.swap_adapter(model, "default", wider)
    assert_unchanged(model, state, ids)


def test_broken_file_is_refused_before_anything_changes(tmp_path: Path, loaded) -> None:
    model, _, state, ids = loaded
    path = adapter_file(tmp_path, "a", seed=2, r=4, alpha=8, target_modules=LLAMA_TARGETS)
    tensors = load_file(path / "adapter_model.safetensors")
    last = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]  # the last module: the others pass first
    del tensors[last]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(lorakit.AdapterFileError, match=r"has \['lora_A.weight'\] but no 'lora_B.weight'"):
        lorakit.swap_adapter(model, "default", path)
    assert_unchanged(model, state, ids)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lorakit.AdapterFileError, match="not valid JSON"):
        lorakit.swap_adapter(model, "default", path)
    assert_unchanged(model, state, ids)


def test_other_variant_or_merged_adapter_is_refused(tmp_path: Path, loaded) -> None:
    model, _, state, ids = loaded
    dora = adapter_file(tmp_path, "dora", seed=2, r=4, alpha=8, use_dora=True, target_modules=LLAMA_TARGETS)
    with pytest.raises(lorakit.AdapterFileError, match=r"method 'dora' in the file \(use_dora=True\).*method 'lora' \(use_dora=False\)"):
        lorakit.swap_adapter(model, "default", dora)
    assert_unchanged(model, state, ids)
    plain = adapter_file(tmp_path, "plain", seed=2, r=4, alpha=8, target_modules=LLAMA_TARGETS)
    lorakit.merge(model)
    with pytest.raises(lorakit.MergeError, match="unmerge"):
        lorakit.swap_adapter(model, "default", plain)


def test_prepare_swap_refuses_a_max_rank_below_the_rank(loaded) -> None:
    model, _, state, ids = loaded
    with pytest.raises(lorakit.ConfigError, match=r"rank 4, above max_rank=3"):
        lorakit.prepare_swap(model, max_rank=3)
    with pytest.raises(lorakit.ConfigError, match="positive integer"):
        lorakit.prepare_swap(model, max_rank=0)
    assert_unchanged(model, state, ids)

