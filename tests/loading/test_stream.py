"""Tests of lorakit.loading.stream: safetensors read straight into NF4 equal from_pretrained(dtype) + quantize.

Tiny models saved to temporary directories; the memory test loads a ~180 MB fp32 checkpoint in a subprocess.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import VOCAB, tiny_bert, tiny_llama, token_ids
from lorakit.errors import LorakitError, ModelDirError
from lorakit.loading.stream import (
    empty_nf4_state,
    label_dim_mismatch,
    load_nf4_streaming,
    quantize_nf4_into,
    row_ranges,
)
from lorakit.quant import NF4Linear, quantize, quantize_nf4

CPU = torch.device("cpu")


def _llama(tied: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def _stream(directory: Path, auto_cls=transformers.AutoModelForCausalLM, *, dtype=torch.bfloat16,
            compute=torch.bfloat16, skip=("lm_head",), config=None):
    config = config or transformers.AutoConfig.from_pretrained(directory)
    return load_nf4_streaming(directory, auto_cls, config, dtype=dtype, compute_dtype=compute, device=CPU,
                              skip=lambda name: name in skip)


def _reference(directory: Path, auto_cls=transformers.AutoModelForCausalLM, *, dtype=torch.bfloat16,
               compute=torch.bfloat16, skip=("lm_head",), **kwargs):
    model = auto_cls.from_pretrained(directory, dtype=dtype, **kwargs).eval()
    return quantize(model, "nf4", compute_dtype=compute, skip=skip)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize(("dtype", "compute"), [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("tied", [False, True])
def test_llama_logits_equal_from_pretrained_then_quantize(tmp_path, dtype, compute, tied):
    _llama(tied).save_pretrained(tmp_path)
    model = _stream(tmp_path, dtype=dtype, compute=compute)
    reference = _reference(tmp_path, dtype=dtype, compute=compute)
    ids = token_ids()
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)
    assert not isinstance(model.lm_head, NF4Linear) and model.lm_head.weight.dtype == dtype
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.training


def test_tied_head_quantised_when_not_skipped(tmp_path):
    _llama(tied=True).save_pretrained(tmp_path)
    model = _stream(tmp_path, skip=())
    reference = _reference(tmp_path, skip=())
    assert isinstance(model.lm_head, NF4Linear) and model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = token_ids()
    assert torch.equal(_logits(model, ids), _logits(reference, ids))


def test_sharded_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    ids = token_ids()
    assert torch.equal(_logits(_stream(tmp_path), ids), _logits(_reference(tmp_path), ids))


def test_checkpoint_without_base_model_prefix(tmp_path):
    source = tmp_path / "source"
    tiny_llama().save_pretrained(source)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, renamed / "model.safetensors")
    assert not any(k.startswith("model.") for k in load_file(renamed / "model.safetensors"))
    ids = token_ids()
    assert torch.equal(_logits(_stream(renamed), ids), _logits(_reference(source), ids))


def _base_outputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.bert(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


def test_bert_classifier_new_head(tmp_path):
    tiny_bert(num_labels=2).save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    config.num_labels = 3
    cls = transformers.AutoModelForSequenceClassification
    model = _stream(tmp_path, cls, dtype=torch.float32, compute=torch.float32, skip=("classifier",), config=config)
    reference = _reference(tmp_path, cls, dtype=torch.float32, compute=torch.float32, skip=("classifier",),
                           num_labels=3, ignore_mismatched_sizes=True)
    ids = token_ids()
    for ours, theirs in zip(_base_outputs(model, ids), _base_outputs(reference, ids)):
        assert torch.equal(ours, theirs)
    head = model.classifier
    assert head.weight.shape == (3, 32) and head.weight.dtype == torch.float32
    assert torch.isfinite(head.weight).all() and head.weight.abs().sum() > 0
    assert torch.equal(head.bias, torch.zeros(3))  # transformers' init: bias 0, weight N(0, initializer_range)
    assert 0.25 * config.initializer_range < head.weight.std() < 4 * config.initializer_range
    assert model(input_ids=ids).logits.shape == (*ids.shape[:1], 3)


def test_bert_legacy_layernorm_names_are_renamed(tmp_path):
    source = tmp_path / "source"
    tiny_bert().save_pretrained(source)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    renames = {".LayerNorm.weight": ".LayerNorm.gamma", ".LayerNorm.bias": ".LayerNorm.beta"}
    old = {next((k.replace(a, b) for a, b in renames.items() if k.endswith(a)), k): v for k, v in tensors.items()}
    assert any(k.endswith("gamma") for k in old)
    save_file(old, legacy / "model.safetensors")
    cls = transformers.AutoModelForSequenceClassification
    ids = token_ids()
    ours, theirs = _stream(legacy, cls, skip=("classifier",)), _reference(source, cls, skip=("classifier",))
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))


def test_causal_checkpoint_as_classifier_initialises_score(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    config.num_labels = 4
    cls = transformers.AutoModelForSequenceClassification
    model = _stream(tmp_path, cls, skip=("score",), config=config)
    reference = _reference(tmp_path, cls, skip=("score",), num_labels=4)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model.model(input_ids=ids).last_hidden_state,
                           reference.model(input_ids=ids).last_hidden_state)
    assert model.score.weight.shape == (4, 32) and torch.isfinite(model.score.weight).all()


@pytest.mark.parametrize("shape", [(48, 40), (301, 33), (130, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_quantisation_writes_the_same_bytes(shape, dtype):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.05
    state = empty_nf4_state(torch.Size(shape), CPU)
    ranges = row_ranges(shape, chunk=256)  # several pieces, a short last block, odd element counts
    assert len(ranges) > 1 and all((hi - lo) * shape[1] % 128 == 0 for lo, hi in ranges[:-1])
    quantize_nf4_into(state, [weight[lo:hi] for lo, hi in ranges], dtype)
    expected = quantize_nf4(weight.to(dtype))
    for ours, theirs in zip(state.tensors(), expected.tensors(), strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


# -- errors --------------------------------------------------------------------------------------------------
def test_pickle_checkpoint_is_refused_naming_the_file(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match=r"pytorch_model\.bin.*safetensors"):
        _stream(tmp_path)


def test_no_weights(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"no weights.*model\.safetensors"):
        _stream(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    tiny_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelDirError, match=re.escape(shard.name)):
        _stream(tmp_path)


def test_wrong_shape_names_file_and_key(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' "
                                            r"has shape \[32, 64\].*expects \[32, 48\]"):
        _stream(tmp_path)


def test_missing_weight_names_the_key(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelDirError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight'.*model\.safetensors"):
        _stream(tmp_path)


def test_missing_output_head_is_not_a_new_head(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelDirError, match="'lm_head.weight'"):
        _stream(tmp_path)


def test_truncated_file(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LorakitError, match=r"model\.safetensors"):
        _stream(tmp_path)


def test_label_dim_mismatch():
    assert label_dim_mismatch((3, 32), (2, 32), labels=3, saved_labels=2)
    assert label_dim_mismatch((3,), (2,), labels=3, saved_labels=2)
    assert not label_dim_mismatch((3, 32), (2, 16), labels=3, saved_labels=2)
    assert not label_dim_mismatch((3, 32), (2, 32), labels=3, saved_labels=3)
    assert not label_dim_mismatch((64, 32), (48, 32), labels=3, saved_labels=2)


# -- memory --------------------------------------------------------------------------------------------------
_MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch, transformers, accelerate, safetensors
    import transformers.models.llama.modeling_llama
    from lorakit.loading.stream import load_nf4_streaming

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    directory = Path(sys.argv[1])
    config = transformers.AutoConfig.from_pretrained(directory)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS")
    model = load_nf4_streaming(directory, transformers.AutoModelForCausalLM, config, dtype=torch.float32,
                               compute_dtype=torch.float32, device=torch.device("cpu"), skip=lambda n: n == "lm_head")
    peak = status("VmHWM")
    held = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    print(json.dumps({"growth": peak - before, "held": held}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the RSS peak")
def test_peak_memory_is_nf4_model_plus_one_tensor(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                                   num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    del model
    script = tmp_path / "child.py"
    script.write_text(_MEMORY_CHILD)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    slack = 32 * 2**20  # Python objects of the skeleton, chunk temporaries, malloc slack
    assert found["held"] < full_bytes / 3  # the NF4 model really is small
    assert found["growth"] < found["held"] + largest + slack, (found, full_bytes, largest)
