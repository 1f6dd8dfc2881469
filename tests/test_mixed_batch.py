"""Mixed-adapter batches: `model(ids, adapter_names=[...])` and `model.generate(..., adapter_names=[...])`.

Every row of a mixed batch must equal that row run alone with its adapter active (or inside `disabled()` for
"__base__"), for Llama (Linear, Embedding) and GPT-2 (Conv1D), for both batched strategies (BGMV: rows with
more tokens than the largest rank; SGMV: fewer), and greedy generation must give the same tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
import lorakit.ops.mixed
from conftest import max_abs_diff, randomize_adapters, tiny_gpt2, tiny_llama, token_ids
from lorakit.layers import LoraLayer
from lorakit.mixed import _STACK, BASE
from lorakit.ops.mixed import bgmv_add_, embedding_rows_add_, sgmv_add_, stack_factors

ATOL = 1e-5
NAMES = ["a", "b", BASE, "c", "a", "b"]


def _with_adapters(model: torch.nn.Module, targets: list[str], embed: str | None = None) -> torch.nn.Module:
    """Three adapters of different rank, alpha and scaling rule (c: rsLoRA, fewer modules); random values."""
    first = targets + ([embed] if embed else [])
    lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=first), name="a")
    lorakit.attach(model, lorakit.LoraConfig(r=8, alpha=8, target_modules=targets), name="b")
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=16, use_rslora=True, target_modules=targets[:1]), name="c")
    randomize_adapters(model)
    return model.eval()


def _llama() -> torch.nn.Module:
    return _with_adapters(tiny_llama(), ["q_proj", "v_proj", "down_proj"], embed="embed_tokens")


def _gpt2() -> torch.nn.Module:
    return _with_adapters(tiny_gpt2(), ["c_attn", "c_proj", "c_fc"])


def _row_alone(model: torch.nn.Module, ids: torch.Tensor, name: str) -> torch.Tensor:
    """Logits of one row (1, T) run with only `name` active, or the base model for "__base__"."""
    if name == BASE:
        with lorakit.disabled(model):
            return model(input_ids=ids).logits
    lorakit.set_active(model, name)
    return model(input_ids=ids).logits


def _assert_rows_match(model: torch.nn.Module, ids: torch.Tensor, names: list[str]) -> None:
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = _row_alone(model, ids[i : i + 1], name)
            assert max_abs_diff(mixed[i], alone[0]) <= ATOL, (i, name)


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("length", [3, 11], ids=["sgmv", "bgmv"])  # fewer / more tokens per row than r_max = 8
def test_mixed_batch_equals_each_row_alone(build, length: int, monkeypatch) -> None:
    monkeypatch.setattr(lorakit.ops.mixed, "GATHER_LIMIT", 0)  # tiny layers: let the token count decide
    model = build()
    ids = token_ids(batch=len(NAMES), length=length)
    _assert_rows_match(model, ids, NAMES)
    with torch.no_grad():  # the adapters really differ, so the check above is not vacuous
        logits = model(input_ids=ids[:1].repeat(3, 1), adapter_names=["a", "b", BASE]).logits
    assert max_abs_diff(logits[0], logits[1]) > 1e-3 and max_abs_diff(logits[0], logits[2]) > 1e-3


def test_all_rows_base_and_one_adapter_for_all() -> None:
    model = _llama()
    ids = token_ids(batch=3, length=5)
    with torch.no_grad():
        base_rows = model(input_ids=ids, adapter_names=[BASE] * 3).logits
        with lorakit.disabled(model):
            assert max_abs_diff(base_rows, model(input_ids=ids).logits) <= ATOL
        a_rows = model(input_ids=ids, adapter_names=("a", "a", "a")).logits
        lorakit.set_active(model, "a")  # scale 2, an embedding adapter too
        assert max_abs_diff(a_rows, model(input_ids=ids).logits) <= ATOL


def test_routing_lasts_one_forward_and_leaves_the_active_set() -> None:
    model = _llama()
    lorakit.set_active(model, "c")
    ids = token_ids(batch=2, length=5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model(input_ids=ids, adapter_names=["a", "b"])
        after = model(input_ids=ids).logits
    assert lorakit.active_adapters(model) == ["c"]
    assert all(layer.routing is None for layer in model.modules() if isinstance(layer, LoraLayer))
    assert max_abs_diff(before, after) == 0.0


def test_stacks_are_cached_and_rebuilt_when_an_adapter_changes() -> None:
    model = _llama()
    ids = token_ids(batch=len(NAMES), length=4)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        model(input_ids=ids, adapter_names=NAMES)
        first = layer.__dict__[_STACK]
        model(input_ids=ids, adapter_names=NAMES)
        assert layer.__dict__[_STACK] is first  # nothing changed: no restacking
        layer.adapters["a"].lora_B.mul_(3.0)  # an in-place update (as an optimizer step makes)
        model.model.layers[1].mlp.down_proj.adapters["b"].lora_A.add_(0.5)
    _assert_rows_match(model, ids, NAMES)
    assert layer.__dict__[_STACK] is not first
    lorakit.delete_adapter(model, "c")  # a deleted adapter is refused, the others still route
    _assert_rows_match(model, ids[:2], ["a", "b"])


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("limit", [0, 1 << 40], ids=["sgmv", "bgmv"])  # how the 1-token decoding steps run
def test_greedy_generate_equals_each_row_alone(build, limit: int, monkeypatch) -> None:
    monkeypatch.setattr(lorakit.ops.mixed, "GATHER_LIMIT", limit)
    model = build()
    prompts = token_ids(batch=4, length=5, seed=7)
    names = ["b", BASE, "a", "c"]
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    mixed = model.generate(prompts, attention_mask=torch.ones_like(prompts), adapter_names=names, **settings)
    assert mixed.shape == (4, 13)
    for i, name in enumerate(names):
        row = prompts[i : i + 1]
        if name == BASE:
            with lorakit.disabled(model):
                alone = model.generate(row, attention_mask=torch.ones_like(row), **settings)
        else:
            lorakit.set_active(model, name)
            alone = model.generate(row, attention_mask=torch.ones_like(row), **settings)
        assert torch.equal(mixed[i], alone[0]), (i, name)
    distinct = {tuple(r.tolist()) for r in mixed[:, 5:]}
    assert len(distinct) > 1  # the adapters change what is generated


def test_generate_with_beams_repeats_each_rows_adapter() -> None:
    model = _llama()
    prompts = token_ids(batch=2, length=4, seed=3)
    settings = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    mixed = model.generate(prompts, adapter_names=["a", "b"], **settings)
    for i, name in enumerate(["a", "b"]):
        lorakit.set_active(model, name)
        assert torch.equal(mixed[i], model.generate(prompts[i : i + 1], **settings)[0])


def test_quantized_base_routes_per_row() -> None:
    model = tiny_llama(hidden=64)
    lorakit.quantize(model, "nf4", compute_dtype=torch.float32, skip=("lm_head",))
    _with_adapters(model, ["q_proj", "v_proj"])
    _assert_rows_match(model, token_ids(batch=4, length=5), ["c", BASE, "b", "a"])


def test_peft_adapter_names_gives_the_same_logits(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = _with_adapters(tiny_llama(), ["q_proj", "v_proj", "down_proj"])
    for name in ("a", "b", "c"):
        lorakit.save_adapter(model, tmp_path, name=name)
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        reference.load_adapter(tmp_path / name, adapter_name=name)
    reference.eval()
    ids = token_ids(batch=len(NAMES), length=6)
    with torch.no_grad():
        ours = model(input_ids=ids, adapter_names=NAMES).logits
        theirs = reference(input_ids=ids, adapter_names=NAMES).logits
    assert max_abs_diff(ours, theirs) <= ATOL


def test_deepcopy_routes_the_copy() -> None:
    model = _gpt2()
    twin = copy.deepcopy(model)
    assert twin.generate.model is twin
    ids = token_ids(batch=2, length=4)
    with torch.no_grad():
        ours = model(input_ids=ids, adapter_names=["c", "a"]).logits
        theirs = twin(input_ids=ids, adapter_names=["c", "a"]).logits
    assert max_abs_diff(ours, theirs) == 0.0


def test_deleting_every_adapter_removes_the_hooks() -> None:
    model = tiny_llama()
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="a")
    assert "generate" in model.__dict__
    lorakit.delete_adapter(model, "a")
    assert "generate" not in model.__dict__
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks


# -- errors --------------------------------------------------------------------------------------------------
def test_unknown_name_is_refused_with_its_position() -> None:
    model = _llama()
    ids = token_ids(batch=3, length=4)
    with pytest.raises(lorakit.AdapterNameError, match=r"adapter_names\[1\] = 'nope'.*attached: a, b, c"):
        model(input_ids=ids, adapter_names=["a", "nope", BASE])
    with pytest.raises(lorakit.AdapterNameError, match="'nope'"):
        model.generate(ids, adapter_names=["a", "nope", BASE], max_new_tokens=2)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "b"], "adapter_names has 2 entries but the batch has 3 rows"),
        (["a", "b", "c", "a"], "adapter_names has 4 entries but the batch has 3 rows"),
        ("a", "must be a list of adapter names"),
        (["a", 3, "b"], r"adapter_names\[1\] must be a string"),
    ],
)
def test_malformed_adapter_names_are_refused(names, message: str) -> None:
    model = _llama()
    ids = token_ids(batch=3, length=4)
    with pytest.raises(lorakit.ConfigError, match=message):
        model(input_ids=ids, adapter_names=names)
    with pytest.raises(lorakit.ConfigError, match=message):
        model.generate(ids, adapter_names=names, max_new_tokens=2)


def test_training_mode_merged_and_dora_are_refused() -> None:
    model = _llama()
    ids = token_ids(batch=2, length=4)
    model.train()
    with pytest.raises(lorakit.ConfigError, match="training mode"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.eval()
    lorakit.merge(model, ["a"])
    with pytest.raises(lorakit.MergeError, match="merged adapters"):
        model(input_ids=ids, adapter_names=["a", "b"])
    lorakit.unmerge(model)
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True), name="d")
    model.eval()
    with torch.no_grad():
        with pytest.raises(lorakit.ConfigError, match="DoraAdapter"):
            model(input_ids=ids, adapter_names=["d", "a"])
        _assert_rows_match(model, ids, ["a", BASE])  # the failed call left no routing behind


# -- the batched ops against a per-row loop ------------------------------------------------------------------
def _random_factors(k: int, d: int, ranks: list[int | None], seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [None if r is None else (torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen), 0.5 + j)
            for j, r in enumerate(ranks)]


@pytest.mark.parametrize("add", [bgmv_add_, sgmv_add_], ids=["bgmv", "sgmv"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_batched_ops_equal_a_loop_over_rows(add, tokens: int) -> None:
    k, d = 12, 10
    factors = _random_factors(k, d, [3, None, 6, 1], seed=1)
    a_stack, bt_stack = stack_factors(factors, torch.float64)
    gen = torch.Generator().manual_seed(2)
    slots = torch.tensor([2, 0, 3, 1, 3, 3, 2, 4])
    x = torch.randn(len(slots), tokens, k, generator=gen, dtype=torch.float64)
    base = torch.randn(len(slots), tokens, d, generator=gen, dtype=torch.float64)
    out = add(base.clone(), x, a_stack, bt_stack, slots)
    for b, j in enumerate(slots.tolist()):
        expected = base[b].clone()
        if j and factors[j - 1] is not None:
            a, bm, s = factors[j - 1]
            expected += s * x[b] @ a.double().t() @ bm.double().t()
        assert torch.allclose(out[b], expected, atol=1e-10), (b, j)


def test_embedding_rows_equal_a_loop_over_rows() -> None:
    vocab, d = 9, 6
    factors = _random_factors(vocab, d, [2, 4], seed=3)
    at_stack, bt_stack = stack_factors(factors, torch.float64, transpose_a=True)
    ids = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(4))
    slots = torch.tensor([1, 0, 2])
    out = embedding_rows_add_(torch.zeros(3, 5, d, dtype=torch.float64), ids, at_stack, bt_stack, slots)
    for b, j in enumerate(slots.tolist()):
        expected = torch.zeros(5, d, dtype=torch.float64)
        if j:
            a, bm, s = factors[j - 1]
            expected = s * a.double().t()[ids[b]] @ bm.double().t()
        assert torch.allclose(out[b], expected, atol=1e-10)
