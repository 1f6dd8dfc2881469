"""Interop with the real `peft` package, both directions.

PEFT -> lorakit: a PEFT model with randomized adapter weights is saved with `save_pretrained`; lorakit loads
the directory into a fresh copy of the same base model and must reproduce PEFT's logits.

lorakit -> PEFT: lorakit attaches and randomizes an adapter and saves it; `PeftModel.from_pretrained` loads
it into a fresh base model and must reproduce lorakit's logits. The saved keys/shapes and the config are
also compared with what PEFT itself writes for the same configuration.

Tiny models built from configs (no hub access): Llama (Linear, Embedding), GPT-2 (Conv1D), BERT
(sequence classification, modules_to_save) and a small custom Conv2d net. All in fp32, eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

import lorakit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

ATOL = 1e-5
VOCAB = 100
SEED = 0


# ---------------------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------------------
def _llama(attention_bias: bool = False) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=attention_bias,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


BUILDERS = {
    "llama": _llama,
    "llama_bias": lambda: _llama(attention_bias=True),
    "gpt2": _gpt2,
    "bert": _bert,
    "conv": TinyConvNet,
}


def build(kind: str) -> nn.Module:
    """The same base model every time (fixed seed), in eval mode."""
    torch.manual_seed(SEED)
    return BUILDERS[kind]().eval()


def inputs_for(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    if kind == "conv":
        return torch.randn(2, 3, 8, 8, generator=gen)
    return torch.randint(0, VOCAB, (2, 7), generator=gen)


def logits(model: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if kind == "conv":
            return model(x)
        return model(input_ids=x).logits


# ---------------------------------------------------------------------------------------------------------
# cases: (model kind, lorakit LoraConfig kwargs, adapter name)
# ---------------------------------------------------------------------------------------------------------
CASES = {
    "llama_plain": (
        "llama",
        dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "default",
    ),
    "llama_rslora": (
        "llama",
        dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True),
        "default",
    ),
    "llama_patterns": (
        "llama",
        dict(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6},
            alpha_pattern={r"model\.layers\.1\..*q_proj": 3, "down_proj": 20},
        ),
        "default",
    ),
    "llama_rslora_patterns": (
        "llama",
        dict(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj"],
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 5},
        ),
        "default",
    ),
    "llama_embedding": ("llama", dict(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]), "default"),
    "llama_named_other": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "other"),
    "llama_regex_target": (
        "llama",
        dict(r=4, alpha=8, target_modules=r".*\.layers\.\d+\.self_attn\.(q|v)_proj"),
        "default",
    ),
    "llama_all_linear": ("llama", dict(r=4, alpha=8, target_modules="all-linear"), "default"),
    "llama_layers_to_transform": (
        "llama",
        dict(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=[1],
            layers_pattern="layers",
        ),
        "default",
    ),
    "llama_exclude": (
        "llama",
        dict(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj"],
            exclude_modules=["model.layers.0.self_attn.q_proj"],
        ),
        "default",
    ),
    "llama_bias_lora_only": (
        "llama_bias",
        dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only"),
        "default",
    ),
    "gpt2_conv1d": ("gpt2", dict(r=4, alpha=8, target_modules=["c_attn", "c_proj"]), "default"),
    "gpt2_all_linear": ("gpt2", dict(r=4, alpha=8, target_modules="all-linear"), "default"),
    "gpt2_bias_all": ("gpt2", dict(r=4, alpha=8, target_modules=["c_attn"], bias="all"), "default"),
    "gpt2_bias_lora_only": (
        "gpt2",
        dict(r=4, alpha=8, target_modules=["c_attn"], bias="lora_only"),
        "default",
    ),
    "bert_modules_to_save": (
        "bert",
        dict(
            r=4,
            alpha=8,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        ),
        "default",
    ),
    "bert_all_linear_seqcls": (
        "bert",
        dict(r=4, alpha=8, target_modules="all-linear", modules_to_save=["classifier"], task_type="SEQ_CLS"),
        "default",
    ),
    "bert_bias_all_modules_to_save": (
        "bert",
        dict(
            r=4,
            alpha=8,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            bias="all",
            task_type="SEQ_CLS",
        ),
        "default",
    ),
    "conv2d": ("conv", dict(r=4, alpha=8, target_modules=["conv1", "conv2", "head"]), "default"),
    # DoRA (use_dora): the magnitude vector travels as `lora_magnitude_vector`
    "llama_dora": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), "default"),
    "llama_dora_bias_rslora": (
        "llama_bias",
        dict(r=4, alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True, use_rslora=True),
        "default",
    ),
    "llama_dora_embedding": ("llama", dict(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True), "default"),
    "gpt2_dora_conv1d": ("gpt2", dict(r=4, alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True), "default"),
    "bert_dora_modules_to_save": (
        "bert",
        dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], use_dora=True,
             task_type="SEQ_CLS"),
        "default",
    ),
    "conv2d_dora": ("conv", dict(r=4, alpha=8, target_modules=["conv1", "conv2", "head"], use_dora=True), "default"),
}
CASE_IDS = list(CASES)

_PEFT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def peft_config(kw: dict) -> peft.LoraConfig:
    """The PEFT LoraConfig equivalent to lorakit kwargs `kw`."""
    out = {}
    for key, value in kw.items():
        if key == "init":
            out["init_lora_weights"] = {"kaiming": True, "gaussian": "gaussian", "random": False}[value]
        else:
            out[_PEFT_NAMES.get(key, key)] = value
    return peft.LoraConfig(**out)


def adapter_dir(root: Path, name: str) -> Path:
    return root if name == "default" else root / name


# ---------------------------------------------------------------------------------------------------------
# randomization of "trained" state
# ---------------------------------------------------------------------------------------------------------
def _noise_(p: torch.Tensor, gen: torch.Generator, std: float) -> None:
    with torch.no_grad():
        p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * std)


def _perturb_biases(model: nn.Module, bias: str, wrapped_cls: type, gen: torch.Generator) -> None:
    """Change the biases a bias-training adapter would have trained, so that a lost bias shows up."""
    if bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                _noise_(p, gen, 0.1)
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, wrapped_cls):
                b = getattr(m.base_layer, "bias", None)
                if b is not None:
                    _noise_(b, gen, 0.1)


def randomize_lorakit(model: nn.Module, bias: str = "none") -> None:
    gen = torch.Generator().manual_seed(99)
    for m in model.modules():
        if isinstance(m, lorakit.layers.LoraLayer):
            for ad in m.adapters.values():
                _noise_(ad.lora_A, gen, 0.1)  # embedding A starts at zero
                _noise_(ad.lora_B, gen, 0.1)  # linear/conv B starts at zero
    for p in model.parameters():  # modules_to_save copies, trainable biases
        if p.requires_grad:
            _noise_(p, gen, 0.05)
    _perturb_biases(model, bias, lorakit.layers.LoraLayer, gen)


def randomize_peft(model: nn.Module, bias: str = "none") -> None:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    gen = torch.Generator().manual_seed(99)
    for m in model.modules():
        if isinstance(m, PeftLoraLayer):
            for container in (m.lora_A, m.lora_B):
                for sub in container.values():
                    _noise_(sub.weight, gen, 0.1)
            for container in (m.lora_embedding_A, m.lora_embedding_B):
                for p in container.values():
                    _noise_(p, gen, 0.1)
    for p in model.parameters():
        if p.requires_grad:
            _noise_(p, gen, 0.05)
    _perturb_biases(model, bias, PeftLoraLayer, gen)


def assert_close_and_nontrivial(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (want - base).abs().max().item() > 1e-3, "the adapter does not change the output: test is vacuous"
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff:.3g} > {ATOL}"


# ---------------------------------------------------------------------------------------------------------
# PEFT -> lorakit
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASE_IDS)
def test_peft_to_lorakit(case: str, tmp_path: Path) -> None:
    kind, kw, name = CASES[case]
    x = inputs_for(kind)
    base_logits = logits(build(kind), kind, x)

    pm = peft.get_peft_model(build(kind), peft_config(kw), adapter_name=name)
    randomize_peft(pm, kw.get("bias", "none"))
    want = logits(pm, kind, x)
    pm.save_pretrained(str(tmp_path))
    src = adapter_dir(tmp_path, name)
    assert (src / "adapter_config.json").is_file() and (src / "adapter_model.safetensors").is_file()

    model = build(kind)
    lorakit.load_adapter(model, str(src), name=name)
    lorakit.set_active(model, [name])
    got = logits(model, kind, x)
    assert_close_and_nontrivial(got, want, base_logits)


def test_peft_named_adapter_from_parent_dir(tmp_path: Path) -> None:
    """PEFT writes adapter "other" to <dir>/other/; lorakit.load_adapter(<dir>, name="other") finds it there,
    symmetric to save_adapter's layout."""
    kind, kw, name = CASES["llama_named_other"]
    x = inputs_for(kind)
    pm = peft.get_peft_model(build(kind), peft_config(kw), adapter_name=name)
    randomize_peft(pm)
    want = logits(pm, kind, x)
    pm.save_pretrained(str(tmp_path))
    assert not (tmp_path / "adapter_config.json").exists()

    model = build(kind)
    lorakit.load_adapter(model, str(tmp_path), name=name)
    lorakit.set_active(model, [name])
    got = logits(model, kind, x)
    assert_close_and_nontrivial(got, want, logits(build(kind), kind, x))


