"""Combining adapters (lorakit.combine, merge_combination, `lorakit combine`) and the math in ops.combine.

Every method is checked against a reference computed here from its definition (TIES: Yadav et al. 2023; DARE:
Yu et al. 2023); `linear` against the explicit weighted sum of the deltas, and against PEFT's own `linear`
(which has cross terms between adapters) and `cat` (which has none).
"""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from conftest import max_abs_diff, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from lorakit import hf
from lorakit.cli.combine import parse_adapter_spec
from lorakit.cli.main import main
from lorakit.model import lora_layers
from lorakit.ops import combine as C

REL = 1e-5


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).norm() / max(float(expected.norm()), 1e-12))


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- ops: linear_factors, svd_truncate --------------------------------------------------------------------
def test_linear_factors_give_the_weighted_sum_and_naive_factor_sums_have_cross_terms():
    rs, scales, weights = (4, 4, 4), (2.0, 3.0 / math.sqrt(4), 0.5), (0.7, -0.3, 1.5)
    terms = [(rand(r, 10, seed=i), rand(12, r, seed=10 + i), s, w)
             for i, (r, s, w) in enumerate(zip(rs, scales, weights))]
    expected = sum(w * s * (b @ a) for a, b, s, w in terms)
    lora_a, lora_b = C.linear_factors(terms)
    assert lora_a.shape == (12, 10) and lora_b.shape == (12, 12)
    assert rel_err(lora_b @ lora_a, expected) <= REL
    # PEFT's `linear`: A = Σ sgn_i c_i A_i, B = Σ c_j B_j; the product adds Σ_{i≠j} sgn_i c_i c_j B_j A_i
    c = [math.sqrt(abs(w * s)) for _, _, s, w in terms]
    sgn = [math.copysign(1.0, w * s) for _, _, s, w in terms]
    naive = sum(c[j] * terms[j][1] for j in range(3)) @ sum(sgn[i] * c[i] * terms[i][0] for i in range(3))
    cross = sum(sgn[i] * c[i] * c[j] * terms[j][1] @ terms[i][0] for i in range(3) for j in range(3) if i != j)
    assert rel_err(naive - expected, cross) <= 1e-4
    assert rel_err(naive, expected) > 0.1


def test_linear_factors_take_different_ranks_and_refuse_other_base_shapes():
    terms = [(rand(3, 6, seed=1), rand(5, 3, seed=2), 1.0, 1.0), (rand(1, 6, seed=3), rand(5, 1, seed=4), 2.0, -2.0)]
    lora_a, lora_b = C.linear_factors(terms)
    assert lora_a.shape == (4, 6)
    assert rel_err(lora_b @ lora_a, terms[0][1] @ terms[0][0] - 4.0 * terms[1][1] @ terms[1][0]) <= REL
    with pytest.raises(lorakit.ShapeMismatchError, match="term 1"):
        C.linear_factors([terms[0], (rand(1, 7, seed=3), rand(5, 1, seed=4), 1.0, 1.0)])


def test_svd_truncate_is_the_best_rank_r_approximation_and_reports_the_energy():
    delta = rand(12, 9, seed=5)
    u, s, vh = torch.linalg.svd(delta.double())
    lora_a, lora_b, energy = C.svd_truncate(delta, 3)
    assert lora_a.shape == (3, 9) and lora_b.shape == (12, 3)
    assert rel_err(lora_b @ lora_a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3]) <= 1e-5
    assert energy == pytest.approx(float(s[:3].square().sum() / s.square().sum()), rel=1e-6)
    assert float((delta - lora_b @ lora_a).norm() ** 2) == pytest.approx(float(s[3:].square().sum()), rel=1e-4)
    lora_a, lora_b, energy = C.svd_truncate(delta, 50)  # capped at min(d, k): exact
    assert lora_a.shape == (9, 9) and energy == pytest.approx(1.0) and rel_err(lora_b @ lora_a, delta) <= REL
    fa, fb = rand(5, 9, seed=6), rand(12, 5, seed=7)  # from the factors, without the d x k matrix
    lora_a, lora_b, kept, total = C.truncate_factors(fa, fb, 2)
    ref_a, ref_b, ref_energy = C.svd_truncate(fb @ fa, 2)
    assert rel_err(lora_b @ lora_a, ref_b @ ref_a) <= 1e-5 and kept / total == pytest.approx(ref_energy, rel=1e-5)
    with pytest.raises(lorakit.ConfigError, match="rank"):
        C.svd_truncate(delta, 0)


