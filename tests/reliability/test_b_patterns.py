"""Patterns from configs and files cannot hang the process (issue 15, section 2): a regex whose backtracking
is unbounded is a ConfigError naming the field and the pattern, raised at once; real PEFT patterns still work."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.layers import LoraLayer
from lorakit.patterns import MAX_LOOPS, MAX_PATTERN_LENGTH

# each would take seconds to forever against a module path of 24+ characters
CATASTROPHIC = [r"(a+)+b", r"(.*)*!", r"([a-z_.0-9]+)+!", r"(\w+\.?)*!", r"(ab|a)*c", r"(x\d?)+y",
                "." + ".*" * (MAX_LOOPS + 1) + "!", r"(\w+)\1!", "a" * (MAX_PATTERN_LENGTH + 1),
                "(" * 990 + "a" + ")" * 990]  # the last: nesting deeper than Python's recursion limit
# where a pattern can come from: the field as LoraConfig takes it, and the name the message uses
FIELDS = {
    "target_modules": (lambda p: {"target_modules": p}, "target_modules"),
    "exclude_modules": (lambda p: {"target_modules": ["q_proj"], "exclude_modules": p}, "exclude_modules"),
    "rank_pattern": (lambda p: {"target_modules": ["q_proj"], "rank_pattern": {p: 2}}, "rank_pattern"),
    "alpha_pattern": (lambda p: {"target_modules": ["q_proj"], "alpha_pattern": {p: 2.0}}, "alpha_pattern"),
    "layers_pattern": (lambda p: {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": p},
                       "layers_pattern"),
}


@pytest.mark.parametrize("field", list(FIELDS))
@pytest.mark.parametrize("pattern", CATASTROPHIC, ids=lambda p: p[:20])
def test_a_catastrophic_pattern_is_refused_at_once(field: str, pattern: str) -> None:
    kwargs, name = FIELDS[field]
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        lorakit.LoraConfig(**kwargs(pattern))
    assert time.perf_counter() - start < 2.0
    assert f"LoraConfig.{name}" in str(info.value) and repr(pattern)[:40] in str(info.value)


def test_a_catastrophic_file_pattern_fails_fast_on_load(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    path = lorakit.save_adapter(model, tmp_path / "a")
    data = json.loads((path / "adapter_config.json").read_text())
    data["alpha_pattern"] = {r"([a-z_.0-9]+)+!": 4.0}  # against "model.layers.0.self_attn.q_proj": 2^31 steps
    (path / "adapter_config.json").write_text(json.dumps(data))
    fresh = tiny_llama()
    start = time.perf_counter()
    with pytest.raises(AdapterFileError, match=r"alpha_pattern.*\(\[a-z_\.0-9\]\+\)\+!"):
        lorakit.load_adapter(fresh, path)
    assert time.perf_counter() - start < 2.0


class LongNames(nn.Module):
    """One Linear under a 24-character name: `(a+)+b` needs ~2^24 backtracking steps to fail on it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"a" * 24: nn.Linear(4, 4)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks["a" * 24](x)


def test_attach_with_a_catastrophic_target_returns_promptly() -> None:
    model = LongNames()
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="nested quantifier"):
        lorakit.attach(model, lorakit.LoraConfig(target_modules=r".*(a+)+b"))
    assert time.perf_counter() - start < 2.0
    assert isinstance(model.blocks["a" * 24], nn.Linear)


PEFT_PATTERNS = [
    r".*\.layers\.1\..*(q_proj|v_proj)",
    r"^(?!.*mlp).*_proj$",
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r".*(gate|up|down)_proj",
    "model.layers.0.self_attn.q_proj",
]


@pytest.mark.parametrize("pattern", PEFT_PATTERNS)
def test_real_patterns_select_what_python_re_selects(pattern: str) -> None:
    model = tiny_llama()
    linear = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p != "lm_head"]
    expected = sorted(p for p in linear if re.fullmatch(pattern, p))
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=pattern))
    wrapped = sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == expected and expected


def test_real_rank_pattern_keys_still_apply() -> None:
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                rank_pattern={r"layers\.1\..*v_proj": 2, "model.layers.0.self_attn.q_proj": 3})
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 2
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 3
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
