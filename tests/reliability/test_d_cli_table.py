"""Every `lorakit` command over a table of a user's mistakes: each ends in exactly one error line naming the flag or
value, exit status 2 (bad input) or 1 (a failure while running), no traceback, and nothing written to --out."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import lorakit
from lorakit.cli.main import build_parser, main

HUGE = str(2**64)


def _bigvocab_dir(path: Path) -> Path:
    """A tiny Llama whose tokenizer has 20 more tokens than config.json's vocab_size (ids without an embedding)."""
    from model_dirs import build_tokenizer

    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer) - 20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def paths(causal_lm_dir, tmp_path_factory) -> dict[str, str]:
    """The files the table's rows point at: a model, an adapter, data, and the wrong kinds of each."""
    root = tmp_path_factory.mktemp("cli_table")
    model = transformers.AutoModelForCausalLM.from_pretrained(causal_lm_dir)
    lorakit.attach(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], dropout=0.0))
    lorakit.save_adapter(model, root / "adapter")
    records = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {a + b}"} for a in range(3) for b in range(3)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (root / "a_file").write_text("not a directory\n")
    (root / "list.yaml").write_text("- max_steps\n- 3\n")
    (root / "empty.yaml").write_text("# nothing here\n")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01")
    (root / "dir.jsonl").mkdir()
    (root / "locked.jsonl").write_text('{"prompt": "hi"}\n')
    (root / "locked.jsonl").chmod(0)
    return {"model": str(causal_lm_dir), "adapter": str(root / "adapter"), "data": str(root / "data.jsonl"),
            "file": str(root / "a_file"), "missing": str(root / "missing"), "bigvocab": str(_bigvocab_dir(root / "big")),
            "listyaml": str(root / "list.yaml"), "emptyyaml": str(root / "empty.yaml"),
            "binary": str(root / "binary.jsonl"), "dirjsonl": str(root / "dir.jsonl"),
            "locked": str(root / "locked.jsonl")}


