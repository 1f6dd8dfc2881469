"""lorakit.load_model / load_tokenizer by Hugging Face model ID, through a hub cache laid out by hand in a
temporary directory (no network), and the checkpoint's own dtype ("auto")."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers

import lorakit
from lorakit.cli.main import main as cli_main
from lorakit.loading import hub_cache_dir, parse_model_id, resolve_model
from model_dirs import make_causal_lm_dir

SHA_MAIN = "a" * 40
SHA_OLD = "b" * 40


def lay_out_snapshot(cache: Path, repo_id: str, sha: str, source: Path, refs: tuple[str, ...] = ()) -> Path:
    """Put the files of `source` at cache/models--org--name/snapshots/<sha>/ and point each ref at it, as
    huggingface_hub lays out its cache (plain files instead of blob symlinks: both are read the same)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A cache with org/tiny at two revisions: main (seed 0) and `old` (seed 1); downloads off."""
    cache = tmp_path / "hf-cache"
    new = make_causal_lm_dir(tmp_path / "src-main", seed=0)
    old = make_causal_lm_dir(tmp_path / "src-old", seed=1)
    lay_out_snapshot(cache, "org/tiny", SHA_MAIN, new, refs=("main",))
    lay_out_snapshot(cache, "org/tiny", SHA_OLD, old, refs=("old",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"cache": cache, "main": new, "old": old}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(2, 12)[None]).logits


def reference(directory: Path) -> torch.Tensor:
    return logits(transformers.AutoModelForCausalLM.from_pretrained(directory).eval())


def test_parse_model_id():
    assert parse_model_id("org/name").repo_id == "org/name" and parse_model_id("org/name").revision is None
    assert parse_model_id("org/name@v1.0").revision == "v1.0"
    assert parse_model_id("gpt2").repo_id == "gpt2"
    for path in ("./model", "/abs/model", "~/m", "a/b/c", "org/name@", ""):
        assert parse_model_id(path) is None, path


def test_model_id_loads_from_the_cache_with_revisions(hub):
    main = lorakit.load_model("org/tiny")
    assert torch.equal(logits(main), reference(hub["main"]))
    for revision in ("old", SHA_OLD):  # a branch name, and a commit hash
        old = lorakit.load_model(f"org/tiny@{revision}")
        assert torch.equal(logits(old), reference(hub["old"]))
    assert not torch.equal(logits(main), logits(old))
    tokenizer = lorakit.load_tokenizer("org/tiny")
    assert tokenizer("hello world")["input_ids"] == transformers.AutoTokenizer.from_pretrained(hub["main"])(
        "hello world")["input_ids"]


def test_hf_home_is_the_cache_when_hf_hub_cache_is_unset(hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    with pytest.raises(lorakit.ModelDirError, match="not in the cache"):
        resolve_model("org/tiny")
    shutil.copytree(hub["cache"], tmp_path / "home" / "hub")
    assert resolve_model("org/tiny").name == SHA_MAIN


def test_offline_and_not_cached_is_one_clear_error(hub):
    with pytest.raises(lorakit.ModelDirError) as err:
        lorakit.load_model("org/absent@v2")
    message = str(err.value)
    assert "org/absent@v2" in message and str(hub["cache"]) in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(lorakit.ModelDirError, match="org/absent"):
        lorakit.load_tokenizer("org/absent")
    with pytest.raises(lorakit.ModelDirError, match="does not exist"):
        lorakit.load_model("./not/a/model")


def test_failed_download_is_one_clear_error(hub, monkeypatch):
    """Online, not cached, and the hub unreachable (a closed port on 127.0.0.1): the error names the ID, the
    cache and the failure, quickly."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(lorakit.ModelDirError) as err:
        lorakit.load_model("org/absent")
    assert "org/absent" in str(err.value) and str(hub["cache"]) in str(err.value) and "downloading it failed" in str(err.value)
    assert time.perf_counter() - started < 60


def test_cli_takes_a_model_id_and_errors_without_traceback(hub, capsys):
    assert cli_main(["generate", "--model", "org/tiny@old", "--prompt", "one two", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli_main(["generate", "--model", "org/absent", "--prompt", "one"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error:") and "org/absent" in err and "Traceback" not in err


def test_dtype_auto_keeps_the_checkpoint_dtype(tmp_path):
    """A bf16 checkpoint loads as bf16 by default (not upcast to fp32); fp32 on request; a config that names
    no dtype falls back to the weights' dtype."""
    source = make_causal_lm_dir(tmp_path / "fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    bf16_dir = tmp_path / "bf16"
    model.save_pretrained(bf16_dir)
    assert lorakit.load_model(bf16_dir).dtype == torch.bfloat16
    assert lorakit.load_model(bf16_dir, dtype="fp32").dtype == torch.float32
    assert lorakit.load_model(source).dtype == torch.float32
    config = json.loads((bf16_dir / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (bf16_dir / "config.json").write_text(json.dumps(config))
    assert lorakit.load_model(bf16_dir).dtype == torch.bfloat16
    with pytest.raises(lorakit.ConfigError, match="unknown dtype"):
        lorakit.load_model(source, dtype="fp8")
    with pytest.raises(lorakit.ConfigError, match="quantize"):
        lorakit.load_model(source, quantize="int3")
    with pytest.raises(lorakit.ConfigError, match="num_labels"):
        lorakit.load_model(source, num_labels=3)


def test_adapters_keep_their_own_dtype_on_a_bf16_base(tmp_path):
    source = make_causal_lm_dir(tmp_path / "fp32")
    transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = lorakit.load_model(tmp_path / "bf16")
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.adapters["default"].lora_A.dtype == torch.float32
    assert logits(model).dtype == torch.bfloat16


def test_saved_adapter_names_its_base_model(hub, tmp_path):
    """adapter_config.json's base_model_name_or_path: the model ID a model was loaded by (so AutoPeftModel finds
    it on the hub), or its directory; a value the config already has is kept."""
    for source, expected in (("org/tiny@old", "org/tiny"), (str(hub["main"]), str(hub["main"]))):
        model = lorakit.load_model(source)
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
        lorakit.save_adapter(model, tmp_path / "a")
        assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == expected
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path="mine"), name="b")
    lorakit.save_adapter(model, tmp_path / "b", name="b")
    assert json.loads((tmp_path / "b" / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "mine"


def test_train_by_model_id_with_nf4(hub, tmp_path, capsys):
    """`lorakit train --model org/name@rev --quantize nf4`: tokenizer and base come from the cache, and the adapter
    names the ID and fits the revision it trained on."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"one two three {w} four"}) for w in ("cat", "dog", "red")) + "\n")
    out = tmp_path / "run"
    assert cli_main(["train", "--model", "org/tiny@old", "--data", str(data), "--out", str(out), "--max-steps", "2",
                     "--batch-size", "2", "--progress", "false", "--quantize", "nf4"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny"  # a repository ID, as PEFT reads the field
    model = lorakit.load_model("org/tiny@old")
    lorakit.load_adapter(model, out / "adapter")
    assert cli_main(["train", "--model", "org/absent", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "org/absent" in capsys.readouterr().err
