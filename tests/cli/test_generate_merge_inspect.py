"""`lorakit generate`, `lorakit merge`, `lorakit inspect` end to end on the tiny model directories, plus the
library functions behind them (lorakit.hf, lorakit.analysis)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import lorakit
from lorakit import analysis, generation, hf
from lorakit.cli.main import main
from model_dirs import save_random_adapter

PROMPT = "one two three four"


# -- fixtures --------------------------------------------------------------------------------------------
def _make_adapter(model_dir: Path, out: Path, config: lorakit.LoraConfig, std: float, seed: int) -> Path:
    return save_random_adapter(model_dir, out, config, std, seed)


@pytest.fixture(scope="module")
def adapter_dir(causal_lm_dir, tmp_path_factory):
    """q/v/o projections and the MLP down projection, with an alpha_pattern (a module-specific scaling)."""
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                alpha_pattern={"down_proj": 2.0}, dropout=0.0)
    return _make_adapter(causal_lm_dir, tmp_path_factory.mktemp("adapter"), config, std=0.5, seed=1)


@pytest.fixture(scope="module")
def second_adapter_dir(causal_lm_dir, tmp_path_factory):
    config = lorakit.LoraConfig(r=2, alpha=4, target_modules=["k_proj", "up_proj"], use_rslora=True, dropout=0.0)
    return _make_adapter(causal_lm_dir, tmp_path_factory.mktemp("adapter2"), config, std=0.5, seed=2)


@pytest.fixture(scope="module")
def no_tokenizer_dir(causal_lm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("no_tokenizer")
    for name in os.listdir(causal_lm_dir):
        if name.startswith("tokenizer") or name.startswith("special_tokens"):
            continue
        shutil.copy(causal_lm_dir / name, path / name)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def base_plus_adapters(model_dir: Path, *adapters: Path):
    model, tokenizer = hf.load_model_dir(model_dir)
    hf.load_adapters(model, adapters)
    return model, tokenizer


# -- load_model_dir --------------------------------------------------------------------------------------
def test_load_model_dir_picks_the_head(causal_lm_dir, classifier_dir):
    model, tokenizer = hf.load_model_dir(causal_lm_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token is not None
    assert not model.training and model.dtype == torch.float32
    model, _ = hf.load_model_dir(classifier_dir)
    assert type(model).__name__ == "BertForSequenceClassification"
    model, _ = hf.load_model_dir(classifier_dir, task="classification", num_labels=3, dtype="bf16")
    assert model.config.num_labels == 3 and model.dtype == torch.bfloat16
    assert hf.normalize_task("SEQ_CLS") == "classification" and hf.normalize_task("auto") is None
    with pytest.raises(lorakit.ConfigError, match="unknown task"):
        hf.load_model_dir(causal_lm_dir, task="translation")


def test_load_model_dir_errors(tmp_path, no_tokenizer_dir):
    with pytest.raises(hf.ModelDirError, match="does not exist"):
        hf.load_model_dir(tmp_path / "nope")
    with pytest.raises(hf.ModelDirError, match="no config.json"):
        hf.load_model_dir(tmp_path)
    with pytest.raises(hf.ModelDirError, match=r"no tokenizer files \(tokenizer.json / tokenizer_config.json\)"):
        hf.load_model_dir(no_tokenizer_dir)
    model, tokenizer = hf.load_model_dir(no_tokenizer_dir, with_tokenizer=False)
    assert tokenizer is None and model is not None


# -- generate --------------------------------------------------------------------------------------------
def test_generate_greedy_is_deterministic_and_streamed(capsys, causal_lm_dir):
    code, out1, _ = run_cli(capsys, "generate", "--model", causal_lm_dir, "--prompt", PROMPT, "--max-new-tokens", 12)
    code2, out2, _ = run_cli(capsys, "generate", "--model", causal_lm_dir, "--prompt", PROMPT, "--max-new-tokens", 12)
    assert code == code2 == 0
    assert out1 == out2 and out1.strip() and out1.endswith("\n")

    class Recorder(io.StringIO):
        writes = 0

        def write(self, text):
            Recorder.writes += 1
            return super().write(text)

    model, tokenizer = hf.load_model_dir(causal_lm_dir)
    stream = Recorder()
    text = generation.generate(model, tokenizer, PROMPT, max_new_tokens=12, stream=stream)
    assert stream.getvalue() == text and out1 == text + "\n"
    assert Recorder.writes > 1  # written piece by piece while generating, not once at the end
    # the same as transformers' own greedy decoding
    ids = tokenizer(PROMPT, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = ref[0, ids["input_ids"].shape[1]:]
    assert text.split() == tokenizer.decode(new, skip_special_tokens=True).split()


def test_generate_with_adapters_differs(capsys, causal_lm_dir, adapter_dir, second_adapter_dir):
    args = ["generate", "--model", causal_lm_dir, "--prompt", PROMPT, "--max-new-tokens", 12]
    _, base, _ = run_cli(capsys, *args)
    code, one, _ = run_cli(capsys, *args, "--adapter", adapter_dir)
    assert code == 0 and one.strip() and one != base
    code, both, _ = run_cli(capsys, *args, "--adapter", adapter_dir, "--adapter", second_adapter_dir)
    assert code == 0
    model, tokenizer = base_plus_adapters(causal_lm_dir, adapter_dir, second_adapter_dir)
    assert lorakit.active_adapters(model) == ["a0", "a1"]
    assert both == generation.generate(model, tokenizer, PROMPT, max_new_tokens=12) + "\n"


def test_generate_prompts_jsonl_chat_and_sampling(capsys, causal_lm_dir, tmp_path):
    prompts = ["one two three", "red green blue", "hello world"]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts) + "\n")
    code, out, _ = run_cli(capsys, "generate", "--model", causal_lm_dir, "--prompts", file, "--max-new-tokens", 6)
    assert code == 0
    singles = [run_cli(capsys, "generate", "--model", causal_lm_dir, "--prompt", p, "--max-new-tokens", 6)[1]
               for p in prompts]
    assert out == "".join(singles) and out.count("\n") == 3

    sample = ["generate", "--model", causal_lm_dir, "--prompt", PROMPT, "--max-new-tokens", 10,
              "--temperature", "1.5", "--top-p", "0.9", "--seed", "7"]
    code, s1, _ = run_cli(capsys, *sample)
    assert code == 0 and s1 == run_cli(capsys, *sample)[1]

    code, chat, _ = run_cli(capsys, "generate", "--model", causal_lm_dir, "--prompt", PROMPT, "--chat",
                            "--max-new-tokens", 5)
    assert code == 0 and chat.strip()
    model, tokenizer = hf.load_model_dir(causal_lm_dir)
    ids = generation.build_prompt(tokenizer, PROMPT, chat=True)["input_ids"][0].tolist()
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one"}\n{"text": "two"}\n')
    code, _, err = run_cli(capsys, "generate", "--model", causal_lm_dir, "--prompts", bad)
    assert code == 2 and f"{bad}:2:" in err


# -- merge -----------------------------------------------------------------------------------------------
def test_merge_gives_plain_transformers_model(capsys, causal_lm_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    code, stdout, _ = run_cli(capsys, "merge", "--model", causal_lm_dir, "--adapter", adapter_dir, "--out", out)
    assert code == 0 and str(out) in stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or "base_layer" in k or "adapters" in k for k in keys)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary directory left behind

    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("Lora" in type(m).__name__ for m in merged.modules())
    ref, tokenizer = base_plus_adapters(causal_lm_dir, adapter_dir)
    ids = tokenizer(["one two three four five", "red green blue"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = ref(**ids).logits
        got = merged(**ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(causal_lm_dir).eval()(**ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert (base - expected).abs().max().item() > 1e-2  # the adapter does change the outputs
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded_tok("one two")["input_ids"] == tokenizer("one two")["input_ids"]


def test_merge_bf16_and_out_dir_rules(capsys, causal_lm_dir, adapter_dir, second_adapter_dir, tmp_path):
    out = tmp_path / "merged16"
    code, _, _ = run_cli(capsys, "merge", "--model", causal_lm_dir, "--adapter", adapter_dir, "--out", out,
                         "--dtype", "bf16")
    assert code == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert merged.dtype == torch.bfloat16
    assert transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).dtype == torch.bfloat16

    # a non-empty --out is refused and left as it is; --force replaces it
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, "merge", "--model", causal_lm_dir, "--adapter", adapter_dir, "--out", taken)
    assert code == 2 and "not empty" in err and err.startswith("lorakit: error:") and err.count("\n") == 1
    assert (taken / "keep.txt").read_text() == "precious" and len(list(taken.iterdir())) == 1
    code, _, _ = run_cli(capsys, "merge", "--model", causal_lm_dir, "--adapter", adapter_dir,
                         "--adapter", second_adapter_dir, "--out", taken, "--force")
    assert code == 0 and not (taken / "keep.txt").exists() and (taken / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged16", "taken"]
    # an empty existing directory is fine without --force
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, "merge", "--model", causal_lm_dir, "--adapter", adapter_dir, "--out", empty)[0] == 0


def test_merge_classifier_with_modules_to_save(classifier_dir, tmp_path):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B") or ".copies." in name:
                param.normal_(0.0, 0.3)
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = hf.merge_to_dir(classifier_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ref, tokenizer = base_plus_adapters(classifier_dir, tmp_path / "adapter")
    ids = tokenizer(["one two", "red blue green"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (merged(**ids).logits - ref(**ids).logits).abs().max().item() <= 1e-5


# -- inspect ---------------------------------------------------------------------------------------------
def dense_reference(adapter: Path) -> dict[str, dict]:
    """Per module: scale, ||s B A||_F and the singular values of the dense s B A (torch.linalg.svd)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    ref = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith(".lora_A.weight"):
                path = key[len("base_model.model."):-len(".lora_A.weight")]
                a = f.get_tensor(key).double()
                b = f.get_tensor(key.replace("lora_A", "lora_B")).double()
                alpha = next((v for k, v in config["alpha_pattern"].items() if path.endswith(k)), config["lora_alpha"])
                r = a.shape[0]
                s = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
                delta = s * b @ a
                ref[path] = {"s": s, "fro": torch.linalg.norm(delta).item(),
                             "sv": torch.linalg.svd(delta).S[:r], "shape": tuple(delta.shape)}
    return ref