# -- ops: trim / elect / drop, against element-wise references --------------------------------------------
def ref_trim(delta: torch.Tensor, density: float) -> list[float]:
    flat = delta.flatten().tolist()
    top = set(sorted(range(len(flat)), key=lambda j: -abs(flat[j]))[: int(density * len(flat))])
    return [v if j in top else 0.0 for j, v in enumerate(flat)]


def ref_elect_mean(vectors: list[list[float]], weights: list[float]) -> list[float]:
    out = []
    for j in range(len(vectors[0])):
        vals = [w * v[j] for v, w in zip(vectors, weights)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [v for v in vals if v != 0 and math.copysign(1.0, v) == sign]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return out


def ref_masks(deltas: list[torch.Tensor], density: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)  # the documented draw: rand < density, one delta after another
    return [(torch.rand(d.shape, generator=gen) < density).float() for d in deltas]


DELTAS = [rand(4, 5, seed=20 + i) for i in range(3)]
WEIGHTS = [0.7, -0.4, 1.2]


def test_ties_and_magnitude_prune_follow_their_definitions():
    trimmed = [ref_trim(d, 0.4) for d in DELTAS]
    assert sum(v != 0 for v in trimmed[0]) == 8
    ties = torch.tensor(ref_elect_mean(trimmed, WEIGHTS)).view(4, 5)
    assert max_abs_diff(C.ties(DELTAS, WEIGHTS, 0.4), ties) <= 1e-6
    pruned = sum(w * torch.tensor(t) for t, w in zip(trimmed, WEIGHTS)).view(4, 5)
    assert max_abs_diff(C.magnitude_prune(DELTAS, WEIGHTS, 0.4), pruned) <= 1e-6
    untrimmed = torch.tensor(ref_elect_mean([d.flatten().tolist() for d in DELTAS], WEIGHTS)).view(4, 5)
    assert max_abs_diff(C.ties(DELTAS, WEIGHTS, 1.0), untrimmed) <= 1e-6
    assert max_abs_diff(C.magnitude_prune(DELTAS, WEIGHTS, 1.0), C.task_arithmetic(DELTAS, WEIGHTS)) <= 1e-6


def test_dare_follows_its_definition_and_is_unbiased():
    masks = ref_masks(DELTAS, 0.3, seed=7)
    dropped = [d * m / 0.3 for d, m in zip(DELTAS, masks)]
    linear = sum(w * d for d, w in zip(dropped, WEIGHTS))
    got = C.dare_linear(DELTAS, WEIGHTS, 0.3, torch.Generator().manual_seed(7))
    assert max_abs_diff(got, linear) <= 1e-5
    ties = torch.tensor(ref_elect_mean([d.flatten().tolist() for d in dropped], WEIGHTS)).view(4, 5)
    assert max_abs_diff(C.dare_ties(DELTAS, WEIGHTS, 0.3, torch.Generator().manual_seed(7)), ties) <= 1e-5
    ones = torch.ones(400, 400)
    out = C.dare_drop(ones, 0.25, torch.Generator().manual_seed(0))
    assert abs(float((out != 0).float().mean()) - 0.25) < 0.01 and abs(float(out.mean()) - 1.0) < 0.03
    assert set(out.unique().tolist()) == {0.0, 4.0}


def test_ops_errors_name_the_problem():
    with pytest.raises(lorakit.ConfigError, match="3 value"):
        C.task_arithmetic(DELTAS[:2], WEIGHTS)
    with pytest.raises(lorakit.ShapeMismatchError, match="different base shapes"):
        C.ties([DELTAS[0], rand(5, 4, seed=1)], [1.0, 1.0], 0.5)
    for density in (None, 0.0, 1.5):
        with pytest.raises(lorakit.ConfigError, match="density"):
            C.dare_linear(DELTAS, WEIGHTS, density)
    with pytest.raises(lorakit.ConfigError, match="unknown combination method"):
        C.combine_deltas("average", DELTAS, WEIGHTS)


# -- model level ------------------------------------------------------------------------------------------
def llama_ab(dora: bool = False):
    """Adapters with different ranks, alphas, rsLoRA, patterns and target sets (b alone adapts the embedding)."""
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             alpha_pattern={"down_proj": 2.0}), name="a")
    lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=3, use_rslora=True, rank_pattern={"k_proj": 3},
                                             target_modules=["q_proj", "k_proj", "embed_tokens"], use_dora=dora),
                   name="b")
    randomize_adapters(model, std=0.3)
    return model


