"""No path that reads a file runs pickle code (issue 15, section 2): a malicious pickle (its __reduce__ creates
a marker file) in an adapter's .bin, a model directory's pytorch_model.bin or a checkpoint's optimizer.pt is
refused with a clean error, by the Python API and by every CLI command, and the marker never appears."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import tiny_llama
from lorakit.analysis import adapter_report
from lorakit.cli.main import main
from lorakit.errors import AdapterFileError, LorakitError
from lorakit.layers import LoraLayer
from lorakit.train.checkpoint import restore


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears iff pickle code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def write_evil(path: Path, marker: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """A torch.save file holding real tensors and the payload."""
    torch.save({**(tensors or {}), "payload": Payload(marker)}, str(path))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture
def evil_adapter(tmp_path: Path, marker: Path) -> Path:
    """An adapter directory whose weights are a legacy adapter_model.bin with the payload."""
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    path = lorakit.save_adapter(model, tmp_path / "evil")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    write_evil(path / "adapter_model.bin", marker, tensors)
    return path


def test_the_payload_runs_when_unpickled_unsafely(evil_adapter: Path, marker: Path) -> None:
    torch.load(evil_adapter / "adapter_model.bin", weights_only=False)  # what the tests below must never do
    assert marker.exists()


def test_load_adapter_refuses_a_pickle(evil_adapter: Path, marker: Path) -> None:
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match="adapter_model.bin.*weights_only"):
        lorakit.load_adapter(model, evil_adapter)
    assert not marker.exists()
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_swap_adapter_refuses_a_pickle(evil_adapter: Path, marker: Path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="live")
    lorakit.prepare_swap(model, max_rank=4)
    with pytest.raises(AdapterFileError, match="adapter_model.bin"):
        lorakit.swap_adapter(model, "live", evil_adapter)
    assert not marker.exists()


def test_analysis_and_vllm_check_refuse_a_pickle(evil_adapter: Path, marker: Path) -> None:
    for read in (lorakit.check_vllm, adapter_report):
        with pytest.raises(LorakitError):
            read(evil_adapter)
    assert not marker.exists()


def test_load_model_refuses_a_pickled_model_directory(tmp_path: Path, marker: Path, causal_lm_dir: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(causal_lm_dir, model_dir)
    weights = {k: v.contiguous() for k, v in lorakit.load_model(causal_lm_dir, device="cpu").state_dict().items()}
    for file in model_dir.glob("*.safetensors*"):
        file.unlink()
    write_evil(model_dir / "pytorch_model.bin", marker, weights)
    for quantize in (None, "nf4"):
        with pytest.raises(LorakitError, match="(?i)weights.only|pickle"):
            lorakit.load_model(model_dir, device="cpu", quantize=quantize)
    assert not marker.exists()


def test_a_checkpoint_optimizer_state_is_not_unpickled(tmp_path: Path, marker: Path) -> None:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    checkpoint = tmp_path / "checkpoint-1"
    lorakit.save_adapter(model, checkpoint / "adapter", vllm_check=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    write_evil(checkpoint / "optimizer.pt", marker)
    with pytest.raises(LorakitError, match="optimizer.pt"):
        restore(checkpoint, model, "lora", optimizer, scheduler)
    assert not marker.exists()


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_every_cli_command_refuses_a_pickle(evil_adapter: Path, marker: Path, causal_lm_dir: Path,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commands = {
        "inspect": ["inspect", evil_adapter],
        "inspect --check vllm": ["inspect", evil_adapter, "--check", "vllm"],
        "generate": ["generate", "--model", causal_lm_dir, "--adapter", evil_adapter, "--prompt", "a",
                     "--max-new-tokens", 1, "--device", "cpu"],
        "merge": ["merge", "--model", causal_lm_dir, "--adapter", evil_adapter, "--out", tmp_path / "merged"],
        "combine": ["combine", "--model", causal_lm_dir, "--adapter", f"a={evil_adapter}:0.5",
                    "--adapter", f"b={evil_adapter}:0.5", "--out", tmp_path / "combined"],
    }
    for label, argv in commands.items():
        code, err = _cli(argv, capsys)
        assert code in (1, 2), label
        assert "Traceback" not in err and "adapter_model.bin" in err, (label, err)
        assert not marker.exists(), label
    assert not (tmp_path / "merged").exists() and not (tmp_path / "combined").exists()


def test_train_resume_refuses_a_pickled_optimizer_state(causal_lm_dir: Path, tmp_path: Path, marker: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{a} plus {a} is {2 * a}"}) + "\n" for a in range(8)))
    run = ["train", "--model", causal_lm_dir, "--data", data, "--out", tmp_path / "run", "--save-steps", 1,
           "--per-device-train-batch-size", 4, "--progress", "false"]
    code, err = _cli([*run, "--max-steps", 2], capsys)
    assert code == 0, err
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    write_evil(checkpoint / "optimizer.pt", marker)
    code, err = _cli([*run, "--max-steps", 3, "--resume", checkpoint], capsys)
    assert code in (1, 2) and "optimizer.pt" in err and "Traceback" not in err, err
    assert not marker.exists()


def test_a_yaml_run_config_cannot_construct_objects(tmp_path: Path, marker: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"r: 4\nlora_alpha: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    code, err = _cli(["train", "--config", config, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "Traceback" not in err and str(config) in err, err
    assert not marker.exists()
