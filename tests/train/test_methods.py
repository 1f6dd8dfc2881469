"""`lorakit train --method lora|dora|lora_fa`, `--init`, `--loraplus-ratio`: end to end on a tiny Llama directory.

Checked: the saved adapter_config.json, that LoRA-FA's A leaves training exactly as attach made it, that
--loraplus-ratio gives B ratio x the learning rate (and resumes exactly), DoRA's magnitude in the file, and
the errors for bad values.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit.cli.main import main
from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer
from lorakit.train import loop
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

RECORDS = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(5) for b in range(5)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return path


def _argv(model_dir, data, out, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", "4",
            "--batch-size", "4", "--learning-rate", "5e-3", "--progress", "false", "--logging-steps", "1",
            "--diagnostics-steps", "2", "--seed", "5", *extra]


@pytest.fixture
def spy(monkeypatch):
    """Record the factors right after attach and the optimizer the loop builds."""
    seen: dict = {}
    attach, build = loop.attach_for_training, loop.build_optimizer

    def attach_spy(model, cfg, task):
        attach(model, cfg, task)
        seen["initial"] = {
            f"{m.path}.{key}": getattr(a, key).detach().clone()
            for m in model.modules() if isinstance(m, LoraLayer) for a in m.adapters.values()
            for key in ("lora_A", "lora_B")
        }

    def build_spy(model, cfg):
        seen["optimizer"] = build(model, cfg)
        return seen["optimizer"]

    monkeypatch.setattr(loop, "attach_for_training", attach_spy)
    monkeypatch.setattr(loop, "build_optimizer", build_spy)
    return seen


def _saved_factors(adapter_dir) -> dict[str, torch.Tensor]:
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").removesuffix(".weight"): v for k, v in tensors.items()}


def test_lora_fa_with_loraplus_keeps_a_and_trains_b_at_ratio_times_lr(tmp_path, causal_lm_dir, data_file, spy):
    out = tmp_path / "run"
    assert main(_argv(causal_lm_dir, data_file, out, "--method", "lora_fa", "--loraplus-ratio", "16")) == 0
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert resolved["method"] == "lora_fa" and resolved["loraplus_ratio"] == 16.0
    saved_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "LORA" and saved_config["use_dora"] is False
    saved = _saved_factors(out / "adapter")
    initial = spy["initial"]
    assert set(saved) == set(initial) and len(saved) > 0
    for key, tensor in saved.items():
        if key.endswith("lora_A"):
            assert torch.equal(tensor, initial[key]), key  # bit for bit what attach drew
        else:
            assert tensor.abs().max() > 0, key  # B started at zero and trained
    groups = {g["name"]: g for g in spy["optimizer"].param_groups}
    assert set(groups) == {"lora_B"}  # A is frozen, so only B's group exists
    assert groups["lora_B"]["initial_lr"] == pytest.approx(16 * 5e-3)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in logged if "lr" in x]
    assert max(lrs) <= 5e-3 + 1e-12  # the logged rate is the base (A's) rate, not B's


def test_init_gaussian_is_saved_and_draws_a_from_n_0_1_over_r(tmp_path, causal_lm_dir, data_file, spy):
    out = tmp_path / "run"
    assert main(_argv(causal_lm_dir, data_file, out, "--init", "gaussian", "--r", "2")) == 0
    saved_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved_config["init_lora_weights"] == "gaussian" and saved_config["r"] == 2
    a_values = torch.cat([t.flatten() for k, t in spy["initial"].items() if k.endswith("lora_A")])
    assert a_values.std().item() == pytest.approx(0.5, rel=0.1)  # N(0, 1/r): std 1/r = 0.5
    assert len(spy["optimizer"].param_groups) == 1  # no --loraplus-ratio: one AdamW group


def test_loraplus_run_resumes_exactly(tmp_path, causal_lm_dir, data_file):
    def cfg(out, **kw):
        return TrainConfig(model=str(causal_lm_dir), data=str(data_file), out=str(out), max_steps=6,
                           per_device_train_batch_size=4, learning_rate=5e-3, progress=False, seed=5,
                           loraplus_ratio=4.0, save_steps=3, lora_dropout=0.1, **kw)

    full = train(cfg(tmp_path / "full"))
    checkpoint = tmp_path / "full" / "checkpoints" / "step-0000003"
    resumed = train(cfg(tmp_path / "resumed", resume=str(checkpoint)))
    assert resumed.losses == full.losses
    with pytest.raises(Exception, match="loraplus_ratio was 4.0 there, 8.0 now"):
        train(TrainConfig(**{**cfg(tmp_path / "other").to_dict(), "loraplus_ratio": 8.0, "resume": str(checkpoint)}))


def test_method_dora_saves_the_magnitude(tmp_path, causal_lm_dir, data_file):
    from lorakit.variants import VARIANTS

    if "dora" not in VARIANTS:
        pytest.skip("the DoRA variant is not registered yet (lorakit.variants.VARIANTS has no 'dora')")
    out = tmp_path / "run"
    assert main(_argv(causal_lm_dir, data_file, out, "--method", "dora", "--target-modules", "q_proj,v_proj")) == 0
    saved_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved_config["use_dora"] is True
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors")).keys()
    assert any(k.endswith("lora_magnitude_vector") for k in keys)
    assert any(k.endswith("lora_A.weight") for k in keys)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_run_saves_an_adapter_for_the_original_model(tmp_path, causal_lm_dir, data_file, init,
                                                                   monkeypatch):
    """--init pissa/olora trains on the residual base; the final adapter is converted (rank 2r, plain LoRA) so that
    it loads onto the untouched model directory and gives the trained model's logits."""
    import transformers

    import lorakit

    seen = {}
    attach = loop.attach_for_training

    def capture(model, cfg, task):
        attach(model, cfg, task)
        seen["model"] = model

    monkeypatch.setattr(loop, "attach_for_training", capture)
    out = tmp_path / "run"
    train(TrainConfig(model=str(causal_lm_dir), data=str(data_file), out=str(out), max_steps=4,
                      per_device_train_batch_size=4, learning_rate=5e-3, progress=False, seed=5,
                      init=init, r=2, target_modules=["q_proj", "v_proj"]))
    saved_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved_config["init_lora_weights"] is True and saved_config["r"] == 4
    trained = seen["model"]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(causal_lm_dir)).eval()
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    lorakit.load_adapter(base, str(out / "adapter"))
    with torch.no_grad():
        after = base(input_ids=ids).logits
    assert (after - before).abs().max().item() > 1e-6  # the adapter trained and changes the output
    with torch.no_grad():
        torch.testing.assert_close(after, trained.eval()(input_ids=ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--method", "lorra"], "method must be one of lora, dora, "),
    (["--method", "lora", "--method-options", "init_r=3"], "method 'lora' has no option 'init_r'"),
    (["--init", "pisa"], "init: LoraConfig.init must be one of"),
    (["--loraplus-ratio", "0"], "loraplus_ratio must be a finite number > 0"),
    (["--method", "full", "--loraplus-ratio", "16"], "loraplus_ratio needs an adapter"),
])
def test_bad_method_flags_exit_2_with_one_line(tmp_path, causal_lm_dir, data_file, capsys, extra, message):
    code = main(_argv(causal_lm_dir, data_file, tmp_path / "o", *extra))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_method_options_are_key_value_pairs_read_as_yaml() -> None:
    assert TrainConfig(method="dora", method_options={}).method_options == {}
    from lorakit.train.config_values import convert_value

    assert convert_value("init_r=12, target_r=4,beta1=0.85,flag=true", dict, "method_options") == {
        "init_r": 12, "target_r": 4, "beta1": 0.85, "flag": True}
    with pytest.raises(ConfigError, match="method_options expects KEY=VALUE,...; got 'init_r'"):
        TrainConfig(method_options="init_r")
