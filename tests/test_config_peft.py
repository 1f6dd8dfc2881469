"""LoraConfig with PEFT's names: constructor aliases, `LoraConfig.from_peft` on real `peft.LoraConfig` objects,
string booleans, and the PEFT features lorakit refuses. Tiny Llama built from a config; real peft 0.21."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

import lorakit
from conftest import tiny_llama
from lorakit.errors import ConfigError
from lorakit.peft_fields import ALIASES, IGNORED, UNSUPPORTED

peft = pytest.importorskip("peft")

PEFT_CASES = {
    "plain": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 5}),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "layers": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                   layers_pattern="layers"),
    "all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian",
                       task_type="CAUSAL_LM"),
    "exclude": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                    exclude_modules=["model.layers.0.self_attn.q_proj"]),
}


# -- aliases -----------------------------------------------------------------------------------------------
def test_peft_names_are_constructor_aliases() -> None:
    cfg = lorakit.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights="gaussian",
                             target_modules=["q_proj"])
    assert cfg == lorakit.LoraConfig(r=8, alpha=16, dropout=0.1, init="gaussian", target_modules=["q_proj"])
    assert (cfg.lora_alpha, cfg.lora_dropout, cfg.init_lora_weights) == (16, 0.1, "gaussian")
    assert "alpha=16" in repr(cfg) and "lora_alpha" not in repr(cfg)
    assert [f.name for f in dataclasses.fields(cfg)][:4] == ["r", "alpha", "target_modules", "dropout"]


@pytest.mark.parametrize("peft_init, init", [(True, "kaiming"), (False, "random"), ("gaussian", "gaussian"),
                                             ("pissa", "pissa"), ("pissa_niter_16", "pissa_niter_16"),
                                             ("olora", "olora")])
def test_init_lora_weights_maps_as_peft_files_do(peft_init, init) -> None:
    cfg = lorakit.LoraConfig(init_lora_weights=peft_init)
    assert cfg.init == init
    assert cfg.init_lora_weights == peft_init
    assert lorakit.LoraConfig.from_peft_dict({"init_lora_weights": peft_init}).init == init


def test_alias_and_field_with_different_values_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"alpha=8.*lora_alpha=16"):
        lorakit.LoraConfig(alpha=8, lora_alpha=16)
    with pytest.raises(ConfigError, match=r"init='gaussian'.*init_lora_weights=True"):
        lorakit.LoraConfig(init="gaussian", init_lora_weights=True)
    assert lorakit.LoraConfig(alpha=16, lora_alpha=16).alpha == 16  # the same value twice is fine


def test_replace_and_from_peft_dict_keep_working_with_aliases() -> None:
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    assert cfg.replace(lora_alpha=32).alpha == 32
    assert dataclasses.replace(cfg, alpha=2).alpha == 2
    assert lorakit.LoraConfig.from_peft_dict(cfg.to_peft_dict()) == cfg
    with pytest.raises(ConfigError, match="dropout"):
        cfg.replace(lora_dropout=1.5)


def test_peft_metadata_fields_are_accepted() -> None:
    cfg = lorakit.LoraConfig(r=4, target_modules=["q_proj"], peft_type="LORA", inference_mode=True,
                             revision="main", auto_mapping=None, task_type=peft.TaskType.CAUSAL_LM)
    assert cfg.task_type == "CAUSAL_LM" and cfg == lorakit.LoraConfig(r=4, target_modules=["q_proj"],
                                                                      task_type="CAUSAL_LM")
    with pytest.raises(ConfigError, match="peft_type 'IA3'"):
        lorakit.LoraConfig(peft_type="IA3")


@pytest.mark.parametrize("field, value", [
    ("use_qalora", True), ("eva_config", {"rho": 2.0}),
    ("corda_config", {"corda_method": "ipm"}), ("megatron_config", {"x": 1}), ("layer_replication", [[0, 2]]),
    ("target_parameters", ["mlp.experts.down_proj"]), ("trainable_token_indices", [1, 2]),
    ("alora_invocation_tokens", [5]), ("ensure_weight_tying", True), ("use_qalora", "true"),
])
def test_peft_features_lorakit_lacks_are_refused_naming_the_field(field, value) -> None:
    with pytest.raises(ConfigError, match=field):
        lorakit.LoraConfig(r=4, target_modules=["q_proj"], **{field: value})
    with pytest.raises(ConfigError, match=rf"adapter_config.json: {field}"):
        lorakit.LoraConfig.from_peft_dict({"target_modules": ["q_proj"], field: value})


@pytest.mark.parametrize("init", ["eva", "corda", "orthogonal"])
def test_inits_lorakit_lacks_are_refused(init) -> None:
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}'"):
        lorakit.LoraConfig(init_lora_weights=init)


def test_features_left_at_their_default_are_accepted() -> None:
    off = {"use_qalora": False, "lora_bias": "false", "loftq_config": {}, "eva_config": None,
           "layer_replication": None, "target_parameters": None, "ensure_weight_tying": False}
    assert lorakit.LoraConfig(r=4, **off) == lorakit.LoraConfig(r=4)


def test_unknown_field_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown field 'lora_alph'.*lora_alpha"):
        lorakit.LoraConfig(lora_alph=16)


def test_every_field_of_peft_lora_config_is_known() -> None:
    """A new PEFT field must be classified (alias, metadata, unsupported) before lorakit reads it."""
    known = {f.name for f in dataclasses.fields(lorakit.LoraConfig)} | set(ALIASES) | set(IGNORED)
    known |= set(UNSUPPORTED) | {"peft_type"}
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} - known == set()


# -- string booleans ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("0", False), ("no", False),
                                         ("true", True), ("TRUE", True), ("1", True), ("yes", True)])
def test_string_booleans_are_read_as_booleans(text, value) -> None:
    cfg = lorakit.LoraConfig(use_rslora=text, use_dora=text, fan_in_fan_out=text, lora_fa=text)
    assert (cfg.use_rslora, cfg.use_dora, cfg.fan_in_fan_out, cfg.lora_fa) == (value,) * 4
    data = {"use_rslora": text, "use_dora": text, "fan_in_fan_out": text, "target_modules": ["q_proj"]}
    from_file = lorakit.LoraConfig.from_peft_dict(json.loads(json.dumps(data)))
    assert (from_file.use_rslora, from_file.use_dora, from_file.fan_in_fan_out) == (value,) * 3


@pytest.mark.parametrize("value", ["maybe", 2, "", None, 0.5])
def test_other_booleans_are_refused_naming_field_and_value(value) -> None:
    with pytest.raises(ConfigError, match=rf"use_rslora.*{re.escape(repr(value))}"):
        lorakit.LoraConfig(use_rslora=value)
    with pytest.raises(ConfigError, match=r"adapter_config.json: .*use_dora"):
        lorakit.LoraConfig.from_peft_dict({"use_dora": value})


def test_string_false_scales_as_plain_lora() -> None:
    """`"use_rslora": "false"` in a file: s = alpha / r, never alpha / sqrt(r)."""
    cfg = lorakit.LoraConfig.from_peft_dict({"r": 16, "lora_alpha": 32, "use_rslora": "false"})
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0


# -- from_peft against real peft.LoraConfig objects ----------------------------------------------------------
def _peft_wrapped(kw: dict) -> dict[str, float]:
    """{module path: scaling} of the adapter PEFT builds on the tiny Llama."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    model = peft.get_peft_model(tiny_llama(layers=3), peft.LoraConfig(**kw))
    prefix = "base_model.model."
    return {name[len(prefix):]: m.scaling["default"] for name, m in model.named_modules()
            if isinstance(m, PeftLoraLayer)}