TRAIN = "train --model {model} --data {data} --max-steps 1 --progress false --out {out}"
GENERATE = "generate --model {model} --prompt 'one two'"
# (id, command line, exit status, a text the error line must hold: the flag, the value or the path)
ROWS = [
    # train
    ("train-device-cuda", TRAIN + " --device cuda", 2, "'cuda'"),
    ("train-device-tpu", TRAIN + " --device tpu", 2, "'tpu'"),
    ("train-device-cuda7", TRAIN + " --device cuda:7", 2, "'cuda:7'"),
    ("train-device-meta", TRAIN + " --device meta", 2, "'meta'"),
    ("train-demo-device-missing", "train --quick --device cuda:99 --out {out}", 2, "'cuda:99'"),
    ("train-demo-flag-it-would-ignore", "train --quick --lr 0.1 --out {out}", 2, "--learning-rate"),
    ("train-seed-negative", TRAIN + " --seed -1", 2, "seed"),
    ("train-seed-2**64", TRAIN + f" --seed {HUGE}", 2, "seed"),
    ("train-seed-text", TRAIN + " --seed abc", 2, "--seed"),
    ("train-tokenizer-beyond-vocab", "train --model {bigvocab} --data {data} --max-steps 1 --out {out}", 2,
     "vocab_size"),
    ("train-out-is-a-file", "train --model {model} --data {data} --max-steps 1 --out {file}", 2, "--out"),
    ("train-out-under-a-file", "train --model {model} --data {data} --max-steps 1 --out {file}/run", 1, "a_file"),
    ("train-epochs-inf", "train --model {model} --data {data} --epochs inf --out {out}", 2, "epochs"),
    ("train-epochs-nan", "train --model {model} --data {data} --epochs nan --out {out}", 2, "epochs"),
    ("train-epochs-negative", "train --model {model} --data {data} --epochs -1 --out {out}", 2, "epochs"),
    ("train-max-steps-0", TRAIN + " --max-steps 0", 2, "max_steps"),
    ("train-max-steps-negative", TRAIN + " --max-steps -5", 2, "max_steps"),
    ("train-lr-inf", TRAIN + " --learning-rate inf", 2, "learning_rate"),
    ("train-weight-decay-nan", TRAIN + " --weight-decay nan", 2, "weight_decay"),
    ("train-grad-norm-inf", TRAIN + " --max-grad-norm inf", 2, "max_grad_norm"),
    ("train-dtype-bad", TRAIN + " --dtype fp8", 2, "fp8"),
    ("train-quantize-bad", TRAIN + " --quantize int3", 2, "int3"),
    ("train-model-missing", "train --model {missing} --data {data} --out {out}", 2, "missing"),
    ("train-model-is-a-file", "train --model {file} --data {data} --out {out}", 2, "a_file"),
    ("train-data-missing", "train --model {model} --data {missing}.jsonl --out {out}", 2, "missing.jsonl"),
    ("train-data-is-a-directory", "train --model {model} --data {dirjsonl} --out {out}", 2, "dir.jsonl"),
    ("train-data-not-utf8", "train --model {model} --data {binary} --out {out}", 2, "binary.jsonl"),
    ("train-data-unreadable", "train --model {model} --data {locked} --out {out}", 2, "locked.jsonl"),
    ("train-config-a-list", "train --config {listyaml}", 2, "list.yaml"),
    ("train-config-empty", TRAIN + " --config {emptyyaml}", 2, "empty.yaml"),
    ("train-config-missing", "train --config {missing}.yaml", 2, "missing.yaml"),
    ("train-config-is-a-directory", "train --config {dirjsonl}", 2, "dir.jsonl"),
    ("train-resume-is-a-file", TRAIN + " --resume {file}", 2, "a_file"),
    ("train-diverges-at-the-last-step", TRAIN + " --learning-rate 1e308", 2, "non-finite"),
    ("train-rank-beyond-memory", TRAIN + " --r 100000000000", 1, "out of memory"),
    # quickstart
    ("quickstart-out-is-a-file", "quickstart --out {file} --steps 1", 2, "a_file"),
    ("quickstart-out-under-a-file", "quickstart --out {file}/run --steps 1", 1, "a_file"),
    ("quickstart-steps-0", "quickstart --out {out} --steps 0", 2, "--steps"),
    ("quickstart-steps-negative", "quickstart --out {out} --steps -3", 2, "--steps"),
    ("quickstart-seed-negative", "quickstart --out {out} --seed -1", 2, "--seed"),
    ("quickstart-seed-2**64", f"quickstart --out {{out}} --seed {HUGE}", 2, "--seed"),
    # generate
    ("generate-device-cuda", GENERATE + " --device cuda", 2, "'cuda'"),
    ("generate-device-tpu", GENERATE + " --device tpu", 2, "'tpu'"),
    ("generate-device-cuda7", GENERATE + " --device cuda:7", 2, "'cuda:7'"),
    ("generate-seed-negative", GENERATE + " --seed -1", 2, "--seed"),
    ("generate-seed-2**64", GENERATE + f" --seed {HUGE}", 2, "--seed"),
    ("generate-temperature-nan", GENERATE + " --temperature nan", 2, "--temperature"),
    ("generate-temperature-inf", GENERATE + " --temperature inf", 2, "--temperature"),
    ("generate-temperature-negative", GENERATE + " --temperature -1", 2, "temperature"),
    ("generate-top-p-0", GENERATE + " --top-p 0", 2, "top_p"),
    ("generate-top-p-above-1", GENERATE + " --top-p 1.5", 2, "top_p"),
    ("generate-top-p-nan", GENERATE + " --top-p nan", 2, "--top-p"),
    ("generate-max-new-tokens-0", GENERATE + " --max-new-tokens 0", 2, "--max-new-tokens"),
    ("generate-max-new-tokens-huge", GENERATE + " --max-new-tokens 10000000000000", 2, "max_new_tokens"),
    ("generate-tokenizer-beyond-vocab", "generate --model {bigvocab} --prompt one", 2, "vocab_size"),
    ("generate-model-missing", "generate --model {missing} --prompt one", 2, "missing"),
    ("generate-model-is-a-file", "generate --model {file} --prompt one", 2, "a_file"),
    ("generate-adapter-missing", GENERATE + " --adapter {missing}", 2, "missing"),
    ("generate-adapter-is-a-file", GENERATE + " --adapter {file}", 2, "a_file"),
    ("generate-adapter-is-a-model", GENERATE + " --adapter {model}", 2, "adapter_config.json"),
    ("generate-prompts-missing", "generate --model {model} --prompts {missing}.jsonl", 2, "missing.jsonl"),
    ("generate-prompts-is-a-directory", "generate --model {model} --prompts {dirjsonl}", 2, "directory"),
    ("generate-prompts-not-utf8", "generate --model {model} --prompts {binary}", 2, "binary.jsonl"),
    ("generate-prompts-unreadable", "generate --model {model} --prompts {locked}", 1, "locked.jsonl"),
    ("generate-dtype-bad", GENERATE + " --dtype fp8", 2, "--dtype"),
    ("generate-quantize-bad", GENERATE + " --quantize int3", 2, "--quantize"),
    # merge
    ("merge-out-is-a-file", "merge --model {model} --adapter {adapter} --out {file}", 2, "a_file"),
    ("merge-out-under-a-file", "merge --model {model} --adapter {adapter} --out {file}/merged", 1, "a_file"),
    ("merge-model-missing", "merge --model {missing} --adapter {adapter} --out {out}", 2, "missing"),
    ("merge-adapter-missing", "merge --model {model} --adapter {missing} --out {out}", 2, "missing"),
    ("merge-adapter-is-a-file", "merge --model {model} --adapter {file} --out {out}", 2, "a_file"),
    ("merge-dtype-bad", "merge --model {model} --adapter {adapter} --out {out} --dtype fp8", 2, "--dtype"),
    # combine
    ("combine-out-is-a-file", "combine --model {model} --adapter {adapter}:1 --out {file}", 2, "a_file"),
    ("combine-out-under-a-file", "combine --model {model} --adapter {adapter}:1 --out {file}/c", 1, "a_file"),
    ("combine-adapter-missing", "combine --model {model} --adapter {missing}:1 --out {out}", 2, "missing"),
    ("combine-rank-0", "combine --model {model} --adapter {adapter}:1 --method svd --rank 0 --out {out}", 2,
     "--rank"),
    ("combine-density-nan", "combine --model {model} --adapter {adapter}:1 --method ties --density nan --out {out}",
     2, "--density"),
    ("combine-seed-negative", "combine --model {model} --adapter {adapter}:1 --seed -1 --out {out}", 2, "--seed"),
    ("combine-seed-2**64", f"combine --model {{model}} --adapter {{adapter}}:1 --seed {HUGE} --out {{out}}", 2,
     "--seed"),
    ("combine-weight-nan", "combine --model {model} --adapter {adapter} --weights nan --out {out}", 2, "nan"),
    # inspect
    ("inspect-adapter-missing", "inspect {missing}", 2, "missing"),
    ("inspect-adapter-is-a-file", "inspect {file}", 2, "a_file"),
    ("inspect-adapter-is-a-model", "inspect {model}", 2, "adapter_config.json"),
    ("inspect-model-missing", "inspect {adapter} --model {missing}", 2, "missing"),
    ("inspect-rank-tol-nan", "inspect {adapter} --rank-tol nan", 2, "--rank-tol"),
    ("inspect-rank-tol-negative", "inspect {adapter} --rank-tol -1", 2, "--rank-tol"),
    ("inspect-vllm-adapter-missing", "inspect {missing} --check vllm", 2, "missing"),
    ("inspect-max-lora-rank-0", "inspect {adapter} --check vllm --max-lora-rank 0", 2, "--max-lora-rank"),
    # report
    ("report-dir-missing", "report {missing} --out {out}", 2, "missing"),
    ("report-dir-is-a-file", "report {file} --out {out}", 2, "a_file"),
    ("report-dir-is-a-model", "report {model} --out {out}", 2, "neither an adapter directory"),
    ("report-model-missing", "report {adapter} --model {missing} --out {out}", 2, "missing"),
    # plan (reads config.json only)
    ("plan-model-missing", "plan --model {missing}", 2, "missing"),
    ("plan-r-0", "plan --model {model} --r 0", 2, "--r"),
    ("plan-targets-match-nothing", "plan --model {model} --target-modules nothing_here", 2, "--target-modules"),
    # serve (each refused before the server starts; --port 0: no fixed port is taken)
    ("serve-model-missing", "serve --model {missing} --port 0", 2, "missing"),
    ("serve-adapter-not-name-dir", "serve --model {model} --port 0 --adapter {adapter}", 2, "--adapter"),
    ("serve-adapter-missing", "serve --model {model} --port 0 --adapter a={missing}", 2, "missing"),
    ("serve-port-out-of-range", "serve --model {model} --port 70000", 2, "--port"),
    ("serve-max-loras-0", "serve --model {model} --port 0 --max-loras 0", 2, "--max-loras"),
    ("serve-describe-no-adapter", "serve --model {model} --port 0 --describe b=text", 2, "--describe"),
    # experiment (each refused before a run starts)
    ("experiment-unknown-name", "experiment nosuch --out {out}", 2, "nosuch"),
    ("experiment-no-out", "experiment rank-sweep", 2, "--out"),
    ("experiment-out-is-a-file", "experiment rank-sweep --out {file}", 2, "--out"),
    ("experiment-data-without-model", "experiment rank-sweep --data {data} --out {out}", 2, "--model"),
    ("experiment-model-missing", "experiment rank-sweep --model {missing} --data {data} --out {out}", 2, "missing"),
    ("experiment-data-missing", "experiment rank-sweep --model {model} --data {missing} --out {out}", 2, "missing"),
    ("experiment-seeds-0", "experiment rank-sweep --seeds 0 --out {out}", 2, "--seeds"),
]
FAILS_WHILE_RUNNING = {"train-diverges-at-the-last-step", "train-rank-beyond-memory"}  # --out is in use by then
COMMANDS = ("train", "quickstart", "generate", "merge", "combine", "inspect", "report", "plan", "serve", "experiment")