def test_inspect_table_and_json(capsys, adapter_dir, second_adapter_dir):
    ref = dense_reference(adapter_dir)
    assert len(ref) == 8  # 4 module kinds x 2 layers
    code, table, _ = run_cli(capsys, "inspect", adapter_dir)
    assert code == 0
    for path, want in ref.items():
        row = next(line for line in table.splitlines() if line.startswith(path + " "))
        assert f"{want['shape'][0]}x{want['shape'][1]}" in row
        assert f"{want['fro']:.4g}" in row.split()
    assert "trainable params" in table and "adapted matrices only" in table

    code, text, _ = run_cli(capsys, "inspect", adapter_dir, "--json")
    assert code == 0
    report = json.loads(text)
    rows = {m["module"]: m for m in report["modules"]}
    assert set(rows) == set(ref)
    for path, want in ref.items():
        got = rows[path]
        assert got["scaling"] == pytest.approx(want["s"])
        assert got["delta_fro_norm"] == pytest.approx(want["fro"], rel=1e-10)
        assert torch.allclose(torch.tensor(got["singular_values"], dtype=torch.float64), want["sv"], rtol=1e-9)
        assert got["numerical_rank"] == 4 and 1.0 <= got["effective_rank"] <= 4.0
        sv2 = want["sv"] ** 2
        assert got["energy_top1"] == pytest.approx((sv2[0] / sv2.sum()).item())
        assert got["energy_top_half"] == pytest.approx((sv2[:2].sum() / sv2.sum()).item())
        assert got["ratio_to_weight"] is None
    assert rows["model.layers.0.mlp.down_proj"]["scaling"] == pytest.approx(0.5)  # alpha_pattern: 2 / 4
    totals = report["totals"]
    n_params = sum(t.numel() for t in lorakit.io.files.read_weights(adapter_dir).values())
    assert totals["adapter_params"] == n_params
    assert totals["adapter_bytes_on_disk"] == sum(p.stat().st_size for p in adapter_dir.iterdir())
    assert totals["full_ft_bytes"] == 4 * sum(m["d"] * m["k"] for m in report["modules"])

    rs = {m["module"]: m for m in json.loads(run_cli(capsys, "inspect", second_adapter_dir, "--json")[1])["modules"]}
    for path, want in dense_reference(second_adapter_dir).items():  # rsLoRA scaling
        assert rs[path]["scaling"] == pytest.approx(4 / math.sqrt(2))
        assert rs[path]["delta_fro_norm"] == pytest.approx(want["fro"], rel=1e-10)


