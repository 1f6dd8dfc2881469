"""The vLLM readiness check (lorakit.io.vllm), save_adapter's VllmWarning, and PiSSA / OLoRA saved converted by default.

The rule tests feed configs and tensor shapes to the pure checks; the file tests save real adapters with lorakit and
with the real `peft`, and check them; the PiSSA tests load the default file onto the ORIGINAL base in lorakit and PEFT.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import max_abs_diff, randomize_adapters, tiny_bert, tiny_llama, token_ids
from lorakit.io import vllm
from lorakit.io.residual import RESIDUAL_KEY

P = "base_model.model.model.layers.0."
GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True}


def _pair(module: str, rank: int = 8, d: int = 32, k: int = 32) -> dict[str, tuple[int, ...]]:
    return {f"{P}{module}.lora_A.weight": (rank, k), f"{P}{module}.lora_B.weight": (d, rank)}


SHAPES = {**_pair("self_attn.q_proj"), **_pair("self_attn.v_proj")}


def _codes(findings: list[vllm.Finding]) -> list[tuple[str, str, str]]:
    return [(f.severity, f.code, f.where) for f in findings]


# -- rules on the config -------------------------------------------------------------------------------------
def test_a_plain_adapter_has_no_findings() -> None:
    assert vllm.check_config(GOOD) == [] and vllm.check_tensors(GOOD, SHAPES) == []


CONFIG_CASES = [
    ({"use_dora": True}, (vllm.REFUSED, "dora", "use_dora"), "does not support DoRA"),
    ({"use_dora": "false"}, (vllm.REFUSED, "dora", "use_dora"), "'false', which vLLM reads as true"),
    ({"modules_to_save": ["classifier"]}, (vllm.REFUSED, "modules_to_save", "modules_to_save"), "classifier"),
    ({"bias": "all"}, (vllm.REFUSED, "bias", "bias"), "'all'"),
    ({"bias": "lora_only"}, (vllm.REFUSED, "bias", "bias"), "'lora_only'"),
    ({"lora_bias": True}, (vllm.REFUSED, "bias", "lora_bias"), "lora_B biases"),
    ({"r": 32}, (vllm.REFUSED, "rank", "r"), "r=32 is above max_lora_rank=16.*--max-lora-rank 32"),
    ({"r": 0}, (vllm.REFUSED, "rank", "r"), "positive integer, found 0"),
    ({"peft_type": "IA3"}, (vllm.REFUSED, "peft_type", "peft_type"), "'IA3'"),
    ({"use_rslora": "false"}, (vllm.WRONG, "string_bool", "use_rslora"), r"alpha / sqrt\(r\)"),
    ({"init_lora_weights": "pissa"}, (vllm.WRONG, "residual_init", "init_lora_weights"), "residual base"),
    ({"init_lora_weights": "pissa_niter_4"}, (vllm.WRONG, "residual_init", "init_lora_weights"), "convert_to_lora"),
    ({"init_lora_weights": "olora"}, (vllm.WRONG, "residual_init", "init_lora_weights"), "olora"),
    ({"layer_replication": [[0, 1], [0, 1]]}, (vllm.WRONG, "ignored_field", "layer_replication"), "ignores"),
]


@pytest.mark.parametrize("change, expected, match", CONFIG_CASES, ids=[json.dumps(c[0]) for c in CONFIG_CASES])
def test_config_rule(change: dict, expected: tuple[str, str, str], match: str) -> None:
    findings = vllm.check_config({**GOOD, **change})
    assert _codes(findings) == [expected]
    assert re.search(match, findings[0].message), findings[0].message


def test_missing_required_fields_are_each_named() -> None:
    config = {k: v for k, v in GOOD.items() if k not in ("lora_alpha", "target_modules")}
    assert _codes(vllm.check_config(config)) == [
        (vllm.REFUSED, "missing_field", "lora_alpha"), (vllm.REFUSED, "missing_field", "target_modules"),
    ]


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva"])
def test_inits_that_leave_the_base_alone_pass(init) -> None:
    assert vllm.check_config({**GOOD, "init_lora_weights": init}) == []


def test_rank_limit_follows_max_lora_rank() -> None:
    config = {**GOOD, "r": 32}
    assert vllm.check_config(config, max_lora_rank=32) == []
    assert vllm.check_config(config, max_lora_rank=None) == []
    assert _codes(vllm.check_config(config, max_lora_rank=16)) == [(vllm.REFUSED, "rank", "r")]


# -- rules on the tensors --------------------------------------------------------------------------------------
def test_keys_vllm_cannot_parse_are_grouped_by_kind() -> None:
    shapes = {**SHAPES, f"{P}self_attn.q_proj.lora_magnitude_vector": (32,),
              f"{P}self_attn.v_proj.lora_magnitude_vector": (32,), "base_model.model.score.weight": (2, 32)}
    findings = vllm.check_tensors(GOOD, shapes)
    assert [(f.code, f.message.split(" tensor")[0]) for f in findings] == [("unparseable_key", "2"),
                                                                           ("unparseable_key", "1")]
    assert "lora_magnitude_vector" in findings[0].message and "score.weight" in findings[1].where


def test_base_embedding_weights_are_skipped_as_vllm_does() -> None:
    shapes = {**SHAPES, "base_model.model.model.embed_tokens.base_layer.weight": (64, 32),
              "base_model.model.model.embed_tokens.lora_embedding_A": (8, 64),
              "base_model.model.model.embed_tokens.lora_embedding_B": (32, 8)}
    assert vllm.check_tensors(GOOD, shapes) == []


def test_shape_rules_name_the_module() -> None:
    shapes = {
        f"{P}self_attn.q_proj.lora_A.weight": (8, 32),  # no B
        f"{P}self_attn.k_proj.lora_B.weight": (32, 8),  # no A
        **_pair("mlp.up_proj"),
        f"{P}conv.lora_A.weight": (8, 3, 3, 3), f"{P}conv.lora_B.weight": (16, 8, 1, 1),
        f"{P}mlp.down_proj.lora_A.weight": (8, 64), f"{P}mlp.down_proj.lora_B.weight": (32, 4),
    }
    found = {f.where.removeprefix("model.layers.0."): (f.code, f.message) for f in vllm.check_tensors(GOOD, shapes)}
    assert {k: v[0] for k, v in found.items()} == {
        "self_attn.q_proj": "unpaired", "self_attn.k_proj": "unpaired", "conv": "not_2d",
        "mlp.down_proj": "rank_mismatch",
    }
    assert "lora_A tensor but no lora_B" in found["self_attn.q_proj"][1]
    assert "lora_B tensor but no lora_A" in found["self_attn.k_proj"][1]
    assert "8 rows and B 4 columns" in found["mlp.down_proj"][1]


def test_a_module_rank_above_the_limit_is_refused() -> None:
    config = {**GOOD, "rank_pattern": {"v_proj": 32}, "alpha_pattern": {"v_proj": 64}}  # same scale: 2
    shapes = {**_pair("self_attn.q_proj"), **_pair("self_attn.v_proj", rank=32)}
    assert _codes(vllm.check_tensors(config, shapes)) == [(vllm.REFUSED, "rank", "model.layers.0.self_attn.v_proj")]
    assert vllm.check_tensors(config, shapes, max_lora_rank=32) == []


@pytest.mark.parametrize("rslora", [False, True])
def test_a_per_module_scale_vllm_cannot_express_is_silently_wrong(rslora: bool) -> None:
    config = {**GOOD, "use_rslora": rslora, "alpha_pattern": {"v_proj": 4}}
    findings = vllm.check_tensors(config, SHAPES)
    assert _codes(findings) == [(vllm.WRONG, "per_module_scale", "model.layers.0.self_attn.v_proj")]
    trained, served = (4 / 8**0.5, 16 / 8**0.5) if rslora else (4 / 8, 16 / 8)
    assert f"scale {trained:.6g}" in findings[0].message and f"global {served:.6g}" in findings[0].message
    assert vllm.silent_wrong(config, SHAPES) == findings


def test_a_pattern_that_keeps_the_ratio_is_fine() -> None:
    config = {**GOOD, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 8}}  # 8/4 == 16/8
    assert vllm.check_tensors(config, {**_pair("self_attn.q_proj", rank=4), **_pair("self_attn.v_proj")}) == []
    with_rank_only = {**GOOD, "rank_pattern": {"q_proj": 4}}  # alpha 16 / r 4 = 4, vLLM 2
    found = vllm.check_tensors(with_rank_only, {**_pair("self_attn.q_proj", rank=4), **_pair("self_attn.v_proj")})
    assert _codes(found) == [(vllm.WRONG, "per_module_scale", "model.layers.0.self_attn.q_proj")]


# -- files written by lorakit and by PEFT ---------------------------------------------------------------------
def _save(model: nn.Module, path, **kw) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.save_adapter(model, path, **kw)
    return [w for w in caught if issubclass(w.category, vllm.VllmWarning)]


def test_plain_lorakit_adapter_passes_and_saves_without_warning(tmp_path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    randomize_adapters(model)
    assert _save(model, tmp_path) == []
    assert vllm.check_vllm(tmp_path) == []


def test_alpha_pattern_save_warns_and_names_the_modules(tmp_path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"],
                                             alpha_pattern={"down_proj": 2.0}))
    caught = _save(model, tmp_path)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "model.layers.0.mlp.down_proj" in text and "model.layers.1.mlp.down_proj" in text and "q_proj" not in text
    assert (tmp_path / "adapter_model.safetensors").is_file()  # warned, still written
    assert _codes(vllm.check_vllm(tmp_path)) == [
        (vllm.WRONG, "per_module_scale", f"model.layers.{i}.mlp.down_proj") for i in (0, 1)
    ]


def test_dora_and_modules_to_save_are_refused(tmp_path) -> None:
    model = tiny_bert()
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True,
                                             modules_to_save=["classifier"]))
    assert _save(model, tmp_path) == []  # refusals are for the check, not save warnings
    codes = {(f.code, f.where.rsplit(".", 1)[-1]) for f in vllm.check_vllm(tmp_path)}
    assert {("dora", "use_dora"), ("modules_to_save", "modules_to_save")} <= codes
    tails = {f.message.split(" named *.")[1].split(" ")[0] for f in vllm.check_vllm(tmp_path)
             if f.code == "unparseable_key"}
    assert tails == {"lora_magnitude_vector", "weight", "bias"}  # DoRA magnitudes, the classifier's copy


def test_rank_above_the_default_limit(tmp_path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=24, alpha=24, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    assert _codes(vllm.check_vllm(tmp_path)) == [(vllm.REFUSED, "rank", "r")]
    assert vllm.check_vllm(tmp_path, max_lora_rank=32) == []


def test_files_written_by_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    plain = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    plain.save_pretrained(str(tmp_path / "plain"))
    assert vllm.check_vllm(tmp_path / "plain") == []
    dora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(str(tmp_path / "dora"))
    assert [f.code for f in vllm.check_vllm(tmp_path / "dora")] == ["dora", "unparseable_key"]


def test_missing_config_or_weights(tmp_path) -> None:
    with pytest.raises(lorakit.AdapterFileError, match="no adapter_config.json"):
        vllm.check_vllm(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(GOOD))
    assert _codes(vllm.check_vllm(tmp_path)) == [(vllm.REFUSED, "no_weights", str(tmp_path))]
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(lorakit.AdapterFileError, match="corrupt or truncated"):
        vllm.check_vllm(tmp_path)


# -- PiSSA / OLoRA: converted by default -----------------------------------------------------------------------
def _trained_pissa(init: str) -> nn.Module:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init=init))
    torch.manual_seed(0)
    ids = token_ids(batch=4, length=9, seed=3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_default_save_loads_onto_the_original_base(tmp_path, init: str) -> None:
    peft = pytest.importorskip("peft")
    ids = token_ids()
    model = _trained_pissa(init)
    expected = _logits(model, ids)
    assert max_abs_diff(expected, _logits(tiny_llama(), ids)) > 1e-3  # training changed the outputs
    assert _save(model, tmp_path) == []  # defaults: converted, nothing for vLLM to get wrong

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True and written["r"] == 8 and written["lora_alpha"] == 16
    assert vllm.check_vllm(tmp_path) == []
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)  # a fresh model: the original weights
    assert max_abs_diff(_logits(reloaded, ids), expected) <= 1e-4
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert max_abs_diff(_logits(pm, ids), expected) <= 1e-4


def test_convert_to_lora_false_keeps_the_residual_form(tmp_path) -> None:
    model = _trained_pissa("pissa")
    caught = _save(model, tmp_path, convert_to_lora=False)
    assert len(caught) == 1 and "init_lora_weights" in str(caught[0].message)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] == "pissa" and written["r"] == 4 and written["lora_alpha"] == 8
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        assert handle.metadata()[RESIDUAL_KEY] == "pissa"
        assert handle.get_slice(f"{P}self_attn.q_proj.lora_A.weight").get_shape() == [4, 32]
    assert _codes(vllm.check_vllm(tmp_path)) == [(vllm.WRONG, "residual_init", "init_lora_weights")]
    with pytest.raises(lorakit.AdapterFileError, match="needs the residual base"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_convert_to_lora_is_a_no_op_for_a_plain_adapter(tmp_path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "default")
    lorakit.save_adapter(model, tmp_path / "kept", convert_to_lora=False)
    config = "adapter_config.json"
    assert (tmp_path / "default" / config).read_text() == (tmp_path / "kept" / config).read_text()
    default, kept = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("default", "kept"))
    assert default.keys() == kept.keys() and all(torch.equal(default[k], kept[k]) for k in default)


def test_a_pissa_training_run_resumes_exactly_from_its_checkpoint(tmp_path, causal_lm_dir) -> None:
    """Checkpoints keep the residual form (what the resumed run's freshly attached adapter holds), not the
    converted rank-2r file that the final save writes; and they raise no VllmWarning (they are not for serving)."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"})
                              for a in range(5) for b in range(5)) + "\n")

    def cfg(out, **kw) -> TrainConfig:
        return TrainConfig(model=str(causal_lm_dir), data=str(data), out=str(out), max_steps=6, init="pissa", r=2,
                           target_modules=["q_proj", "v_proj"], per_device_train_batch_size=4, learning_rate=5e-3,
                           progress=False, seed=5, save_steps=3, **kw)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = train(cfg(tmp_path / "full"))
    assert not [w for w in caught if issubclass(w.category, vllm.VllmWarning)]
    checkpoint = tmp_path / "full" / "checkpoints" / "step-0000003"
    assert json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    resumed = train(cfg(tmp_path / "resumed", resume=str(checkpoint)))
    assert resumed.losses == full.losses