def test_the_table_knows_every_command_of_the_cli():
    from lorakit.cli.main import COMMANDS as CLI_COMMANDS

    assert set(CLI_COMMANDS) == set(COMMANDS)  # a new command gets its rows in the table


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) in this process: (exit status, standard error); argparse's SystemExit counts as a status."""
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


def _run_without_dac_override(argv: list[str]) -> tuple[int, str]:
    """The CLI in a subprocess of root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (util-linux's setpriv), so
    file modes apply to it as to any user: a chmod 000 file is unreadable."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root needs util-linux's setpriv to test an unreadable file")
    env = {**os.environ, "PYTHONPATH": str(Path(lorakit.__file__).parents[1])}
    done = subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                           "lorakit.cli.main", *argv], capture_output=True, text=True, env=env, timeout=120)
    return done.returncode, done.stderr


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def test_the_table_covers_every_command():
    assert {row[1].split()[0] for row in ROWS} == set(COMMANDS)


@pytest.mark.parametrize("row, argv, status, needle", ROWS, ids=[row[0] for row in ROWS])
def test_a_users_mistake_is_one_error_line_with_its_exit_status(row, argv, status, needle, paths, tmp_path, capsys):
    out = tmp_path / "out"
    if "{locked}" in argv and os.geteuid() == 0:  # root reads a chmod 000 file: run it without that capability
        code, err = _run_without_dac_override(shlex.split(argv.format(out=out, **paths)))
    else:
        code, err = _run(shlex.split(argv.format(out=out, **paths)), capsys)
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert code == status, err
    if row not in FAILS_WHILE_RUNNING:
        assert not out.exists()  # refused before anything was written


def test_a_bug_is_not_hidden_as_a_user_error(paths, monkeypatch, capsys):
    """Only a user's mistakes become one-line errors: any other exception still propagates with its traceback."""
    from lorakit import generation

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in lorakit")

    monkeypatch.setattr(generation, "generate_all", broken)
    with pytest.raises(ZeroDivisionError, match="a bug in lorakit"):
        main(["generate", "--model", paths["model"], "--prompt", "one"])


def test_help_documents_the_exit_statuses(capsys):
    code, _ = _run(["--help"], capsys)
    assert code == 0
    main_help = build_parser().format_help()
    for status in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {status}" in main_help


SUBPROCESS_ROWS = [  # the real entry point: the exit status the shell sees (2: bad input, 1: a failing path)
    ("generate --model {model} --prompt one --temperature nan", 2),
    ("train --model {model} --data {data} --max-steps 1 --out {file}/run", 1),
]


def test_the_exit_status_reaches_the_shell(paths, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(lorakit.__file__).parents[1])}
    procs = [(subprocess.Popen([sys.executable, "-m", "lorakit.cli.main",
                                *shlex.split(argv.format(out=tmp_path / f"out{i}", **paths))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), status)
             for i, (argv, status) in enumerate(SUBPROCESS_ROWS)]
    for proc, status in procs:
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err
        assert len(_error_lines(err)) == 1, err
        assert proc.returncode == status, err
