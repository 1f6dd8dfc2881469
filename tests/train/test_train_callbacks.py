"""The Trainer and its callbacks: hook order and arguments, a callback that stops the run or adds metrics,
early stopping and load-best, loggers (--report-to), the progress display, and the CLI flags end to end."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_loop import LM_RECORDS, lm_config, write_jsonl

from lorakit.cli.main import main
from lorakit.errors import ConfigError
from lorakit.train import Callback, StepOutput, TrainConfig, Trainer, train
from lorakit.train.progress import Progress


def config(tmp_path, model_dir, **overrides) -> TrainConfig:
    return lm_config(tmp_path, model_dir, **{"max_steps": 6, "diagnostics_steps": 0, "warmup_steps": 1, **overrides})


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_train_begin(self, trainer):
        self.events.append(("begin", trainer.start_step))

    def on_pre_optimizer_step(self, trainer, step, loss):
        self.events.append(("pre", step))

    def on_step_end(self, trainer, out):
        self.events.append(("step", out))

    def on_evaluate(self, trainer, step, metrics):
        self.events.append(("evaluate", step, dict(metrics)))

    def on_save(self, trainer, step, path):
        self.events.append(("save", step, path))

    def on_loop_end(self, trainer, step):
        self.events.append(("loop_end", step))

    def on_train_end(self, trainer, result):
        self.events.append(("end", result))


def test_hooks_are_called_in_order_with_the_step_values(tmp_path, causal_lm_dir):
    recorder = Recorder()
    result = train(config(tmp_path, causal_lm_dir, max_steps=4, eval_steps=2, save_steps=2, eval_fraction=0.2,
                          max_grad_norm=1.0), callbacks=[recorder])
    names = [e[0] if e[0] != "evaluate" else f"evaluate@{e[1]}" for e in recorder.events]
    assert names == ["begin", "pre", "step", "pre", "step", "evaluate@2", "save", "pre", "step", "pre", "step",
                     "save", "loop_end", "evaluate@4", "end"]
    outs = [e[1] for e in recorder.events if e[0] == "step"]
    assert all(isinstance(o, StepOutput) for o in outs)
    assert [o.step for o in outs] == [1, 2, 3, 4]
    assert [o.loss for o in outs] == result.losses
    logged = [r for r in records(tmp_path / "run") if "loss" in r]
    assert [o.lr for o in outs] == [r["lr"] for r in logged]
    assert all(o.tokens > 0 and o.grad_norm is not None and float(o.grad_norm) > 0 for o in outs)
    assert [r["grad_norm"] for r in logged] == pytest.approx([float(o.grad_norm) for o in outs])
    saves = [e for e in recorder.events if e[0] == "save"]
    assert [s[1] for s in saves] == [2, 4] and all(s[2].is_dir() for s in saves)
    assert recorder.events[-1][1] is not None and recorder.events[-1][1].eval == result.eval
    evaluations = [e for e in recorder.events if e[0] == "evaluate"]
    assert evaluations[-1][2] == result.eval


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, out):
        if out.step == self.step:
            trainer.should_stop = True


def test_a_callback_stops_the_run_which_still_evaluates_and_saves(tmp_path, causal_lm_dir):
    result = train(config(tmp_path, causal_lm_dir, max_steps=10, logging_steps=2, eval_fraction=0.2),
                   callbacks=[StopAt(3)])
    assert result.steps == 3 and len(result.losses) == 3 and result.stopped_early
    assert (result.saved_dir / "adapter_model.safetensors").is_file() and result.eval
    logged = [r for r in records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in logged] == [2, 3]  # the stopped step's window is logged
    assert logged[-1]["loss"] == result.losses[2]


class AddMetrics(Callback):
    def on_step_end(self, trainer, out):
        return {"twice_step": 2 * out.step}

    def on_evaluate(self, trainer, step, metrics):
        return {"eval_loss_doubled": 2 * metrics["eval_loss"]}


def test_metrics_a_callback_returns_are_in_metrics_jsonl(tmp_path, causal_lm_dir):
    train(config(tmp_path, causal_lm_dir, max_steps=4, logging_steps=2, eval_steps=2, eval_fraction=0.2),
          callbacks=[AddMetrics()])
    lines = records(tmp_path / "run")
    steps = [r for r in lines if "loss" in r]
    assert [(r["step"], r["twice_step"]) for r in steps] == [(2, 4), (4, 8)]
    evals = [r for r in lines if "eval_loss" in r]
    assert len(evals) == 2 and all(r["eval_loss_doubled"] == 2 * r["eval_loss"] for r in evals)


class FakeEvalLoss(Callback):
    """eval_fake_loss of each evaluation in turn (a metric other callbacks see: user callbacks run first)."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def on_evaluate(self, trainer, step, metrics):
        if not trainer.evaluating_final:
            return {"eval_fake_loss": self.values.pop(0)}
        return None