def test_inspect_with_model(capsys, causal_lm_dir, adapter_dir):
    code, text, _ = run_cli(capsys, "inspect", adapter_dir, "--model", causal_lm_dir, "--json")
    assert code == 0
    report = json.loads(text)
    base = transformers.AutoModelForCausalLM.from_pretrained(causal_lm_dir)
    ref = dense_reference(adapter_dir)
    for row in report["modules"]:
        w0 = base.get_submodule(row["module"]).weight.double()
        assert row["ratio_to_weight"] == pytest.approx(ref[row["module"]]["fro"] / torch.linalg.norm(w0).item())
    assert report["totals"]["full_ft_bytes"] == 4 * sum(p.numel() for p in base.parameters())
    code, table, _ = run_cli(capsys, "inspect", adapter_dir, "--model", causal_lm_dir)
    assert code == 0 and "/||W0||_F" in table and "model parameters" in table


def test_lowrank_svd_matches_dense():
    gen = torch.Generator().manual_seed(0)
    for d, k, r, kernel in [(7, 5, 3, ()), (3, 9, 6, ()), (10, 4, 8, ()), (6, 4, 2, (3, 3))]:
        b = torch.randn(d, r, *(1,) * len(kernel), generator=gen)
        a = torch.randn(r, k, *kernel, generator=gen)
        sv = analysis.lowrank_singular_values(b, a, 0.7)
        dense = 0.7 * b.flatten(1).double() @ a.flatten(1).double()
        ref = torch.linalg.svdvals(dense)
        assert torch.allclose(sv, ref[: sv.numel()], rtol=1e-9, atol=1e-12)
        assert analysis.lowrank_frobenius_norm(b, a, 0.7) == pytest.approx(torch.linalg.norm(dense).item())
    flat = torch.tensor([2.0, 2.0, 2.0, 2.0])
    assert analysis.entropy_effective_rank(flat) == pytest.approx(4.0)
    assert analysis.entropy_effective_rank(torch.tensor([3.0, 0.0])) == pytest.approx(1.0)
    assert analysis.numerical_rank(torch.tensor([1.0, 1e-2, 1e-4])) == 2
    assert analysis.energy_share(torch.tensor([3.0, 4.0]), 1) == pytest.approx(16 / 25)
    zero = analysis.lowrank_singular_values(torch.zeros(5, 2), torch.randn(2, 4, generator=gen))
    assert analysis.numerical_rank(zero) == 0 and analysis.energy_share(zero, 1) is None