@torch.no_grad()
def expected_deltas(model, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i ΔW_i per module, the explicit weighted sum (a module an adapter lacks counts as zero)."""
    out = {}
    for layer in lora_layers(model):
        present = [(layer.adapters[n], w) for n, w in weights.items() if n in layer.adapters]
        if present:
            out[layer.path] = sum(w * a.delta_weight(layer.base_layer) for a, w in present)
    return out


@torch.no_grad()
def combined_deltas(model, name: str) -> dict[str, torch.Tensor]:
    return {layer.path: layer.adapters[name].delta_weight(layer.base_layer)
            for layer in lora_layers(model) if name in layer.adapters}


@pytest.mark.parametrize("wa, wb", [(0.7, 0.3), (1.0, -1.0), (0.25, 0.75), (1.0, 0.0)])
def test_linear_combination_equals_the_weighted_sum_of_deltas(wa, wb):
    model = llama_ab()
    expected = expected_deltas(model, {"a": wa, "b": wb})
    report = lorakit.combine(model, {"a": wa, "b": wb}, name="ab")
    got = combined_deltas(model, "ab")
    assert set(got) == set(expected)  # the union of the targets
    for path, delta in expected.items():
        assert rel_err(got[path], delta) <= REL or delta.norm() == 0 and got[path].norm() <= 1e-7, path
    ranks = report["rank"]
    assert ranks["model.layers.0.self_attn.q_proj"] == 6 and ranks["model.layers.0.self_attn.k_proj"] == 3
    assert ranks["model.layers.1.mlp.down_proj"] == 4 and ranks["model.embed_tokens"] == 2
    assert report["energy_kept_total"] == 1.0 and lorakit.active_adapters(model) == ["ab"]


def test_linear_combination_on_gpt2_conv1d():
    model = tiny_gpt2()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=4, target_modules=["c_attn"]), name="a")
    lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=8, target_modules=["c_attn", "c_proj"]), name="b")
    randomize_adapters(model, std=0.3)
    expected = expected_deltas(model, {"a": -0.5, "b": 1.0})
    lorakit.combine(model, [-0.5, 1.0], name="ab", adapters=["a", "b"])
    got = combined_deltas(model, "ab")
    assert set(got) == set(expected) and all(rel_err(got[p], d) <= REL for p, d in expected.items())


def test_svd_combination_truncates_each_module_and_reports_energy():
    model = llama_ab()
    expected = expected_deltas(model, {"a": 0.6, "b": -0.4})
    report = lorakit.combine(model, {"a": 0.6, "b": -0.4}, name="s", method="svd", rank=3)
    got = combined_deltas(model, "s")
    kept_all = total_all = 0.0
    for layer in lora_layers(model):
        delta = layer.kind.to_weight_layout(expected[layer.path]).double()  # (d, k)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        ref = layer.kind.to_weight_layout(u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
        assert rel_err(got[layer.path], ref) <= 1e-4, layer.path
        energy = float(s[:3].square().sum() / s.square().sum())
        assert report["energy_kept"][layer.path] == pytest.approx(energy, rel=1e-4)
        kept_all, total_all = kept_all + float(s[:3].square().sum()), total_all + float(s.square().sum())
    assert report["energy_kept"]["model.embed_tokens"] == pytest.approx(1.0)  # rank 2 <= 3: nothing lost
    assert report["energy_kept"]["model.layers.0.self_attn.q_proj"] < 0.999  # rank 6 > 3
    assert report["energy_kept_total"] == pytest.approx(kept_all / total_all, rel=1e-4)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_sparsifying_methods_merge_the_deltas_of_each_module(method):
    model = llama_ab()
    weights = {"a": 0.6, "b": -0.4}
    gen = torch.Generator().manual_seed(3)  # the same draws, module after module, adapter after adapter
    expected = {}
    for layer in lora_layers(model):
        present = [(layer.adapters[n], w) for n, w in weights.items() if n in layer.adapters]
        deltas = [layer.kind.to_weight_layout(a.delta_weight(layer.base_layer)) for a, _ in present]
        merged = C.combine_deltas(method, deltas, [w for _, w in present], 0.5, gen)
        expected[layer.path] = layer.kind.to_weight_layout(merged)
    report = lorakit.combine(model, weights, name="m", method=method, density=0.5, rank=64, seed=3)
    got = combined_deltas(model, "m")
    assert all(rel_err(got[p], d) <= 1e-4 for p, d in expected.items())  # full rank: the SVD loses nothing
    assert report["energy_kept_total"] == pytest.approx(1.0)
    again = llama_ab()
    lorakit.combine(again, weights, name="m", method=method, density=0.5, rank=64, seed=3)
    assert all(max_abs_diff(combined_deltas(again, "m")[p], d) == 0 for p, d in got.items())  # seeded


def test_dora_inputs_need_an_svd_method_and_merge_on_the_fly_works():
    model = llama_ab(dora=True)
    with pytest.raises(lorakit.ConfigError, match="DoraAdapter.*svd"):
        lorakit.combine(model, {"a": 0.5, "b": 0.5}, name="ab")
    expected = expected_deltas(model, {"a": 0.5, "b": 0.5})
    lorakit.combine(model, {"a": 0.5, "b": 0.5}, name="ab", method="svd", rank=64)
    assert all(rel_err(combined_deltas(model, "ab")[p], d) <= 1e-4 for p, d in expected.items())
    other = llama_ab(dora=True)
    before = {layer.path: layer.base_layer.weight.detach().clone() for layer in lora_layers(other)}
    lorakit.merge_combination(other, {"a": 0.5, "b": 0.5})
    for layer in lora_layers(other):
        assert rel_err(layer.base_layer.weight - before[layer.path], expected[layer.path]) <= REL


@pytest.mark.parametrize("method, kwargs", [("linear", {}), ("svd", {"rank": 3}),
                                            ("dare_ties", {"rank": 3, "density": 0.5, "seed": 5})])
def test_merge_on_the_fly_equals_merging_the_combined_adapter(method, kwargs):
    adapter_model, merged_model = llama_ab(), llama_ab()
    lorakit.combine(adapter_model, {"a": 0.7, "b": -0.3}, name="ab", method=method, **kwargs)
    ids = token_ids()
    with torch.no_grad():
        logits = adapter_model(ids).logits
    lorakit.merge(adapter_model, ["ab"])
    report = lorakit.merge_combination(merged_model, {"a": 0.7, "b": -0.3}, method=method, **kwargs)
    assert report["name"] is None and lorakit.adapter_names(merged_model) == ["a", "b"]
    for one, two in zip(lora_layers(adapter_model), lora_layers(merged_model)):
        assert max_abs_diff(one.base_layer.weight, two.base_layer.weight) <= 1e-5, one.path
    with torch.no_grad(), lorakit.disabled(merged_model):
        assert max_abs_diff(merged_model(ids).logits, logits) <= 1e-4


def test_modules_to_save_copies_are_combined_as_full_tensors():
    model = tiny_bert()
    for name in ("a", "b"):
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]),
                       name=name)
        with torch.no_grad():
            model.classifier.copies[name].weight.add_(rand(3, 32, seed=len(name) + ord(name)))
    original = model.classifier.original_module.weight.detach().clone()
    ca, cb = (model.classifier.copies[n].weight.detach().clone() for n in ("a", "b"))
    report = lorakit.combine(model, {"a": 0.5, "b": -0.25}, name="ab")
    expected = original + 0.5 * (ca - original) - 0.25 * (cb - original)
    assert report["modules_to_save"] == ["classifier"]
    assert max_abs_diff(model.classifier.copies["ab"].weight, expected) <= 1e-6


def test_peft_reads_the_combined_adapter_and_its_linear_has_cross_terms(tmp_path):
    peft = pytest.importorskip("peft")
    model = llama_ab()
    lorakit.combine(model, {"a": 0.7, "b": -0.3}, name="ab")
    lorakit.combine(model, {"a": 0.7, "b": -0.3}, name="s", method="svd", rank=3)
    ids = token_ids()
    for name in ("ab", "s"):
        lorakit.set_active(model, [name])
        with torch.no_grad():
            ours = model(ids).logits
        lorakit.save_adapter(model, tmp_path, name=name)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / name)).eval()
        with torch.no_grad():
            assert max_abs_diff(theirs(ids).logits, ours) <= 1e-5, name
    # PEFT's own `linear` (same ranks needed) sums A's and B's separately; its `cat` and lorakit's linear are exact
    same = tiny_llama()
    for name, alpha in (("a", 8), ("b", 2)):
        lorakit.attach(same, lorakit.LoraConfig(r=4, alpha=alpha, target_modules=["q_proj", "v_proj"]), name=name)
    randomize_adapters(same, std=0.3)
    for name in ("a", "b"):
        lorakit.save_adapter(same, tmp_path / "same", name=name)
    expected = expected_deltas(same, {"a": 0.7, "b": 0.3})
    lorakit.combine(same, {"a": 0.7, "b": 0.3}, name="ab")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "same" / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "same" / "b"), adapter_name="b")
    for kind in ("linear", "cat"):
        pm.add_weighted_adapter(["a", "b"], [0.7, 0.3], kind, combination_type=kind)
    q = "model.layers.0.self_attn.q_proj"
    peft_q = pm.base_model.model.get_submodule(q)
    assert rel_err(peft_q.get_delta_weight("cat"), expected[q]) <= REL
    assert rel_err(combined_deltas(same, "ab")[q], expected[q]) <= REL
    assert rel_err(peft_q.get_delta_weight("linear"), expected[q]) > 0.05  # cross terms (PEFT issue 3004)


def test_bad_input_gives_clear_errors():
    model = llama_ab()
    with pytest.raises(lorakit.AdapterNameError, match="'c'.*attached: a, b"):
        lorakit.combine(model, {"a": 1.0, "c": 1.0}, name="x")
    with pytest.raises(lorakit.ConfigError, match="3 value.*2 adapter"):
        lorakit.combine(model, [0.5, 0.5, 0.1], name="x", adapters=["a", "b"])
    with pytest.raises(lorakit.ConfigError, match="adapters="):
        lorakit.combine(model, [0.5, 0.5], name="x")
    with pytest.raises(lorakit.ConfigError, match="finite"):
        lorakit.combine(model, {"a": float("nan")}, name="x")
    with pytest.raises(lorakit.AdapterNameError, match="already attached"):
        lorakit.combine(model, {"a": 1.0}, name="b")
    with pytest.raises(lorakit.ConfigError, match="needs a density"):
        lorakit.combine(model, {"a": 1.0, "b": 1.0}, name="x", method="ties")
    with pytest.raises(lorakit.ConfigError, match="'linear' is exact"):
        lorakit.combine(model, {"a": 1.0}, name="x", rank=2)
    with pytest.raises(lorakit.ConfigError, match="unknown combination method"):
        lorakit.combine(model, {"a": 1.0}, name="x", method="mean")
    lorakit.merge(model, ["a"])
    with pytest.raises(lorakit.MergeError, match="unmerge"):
        lorakit.combine(model, {"a": 1.0, "b": 1.0}, name="x")
    assert lorakit.adapter_names(model) == ["a", "b"]  # nothing was attached by the failed calls


# -- command line -----------------------------------------------------------------------------------------
def saved_adapter(model_dir, out, config: lorakit.LoraConfig, seed: int):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.attach(model, config)
    randomize_adapters(model, std=0.3, seed=seed)
    lorakit.save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def cli_inputs(causal_lm_dir, tmp_path_factory):
    from model_dirs import make_causal_lm_dir

    root = tmp_path_factory.mktemp("combine")
    a = saved_adapter(causal_lm_dir, root / "a", lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), 1)
    b = saved_adapter(causal_lm_dir, root / "b", lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), 2)
    wide = make_causal_lm_dir(root / "wide_model", hidden=48)
    other = saved_adapter(wide, root / "other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]), 3)
    dora = saved_adapter(causal_lm_dir, root / "dora", lorakit.LoraConfig(r=2, target_modules=["v_proj"],
                                                                          use_dora=True), 4)
    return a, b, other, dora


def test_cli_combine_writes_an_adapter_equal_to_the_merged_combination(causal_lm_dir, cli_inputs, tmp_path, capsys):
    a, b, _, _ = cli_inputs
    out = tmp_path / "ab"
    assert main(["combine", "--model", str(causal_lm_dir), "--adapter", f"a={a}:0.7", "--adapter", f"b={b}:-0.3",
                 "--out", str(out)]) == 0
    assert "adapter written to" in capsys.readouterr().out
    ids = token_ids(length=5)
    combined, _ = hf.load_model_dir(causal_lm_dir, with_tokenizer=False)
    lorakit.load_adapter(combined, out)
    reference, _ = hf.load_model_dir(causal_lm_dir, with_tokenizer=False)
    hf.load_adapters(reference, [a, b])
    lorakit.merge_combination(reference, {"a0": 0.7, "a1": -0.3})
    with torch.no_grad(), lorakit.disabled(reference):
        assert max_abs_diff(combined(ids).logits, reference(ids).logits) <= 1e-5
    assert main(["combine", "--model", str(causal_lm_dir), "--adapter", str(a), "--adapter", str(b),
                 "--weights", "0.5,0.5", "--method", "ties", "--density", "0.5", "--rank", "2",
                 "--out", str(tmp_path / "ties")]) == 0
    assert "energy kept" in capsys.readouterr().out


def test_cli_combine_errors(causal_lm_dir, cli_inputs, tmp_path, capsys):
    a, b, other, dora = cli_inputs
    base = ["combine", "--model", str(causal_lm_dir), "--out", str(tmp_path / "x")]
    assert main([*base, "--adapter", str(a), "--adapter", str(b), "--weights", "0.5"]) == 2
    assert "1 value(s) for 2 --adapter" in capsys.readouterr().err
    assert main([*base, "--adapter", f"{a}:1", "--adapter", str(b)]) == 2
    assert "has no weight" in capsys.readouterr().err
    assert main([*base, "--adapter", f"{a}:1", "--adapter", f"{other}:1"]) == 2
    assert "has shape" in capsys.readouterr().err  # an adapter of a wider model: mismatched base shapes
    assert main([*base, "--adapter", f"{a}:1", "--method", "ties"]) == 2
    assert "needs a density" in capsys.readouterr().err
    assert main([*base, "--adapter", f"dora={dora}:1", "--adapter", f"{a}:1"]) == 2
    assert "adapter 'dora' on module" in capsys.readouterr().err  # named as on the command line
    assert parse_adapter_spec("math=runs/a:b/adapter:-0.5") == ("math", "runs/a:b/adapter", -0.5)
    assert parse_adapter_spec("runs/x") == (None, "runs/x", None)