def test_early_stopping_and_load_best_restore_the_best_checkpoints_adapter(tmp_path, causal_lm_dir):
    from transformers import AutoModelForCausalLM

    import lorakit

    cfg = config(tmp_path, causal_lm_dir, max_steps=20, eval_steps=2, save_steps=2, save_total_limit=20,
                 eval_fraction=0.2, early_stopping_patience=2, metric_for_best_model="eval_fake_loss",
                 load_best_at_end=True)
    result = train(cfg, callbacks=[FakeEvalLoss([1.0, 0.5, 0.7, 0.6, 0.4, 0.3])])
    assert result.stopped_early and result.steps == 8  # best at step 4, no better at 6 and 8 (patience 2)
    checkpoints = tmp_path / "run" / "checkpoints"
    best = load_file(str(checkpoints / "step-0000004" / "adapter" / "adapter_model.safetensors"))
    last = load_file(str(checkpoints / "step-0000008" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(result.saved_dir / "adapter_model.safetensors"))
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert any(not torch.equal(final[k], last[k]) for k in last)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        saved = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(causal_lm_dir), result.saved_dir)
        from_best = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(causal_lm_dir),
                                         checkpoints / "step-0000004" / "adapter")
        assert torch.equal(saved(ids).logits, from_best(ids).logits)
    lines = records(tmp_path / "run")
    assert {"best_step": 4, "best_eval_fake_loss": 0.5}.items() <= lines[-2].items()  # before the final eval


def test_early_stopping_needs_periodic_evaluation_and_eval_data(tmp_path, causal_lm_dir):
    with pytest.raises(ConfigError, match="early_stopping_patience needs evaluation during training: set eval_steps"):
        config(tmp_path, causal_lm_dir, early_stopping_patience=2)
    with pytest.raises(ConfigError, match="load_best_at_end needs evaluation"):
        config(tmp_path, causal_lm_dir, load_best_at_end=True)
    with pytest.raises(ConfigError, match="need validation data"):
        train(config(tmp_path, causal_lm_dir, early_stopping_patience=2, eval_steps=2))


def test_trainer_used_directly_on_a_model_with_an_adapter(tmp_path, causal_lm_dir):
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.hf import load_tokenizer
    from lorakit.train.data import load_datasets

    cfg = config(tmp_path, causal_lm_dir, max_steps=5, eval_fraction=0.2)
    tokenizer = load_tokenizer(str(causal_lm_dir))
    datasets = load_datasets(cfg, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(causal_lm_dir)
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    recorder = Recorder()
    trainer = Trainer(model, cfg, datasets.train, datasets.eval, callbacks=[recorder])
    from lorakit.train.hooks import RunState  # what callbacks are typed against: the Trainer has all of it

    promised = set(RunState.__annotations__) | {n for n in vars(RunState) if not n.startswith("_")}
    assert promised and not [n for n in promised if not hasattr(trainer, n)]
    result = trainer.fit()
    assert result.steps == 5 and len(result.losses) == 5 and "eval_loss" in result.eval
    assert (result.saved_dir / "adapter_config.json").is_file()
    assert result.trainable < result.total and [e[0] for e in recorder.events][-1] == "end"


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_report_to_a_missing_package_is_a_clear_error_before_anything_is_written(tmp_path, causal_lm_dir, capsys,
                                                                                    monkeypatch, name):
    import importlib.util

    find_spec = importlib.util.find_spec  # the package is made to look absent, installed or not
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == name else find_spec(n, *a, **k))
    data = write_jsonl(tmp_path / "train.jsonl", LM_RECORDS)
    out = tmp_path / "out"
    code = main(["train", "--model", str(causal_lm_dir), "--data", str(data), "--out", str(out),
                 "--report-to", f"jsonl,{name}"])
    err = capsys.readouterr().err
    assert code == 2 and f"'{name}' package" in err and "Traceback" not in err
    assert not out.exists()


