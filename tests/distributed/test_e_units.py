"""Pieces of `lorakit train` on several processes, tested in one process: the per-rank data order, the launcher's
variables, the device of each process, errors carried from rank 0, --fsdp / --ddp-timeout values, DDP over the
trainable parameters only with no_sync accumulation (on a one-process gloo group), `python -m lorakit`."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist
from e_runs import free_port

import lorakit
from conftest import VOCAB, tiny_bert, tiny_llama
from lorakit.distributed import env as E
from lorakit.distributed.sampler import micro_batches_per_epoch, shard_positions
from lorakit.errors import ConfigError
from lorakit.train.checkpoint import ResumeError
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Batches, Trainer


def test_ranks_take_disjoint_shares_of_the_one_process_batch() -> None:
    examples = list(range(12))
    single = Batches(examples, 4, seed=7, collate=list)
    ranks = [Batches(examples, 2, seed=7, collate=list, rank=r, world_size=2) for r in range(2)]
    assert single.per_epoch == ranks[0].per_epoch == 3
    for m in range(2 * single.per_epoch):  # two epochs: a new order each
        shares = [b(m) for b in ranks]
        assert not set(shares[0]) & set(shares[1])
        assert shares[0] + shares[1] == single(m)


def test_the_last_micro_batch_wraps_on_several_processes_and_stays_short_on_one() -> None:
    assert micro_batches_per_epoch(10, 2, 2) == 3
    assert shard_positions(2, 2, 10, rank=0, world_size=2) == [8, 9]
    assert shard_positions(2, 2, 10, rank=1, world_size=2) == [0, 1]  # every rank gets a full batch
    assert shard_positions(2, 4, 10) == [8, 9]  # one process: as before


def test_launch_env_reads_torchrun_variables_and_names_bad_ones() -> None:
    assert E.launch_env({}) == E.LaunchEnv(0, 1, 0)
    assert E.launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == E.LaunchEnv(3, 4, 1)
    with pytest.raises(ConfigError, match="WORLD_SIZE: expected an integer, found 'two'"):
        E.launch_env({"WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="RANK=2, WORLD_SIZE=2"):
        E.launch_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_each_process_gets_its_local_device() -> None:
    assert E.process_device("cpu", 1, 2) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert E.process_device("auto", 1, 2) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"cuda:LOCAL_RANK \(here cuda:0\)"):
        E.process_device("cuda:1", 0, 2)
    assert E.backend_for(torch.device("cpu")) == "gloo" and E.backend_for(torch.device("cuda", 0)) == "nccl"


def test_one_process_dist_changes_nothing() -> None:
    single = E.Dist.single()
    assert single.is_main and not single.active
    assert single.sum([1.5, 2.0]) == [1.5, 2.0]
    assert single.on_main(lambda: 5) == 5
    with pytest.raises(RuntimeError, match="connection"), single.failures("x"):
        raise RuntimeError("connection reset")  # one process: not dressed up as a distributed failure


@pytest.mark.parametrize("err", [ResumeError("bad checkpoint"), ConfigError("bad flag"),
                                 FileNotFoundError(2, "No such file or directory", "x.jsonl")])
def test_rank_0_errors_are_raised_alike_on_the_other_ranks(err: Exception) -> None:
    sent, _ = E._portable((type(err), err), None)
    again = E._rebuild(*sent)
    assert type(again) is type(err) or (isinstance(err, OSError) and isinstance(again, OSError))
    assert str(again) == str(err)


@pytest.mark.parametrize(("settings", "named"), [
    ({"method": "full"}, "method full"), ({"quantize": "nf4"}, "quantize 'nf4'"), ({"init": "pissa"}, "init 'pissa'"),
    ({"init": "olora"}, "init 'olora'"), ({"mixed_precision": "fp16"}, "mixed_precision fp16"),
])
def test_fsdp_refuses_what_it_cannot_shard_by_name(settings: dict, named: str) -> None:
    TrainConfig(fsdp=True)  # LoRA on a sharded base: accepted
    with pytest.raises(ConfigError, match=f"fsdp: --fsdp cannot train with {re.escape(named)}.*drop --fsdp"):
        TrainConfig(fsdp=True, **settings)
    TrainConfig(**settings)  # fine without --fsdp


def test_ddp_timeout_must_be_positive_and_cli_refusals_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="ddp_timeout must be > 0; got 0"):
        TrainConfig(ddp_timeout=0)
    from lorakit.cli.main import main

    assert main(["train", "--model", "m", "--data", "d.jsonl", "--fsdp", "--method", "full"]) == 2
    assert "--fsdp cannot train with method full" in capsys.readouterr().err


def test_python_dash_m_lorakit_runs_the_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--ddp-timeout" in proc.stdout and "--fsdp" in proc.stdout


@pytest.fixture
def one_rank_group():
    """A gloo process group of one process, destroyed afterwards."""
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def lm_run() -> tuple[torch.nn.Module, list[dict], str]:
    model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=0.0))
    ids = torch.randint(0, VOCAB, (8, 6)).tolist()
    return model, [{"input_ids": row, "labels": row, "attention_mask": [1] * 6} for row in ids], "causal-lm"


def classifier_run() -> tuple[torch.nn.Module, list[dict], str]:
    """BERT with LoRA and its classification head trained in full (modules_to_save): every trainable parameter
    is used in each forward, so DDP needs no find_unused_parameters."""
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=0.0, modules_to_save=["classifier"])
    model = lorakit.attach(tiny_bert(), config)
    ids = torch.randint(0, VOCAB, (8, 6)).tolist()
    return model, [{"input_ids": row, "label": i % 3} for i, row in enumerate(ids)], "classification"


@pytest.mark.parametrize("make_run", [lm_run, classifier_run])
def test_trainer_all_reduces_the_trainable_gradients_once_per_step(one_rank_group, tmp_path, make_run,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer's DDP: only trainable parameters in the reducer (bytes per step == their bytes, frozen weights get
    no gradient) and no all-reduce on the first of 2 accumulated micro-batches (one synchronised backward per step)."""
    from lorakit.distributed.comm import install_byte_counter, trainable_bytes

    monkeypatch.setattr(E.Dist, "active", property(lambda self: True))  # the DDP path on a one-process group
    torch.manual_seed(0)
    model, examples, task = make_run()
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, progress=False, diagnostics_steps=0, device="cpu")
    dist = E.Dist(E.LaunchEnv(0, 1, 0), torch.device("cpu"), 10.0)
    trainer = Trainer(model, cfg, examples, task=task, dist=dist)
    assert isinstance(trainer.train_model, torch.nn.parallel.DistributedDataParallel)
    counter = install_byte_counter(trainer.train_model)
    trainer.fit()  # an unused trainable parameter would fail the second step (DDP's unfinished reduction)
    assert counter.steps == 3  # 6 backward passes, 3 all-reduces
    assert counter.bytes_per_step == trainable_bytes(model) < sum(p.numel() * 4 for p in model.parameters()) / 5
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