def _lorakit_wrapped(config: lorakit.LoraConfig) -> dict[str, float]:
    model = lorakit.attach(tiny_llama(layers=3), config)
    return {layer.path: layer.adapters["default"].scale for layer in lorakit.model.lora_layers(model)}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_from_peft_builds_the_adapter_peft_builds(case: str) -> None:
    kw = PEFT_CASES[case]
    config = lorakit.LoraConfig.from_peft(peft.LoraConfig(**kw))
    assert config == lorakit.LoraConfig.from_peft(peft.LoraConfig(**kw).to_dict())
    same_call = lorakit.LoraConfig(**kw)  # the same arguments, only the import changed
    if isinstance(kw["target_modules"], list):  # PEFT keeps a set: the order is lost
        same_call = same_call.replace(target_modules=sorted(kw["target_modules"]))
    assert config == same_call
    want, got = _peft_wrapped(kw), _lorakit_wrapped(config)
    assert sorted(got) == sorted(want) and len(got) > 0
    for path, scale in want.items():
        assert got[path] == pytest.approx(scale, rel=1e-6), path


def test_from_peft_keeps_every_field_it_converts() -> None:
    kw = dict(r=6, lora_alpha=12, lora_dropout=0.05, target_modules={"q_proj", "k_proj"}, use_rslora=True,
              use_dora=True, bias="lora_only", rank_pattern={"k_proj": 3}, alpha_pattern={"k_proj": 4},
              modules_to_save=["lm_head"], layers_to_transform=[0, 2], layers_pattern="layers",
              init_lora_weights="pissa_niter_4", task_type="CAUSAL_LM", base_model_name_or_path="org/model")
    cfg = lorakit.LoraConfig.from_peft(peft.LoraConfig(**kw))
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules) == (6, 12, 0.05, ["k_proj", "q_proj"])
    assert (cfg.use_rslora, cfg.use_dora, cfg.bias, cfg.init) == (True, True, "lora_only", "pissa_niter_4")
    assert (cfg.rank_pattern, cfg.alpha_pattern) == ({"k_proj": 3}, {"k_proj": 4})
    assert (cfg.modules_to_save, cfg.layers_to_transform, cfg.layers_pattern) == (["lm_head"], [0, 2], "layers")
    assert (cfg.task_type, cfg.base_model_name_or_path) == ("CAUSAL_LM", "org/model")


def test_from_peft_refuses_other_methods_and_other_objects() -> None:
    with pytest.raises(ConfigError, match="peft_type 'IA3'"):
        lorakit.LoraConfig.from_peft(peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(ConfigError, match="use_qalora"):
        lorakit.LoraConfig.from_peft(peft.LoraConfig(target_modules=["q_proj"], use_qalora=True))
    with pytest.raises(ConfigError, match="expected a peft.LoraConfig or a dict, got int"):
        lorakit.LoraConfig.from_peft(3)


def test_a_newer_peft_field_in_a_file_is_ignored_with_a_warning_when_set() -> None:
    with pytest.warns(UserWarning, match="future_feature"):
        cfg = lorakit.LoraConfig.from_peft_dict({"r": 4, "future_feature": {"on": 1}})
    assert cfg.r == 4
    assert lorakit.LoraConfig.from_peft_dict({"r": 4, "future_off": None}).r == 4


def test_peft_defaults_fill_a_sparse_file() -> None:
    cfg = lorakit.LoraConfig.from_peft_dict({"lora_dropout": None, "rank_pattern": None, "layers_to_transform": []})
    assert (cfg.dropout, cfg.rank_pattern, cfg.layers_to_transform) == (0.0, {}, None)
    assert cfg.r == 8  # PEFT's default rank
