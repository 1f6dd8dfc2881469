"""End-to-end tests of `lorakit train` on tiny model directories: training, resume, NaN stop, metrics,
diagnostics, classification, YAML + flags, and the errors a user meets."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lorakit.cli.main import main
from lorakit.train.config import TrainConfig
from lorakit.train.loop import TrainingError, train

LM_RECORDS = [
    {"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(6) for b in range(6)
]
CLS_RECORDS = [{"text": t, "label": lab} for t, lab in [
    ("happy good yes", "positive"), ("good good happy", "positive"), ("yes happy", "positive"),
    ("sad bad no", "negative"), ("bad bad sad", "negative"), ("no sad", "negative"),
] * 4]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def lm_config(tmp_path, causal_lm_dir, **overrides) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", LM_RECORDS)
    values = dict(model=str(causal_lm_dir), data=str(data), out=str(tmp_path / "run"), max_steps=12,
                  per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, lora_dropout=0.1,
                  diagnostics_steps=4, progress=False, seed=3, warmup_steps=2)
    values.update(overrides)
    return TrainConfig(**values)


def test_train_causal_lm_loss_falls_and_saves_peft_adapter(tmp_path, causal_lm_dir):
    result = train(lm_config(tmp_path, causal_lm_dir, max_steps=30, eval_fraction=0.2))
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert (result.saved_dir / "adapter_config.json").is_file()
    assert (result.saved_dir / "adapter_model.safetensors").is_file()
    assert "eval_perplexity" in result.eval and result.eval["eval_perplexity"] > 1.0
    resolved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert resolved["max_steps"] == 30 and resolved["r"] == 8
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 31))
    assert all({"lr", "tokens_per_s"} <= set(x) for x in steps)
    diags = [x for x in lines if "diagnostics" in x]
    assert [x["step"] for x in diags] == [4, 8, 12, 16, 20, 24, 28]
    assert diags[-1]["diagnostics"]["update_ratio_median"] > 0.0
    assert all(v["grad_ratio"] is not None for v in diags[-1]["layers"].values())


def test_two_runs_with_the_same_seed_are_identical(tmp_path, causal_lm_dir):
    a = train(lm_config(tmp_path / "a", causal_lm_dir, max_steps=6))
    b = train(lm_config(tmp_path / "b", causal_lm_dir, max_steps=6))
    assert a.losses == b.losses


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, causal_lm_dir):
    full = train(lm_config(tmp_path / "full", causal_lm_dir, max_steps=10, save_steps=4))
    checkpoints = sorted((tmp_path / "full" / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-0000004", "step-0000008"]  # keep the last 2
    resumed = train(lm_config(tmp_path / "full", causal_lm_dir, max_steps=10, save_steps=4,
                              resume=str(checkpoints[0]), out=str(tmp_path / "resumed")))
    assert resumed.losses == full.losses  # bit-identical: same batches, dropout masks, optimizer state


def test_resume_from_another_run_is_refused(tmp_path, causal_lm_dir):
    train(lm_config(tmp_path, causal_lm_dir, max_steps=4, save_steps=4))
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("step-*"))
    with pytest.raises(Exception, match="learning_rate was 0.005 there, 0.001 now"):
        train(lm_config(tmp_path, causal_lm_dir, max_steps=8, learning_rate=1e-3, resume=str(checkpoint)))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, causal_lm_dir, monkeypatch):
    cfg = lm_config(tmp_path, causal_lm_dir, max_steps=8, save_steps=2)
    calls = {"n": 0}
    original = torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*step-0000004"):
        train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "step-0000004" / "adapter" / "adapter_model.safetensors").is_file()


def test_classification_reports_accuracy_and_trains_the_head(tmp_path, classifier_dir):
    data = write_jsonl(tmp_path / "cls.jsonl", CLS_RECORDS)
    cfg = TrainConfig(model=str(classifier_dir), data=str(data), out=str(tmp_path / "run"), max_steps=20,
                      per_device_train_batch_size=8, learning_rate=5e-3, eval_fraction=0.25, progress=False,
                      lora_dropout=0.0)
    result = train(cfg)
    assert result.task == "classification"
    assert 0.0 <= result.eval["eval_accuracy"] <= 1.0
    saved = json.loads((result.saved_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "classifier" in saved["modules_to_save"]


def test_cli_yaml_then_flags_override(tmp_path, causal_lm_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", LM_RECORDS)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"model": str(causal_lm_dir), "data": str(data), "max_steps": 50,
                                        "r": 4, "progress": False, "logging_steps": 1}))
    out = tmp_path / "out"
    assert main(["train", "--config", str(run_yaml), "--max-steps", "3", "--out", str(out)]) == 0
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert resolved["max_steps"] == 3 and resolved["r"] == 4  # the flag beats the file, the file beats defaults
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_cli_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--max-steps", "--epochs", "--save-steps", "--seed", "--resume", "--config", "--lora-alpha"):
        assert flag in text
    assert "(default: 42)" in text


@pytest.mark.parametrize("argv_tail, message", [
    (["--lora-dropout", "1.5"], "lora_dropout must be in [0, 1)"),
    (["--task", "translation"], "task must be one of"),
])
def test_cli_bad_options_exit_2_with_one_line(tmp_path, causal_lm_dir, capsys, argv_tail, message):
    data = write_jsonl(tmp_path / "train.jsonl", LM_RECORDS)
    code = main(["train", "--model", str(causal_lm_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 *argv_tail])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_unknown_yaml_key_is_named(tmp_path, capsys):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("learning_rte: 0.1\n")
    assert main(["train", "--config", str(run_yaml)]) == 2
    assert "unknown option(s) learning_rte" in capsys.readouterr().err


def test_cli_model_dir_without_config_is_a_clear_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", LM_RECORDS)
    (tmp_path / "empty_model").mkdir()
    code = main(["train", "--model", str(tmp_path / "empty_model"), "--data", str(data), "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "empty_model" in err and "Traceback" not in err


def test_trained_adapter_loads_in_peft_and_transformers_with_the_same_outputs(tmp_path, causal_lm_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    import lorakit

    result = train(lm_config(tmp_path, causal_lm_dir, max_steps=8, lora_dropout=0.0))
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(causal_lm_dir), result.saved_dir)
        expected = ours(ids).logits
        base = AutoModelForCausalLM.from_pretrained(causal_lm_dir)
        assert (base(ids).logits - expected).abs().max() > 1e-4  # the adapter changes the outputs
        via_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(causal_lm_dir),
                                                  result.saved_dir)
        assert (via_peft(ids).logits - expected).abs().max() <= 1e-5
        via_transformers = AutoModelForCausalLM.from_pretrained(causal_lm_dir)
        via_transformers.load_adapter(str(result.saved_dir))
        assert (via_transformers(ids).logits - expected).abs().max() <= 1e-5


def test_cli_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-such-option", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_empty_data_file_is_a_clear_error(tmp_path, causal_lm_dir, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    code = main(["train", "--model", str(causal_lm_dir), "--data", str(tmp_path / "empty.jsonl"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "empty.jsonl" in err and "no records" in err


def test_full_fine_tuning_trains_every_weight_and_saves_a_plain_model(tmp_path, classifier_dir):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "cls.jsonl", CLS_RECORDS)
    cfg = TrainConfig(model=str(classifier_dir), data=str(data), out=str(tmp_path / "run"), max_steps=4,
                      method="full", learning_rate=1e-3, eval_fraction=0.25, progress=False)
    result = train(cfg)
    assert result.trainable == result.total
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.saved_dir)
    before = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    changed = [n for (n, a), (_, b) in zip(reloaded.named_parameters(), before.named_parameters())
               if not torch.equal(a, b)]
    assert "bert.embeddings.word_embeddings.weight" in changed and len(changed) > 10
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}