def test_peft_two_adapters_to_lorakit(tmp_path: Path) -> None:
    """Two PEFT adapters saved together (default + subfolder) load into one lorakit model; both active sum."""
    x = inputs_for("llama")
    pm = peft.get_peft_model(
        build("llama"), peft_config(dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    )
    pm.add_adapter("other", peft_config(dict(r=2, alpha=3, target_modules=["v_proj", "o_proj"])))
    randomize_peft(pm)
    pm.save_pretrained(str(tmp_path))
    per_adapter = {}
    for n in ("default", "other"):
        pm.set_adapter(n)
        per_adapter[n] = logits(pm, "llama", x)
    pm.base_model.set_adapter(["default", "other"])
    both = logits(pm, "llama", x)

    model = build("llama")
    lorakit.load_adapter(model, str(tmp_path), name="default")
    lorakit.load_adapter(model, str(tmp_path / "other"), name="other")
    for n in ("default", "other"):
        lorakit.set_active(model, [n])
        assert (logits(model, "llama", x) - per_adapter[n]).abs().max().item() <= ATOL, n
    lorakit.set_active(model, ["default", "other"])
    assert (logits(model, "llama", x) - both).abs().max().item() <= ATOL


# ---------------------------------------------------------------------------------------------------------
# lorakit -> PEFT
# ---------------------------------------------------------------------------------------------------------
def _lorakit_saved(kind: str, kw: dict, name: str, out: Path) -> tuple[nn.Module, Path]:
    model = build(kind)
    lorakit.attach(model, lorakit.LoraConfig(**kw), name=name)
    randomize_lorakit(model, kw.get("bias", "none"))
    lorakit.save_adapter(model, str(out), name=name)
    return model, adapter_dir(out, name)


@pytest.mark.parametrize("case", CASE_IDS)
def test_lorakit_to_peft(case: str, tmp_path: Path) -> None:
    kind, kw, name = CASES[case]
    x = inputs_for(kind)
    base_logits = logits(build(kind), kind, x)

    model, src = _lorakit_saved(kind, kw, name, tmp_path)
    want = logits(model, kind, x)
    assert (src / "adapter_config.json").is_file(), sorted(p.name for p in tmp_path.rglob("*"))
    assert (src / "adapter_model.safetensors").is_file()

    pm = peft.PeftModel.from_pretrained(build(kind), str(src), adapter_name=name).eval()
    got = logits(pm, kind, x)
    assert_close_and_nontrivial(got, want, base_logits)


def _peft_reference_tensors(kind: str, kw: dict, out: Path) -> dict[str, torch.Tensor]:
    pm = peft.get_peft_model(build(kind), peft_config(kw))
    pm.save_pretrained(str(out))
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("case", CASE_IDS)
def test_lorakit_file_matches_peft_layout(case: str, tmp_path: Path) -> None:
    """Same tensor keys and shapes as PEFT writes for the same config (PEFT's optional copy of a targeted
    embedding's base weight, `*.base_layer.weight`, may be left out), and a config PEFT reads back equal."""
    kind, kw, name = CASES[case]
    _, src = _lorakit_saved(kind, kw, name, tmp_path / "lk")
    ours = load_file(str(src / "adapter_model.safetensors"))
    ref = _peft_reference_tensors(kind, kw, tmp_path / "ref")

    # PEFT extras a reader needs but a writer may omit: a targeted embedding's base weight, and with
    # bias="all" + modules_to_save the wrapper-internal bias keys (`<m>.modules_to_save.bias`,
    # `<m>.original_module.bias`), which PEFT's own loader ignores / does not use in forward.
    optional = {
        k
        for k in ref
        if k.endswith(".base_layer.weight") or ".modules_to_save." in k or ".original_module." in k
    }
    missing = sorted(set(ref) - set(ours) - optional)
    extra = sorted(set(ours) - set(ref))
    assert not missing and not extra, f"missing={missing} extra={extra}"
    wrong = {k: (tuple(ours[k].shape), tuple(ref[k].shape)) for k in ours if ours[k].shape != ref[k].shape}
    assert not wrong, f"shape (lorakit, peft): {wrong}"
    assert all(t.dtype == torch.float32 for t in ours.values())

    raw = json.loads((src / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA"
    cfg = peft.PeftConfig.from_pretrained(str(src))
    assert isinstance(cfg, peft.LoraConfig)
    assert cfg.r == kw["r"] and cfg.lora_alpha == kw["alpha"]
    assert cfg.bias == kw.get("bias", "none")
    assert cfg.use_rslora == kw.get("use_rslora", False)
    assert dict(cfg.rank_pattern or {}) == kw.get("rank_pattern", {})
    assert dict(cfg.alpha_pattern or {}) == kw.get("alpha_pattern", {})
    if isinstance(kw["target_modules"], list):
        assert set(cfg.target_modules) == set(kw["target_modules"])
    if kw.get("modules_to_save"):
        assert set(kw["modules_to_save"]) <= set(cfg.modules_to_save or [])
    if kw.get("layers_to_transform") is not None:
        assert list(cfg.layers_to_transform) == kw["layers_to_transform"]
        assert cfg.layers_pattern == kw["layers_pattern"]


@pytest.mark.parametrize("case", CASE_IDS)
def test_trainable_parameter_count_matches_peft(case: str) -> None:
    kind, kw, name = CASES[case]
    model = build(kind)
    lorakit.attach(model, lorakit.LoraConfig(**kw), name=name)
    trainable, _ = lorakit.trainable_parameters(model)
    pm = peft.get_peft_model(build(kind), peft_config(kw), adapter_name=name)
    # note: with bias="all" + modules_to_save PEFT also counts the (unused) original module's bias
    peft_trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == peft_trainable


def test_lorakit_two_adapters_to_peft(tmp_path: Path) -> None:
    """lorakit saves "default" to <dir>/ and "other" to <dir>/other/; PEFT loads both, results match."""
    x = inputs_for("llama")
    model = build("llama")
    lorakit.attach(
        model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="default"
    )
    lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=3, target_modules=["v_proj", "o_proj"]), name="other")
    randomize_lorakit(model)
    lorakit.save_adapter(model, str(tmp_path), name="default")
    lorakit.save_adapter(model, str(tmp_path), name="other")
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    want = {}
    for n in ("default", "other"):
        lorakit.set_active(model, [n])
        want[n] = logits(model, "llama", x)

    pm = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    pm.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for n in ("default", "other"):
        pm.set_adapter(n)
        assert (logits(pm, "llama", x) - want[n]).abs().max().item() <= ATOL, n