def test_report_to_tensorboard_writes_event_files(tmp_path, causal_lm_dir):
    result = train(config(tmp_path, causal_lm_dir, max_steps=3, report_to="jsonl,tensorboard"))
    assert list((result.out_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_report_to_wandb_offline_records_the_config_and_the_metrics(tmp_path, causal_lm_dir, monkeypatch):
    """wandb in offline mode (no network): one run under <out>/wandb whose log holds the run's configuration and
    the logged scalars."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(config(tmp_path, causal_lm_dir, max_steps=3, report_to="jsonl,wandb"))
    runs = list((result.out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    log = runs[0].read_bytes()
    assert b"learning_rate" in log and b"tokens_per_s" in log and b"loss" in log


def test_report_to_unknown_logger_names_the_choices(tmp_path, causal_lm_dir):
    with pytest.raises(ConfigError, match="unknown logger 'mlflow'; expected .*jsonl, tensorboard, wandb"):
        config(tmp_path, causal_lm_dir, report_to="jsonl,mlflow")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_measured_tokens_per_second_and_writes_lines_above_it():
    stream = FakeTerminal()
    progress = Progress(bar=True, stream=stream)
    trainer = SimpleNamespace(total_steps=4, start_step=0)
    progress.on_train_begin(trainer)
    for step in (1, 2):
        progress.on_step_end(trainer, StepOutput(step=step, loss=1.5, lr=1e-3, grad_norm=None, tokens=100))
    progress.write("eval at step 2: eval_loss 1.2")
    progress.bar.refresh()
    text = stream.getvalue()
    progress.close()
    assert "eval at step 2: eval_loss 1.2\n" in text
    assert "loss 1.5000" in text and "lr 1.00e-03" in text and " tok/s" in text
    assert " 0 tok/s" not in text and "2/4" in text


def test_plain_progress_prints_one_line_per_logged_step(tmp_path, causal_lm_dir, capsys):
    train(config(tmp_path, causal_lm_dir, max_steps=4, logging_steps=2))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["2/4", "4/4"]
    assert all(" tok/s" in x and " 0 tok/s" not in x for x in lines)


def test_cli_early_stopping_and_report_flags_end_to_end(tmp_path, causal_lm_dir):
    data = write_jsonl(tmp_path / "train.jsonl", LM_RECORDS)
    out = tmp_path / "out"
    code = main(["train", "--model", str(causal_lm_dir), "--data", str(data), "--out", str(out), "--max-steps", "4",
                 "--eval-fraction", "0.2", "--eval-steps", "2", "--early-stopping-patience", "3",
                 "--load-best-at-end", "--metric-for-best-model", "eval_perplexity", "--report-to", "jsonl",
                 "--progress", "false", "--diagnostics-steps", "0"])
    assert code == 0
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert resolved["early_stopping_patience"] == 3 and resolved["load_best_at_end"] is True
    assert resolved["metric_for_best_model"] == "eval_perplexity" and resolved["report_to"] == "jsonl"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in records(out) if "eval_loss" in r] == [2, 4]


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_load_best_keeps_the_best_checkpoint_from_pruning_and_after_a_resume(tmp_path, causal_lm_dir):
    cfg = config(tmp_path, causal_lm_dir, max_steps=8, eval_steps=2, save_steps=2, save_total_limit=2,
                 eval_fraction=0.2, metric_for_best_model="eval_fake_loss", load_best_at_end=True)
    first = train(cfg, callbacks=[FakeEvalLoss([1.0, 0.5, 0.7])])
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000004", "step-0000006", "step-0000008"]
    best = _adapter(checkpoints / "step-0000004" / "adapter")
    assert all(torch.equal(t, best[k]) for k, t in _adapter(first.saved_dir).items())
    resumed_cfg = config(tmp_path, causal_lm_dir, max_steps=8, eval_steps=2, save_steps=2, save_total_limit=2,
                         eval_fraction=0.2, metric_for_best_model="eval_fake_loss", load_best_at_end=True,
                         resume=str(checkpoints / "step-0000006"), out=str(tmp_path / "resumed"))
    resumed = train(resumed_cfg, callbacks=[FakeEvalLoss([0.9])])  # no better than step 4's 0.5
    assert resumed.losses == first.losses
    assert all(torch.equal(t, best[k]) for k, t in _adapter(resumed.saved_dir).items())