# -- bad input: exit 2, one line, no traceback -----------------------------------------------------------
@pytest.mark.parametrize("case", ["missing-model", "no-tokenizer", "missing-adapter", "inspect-missing",
                                  "merge-missing-adapter", "classifier-generate", "bad-temperature"])
def test_bad_inputs(capsys, case, tmp_path, causal_lm_dir, classifier_dir, no_tokenizer_dir, adapter_dir):
    argv = {
        "missing-model": ["generate", "--model", tmp_path / "nope", "--prompt", "hi"],
        "no-tokenizer": ["generate", "--model", no_tokenizer_dir, "--prompt", "hi"],
        "missing-adapter": ["generate", "--model", causal_lm_dir, "--adapter", tmp_path / "nada", "--prompt", "hi"],
        "inspect-missing": ["inspect", tmp_path / "nada"],
        "merge-missing-adapter": ["merge", "--model", causal_lm_dir, "--adapter", tmp_path / "nada",
                                  "--out", tmp_path / "out"],
        "classifier-generate": ["generate", "--model", classifier_dir, "--prompt", "hi"],
        "bad-temperature": ["generate", "--model", causal_lm_dir, "--prompt", "hi", "--temperature", "-1"],
    }[case]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1 and "Traceback" not in err
    if case == "no-tokenizer":
        assert "has no tokenizer files (tokenizer.json / tokenizer_config.json)" in err
    if case == "merge-missing-adapter":
        assert not (tmp_path / "out").exists()


def test_bad_input_through_the_entry_point(tmp_path):
    """The real process: exit status 2 and a single stderr line."""
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit.cli.main", "inspect", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("lorakit: error: adapter directory") and proc.stderr.count("\n") == 1
