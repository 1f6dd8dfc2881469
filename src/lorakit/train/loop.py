"""`lorakit train` as a function: load the model and data a TrainConfig names, attach the adapter (LoRA, DoRA,
LoRA-FA; QLoRA / QPiSSA quantisation), then run a Trainer (trainer.py) with its callbacks.

Seeds are set here, before the adapter's init, so one seed fixes init, data order and dropout.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import model as M
from ..config import LoraConfig
from ..distributed import fsdp
from ..distributed.env import Dist, process_group
from ..distributed.sampler import micro_batches_per_epoch
from ..errors import LorakitError
from ..heap import tune_for_training
from ..io.files import atomic_write
from ..io.lock import directory_lock
from ..loading import options
from ..variants import variant_named
from . import loggers, rundir
from .callbacks import Callback
from .config import TrainConfig, adapter_method
from .precision import TrainingError
from .trainer import Batches, Trainer, TrainResult, build_optimizer, evaluate

HEAD_NAMES = ("classifier", "score")  # new classification heads: trained in full (modules_to_save), as PEFT does


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device (auto: cuda when available); lorakit.loading.options.resolve_device's checks."""
    return options.resolve_device(name)  # ConfigError (no CUDA, cuda:7 on one GPU) before anything is written


def attach_for_training(model: nn.Module, cfg: TrainConfig, task: str) -> None:
    """An adapter (LoRA, DoRA or LoRA-FA) on the configured targets, the classification head trained in full;
    or, for method "full", everything trainable."""
    heads = [h for h in HEAD_NAMES if task == "classification" and hasattr(model, h)]
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return
    lora = LoraConfig(
        r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora, init=cfg.init, modules_to_save=heads or None,
        method=adapter_method(cfg.method), options=cfg.method_options, lora_fa=cfg.method == "lora_fa",
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM", base_model_name_or_path=_base_name(cfg.model),
    )
    M.attach(model, lora)


def with_planned_steps(cfg: TrainConfig, n_train: int, world_size: int) -> TrainConfig:
    """cfg with the run's optimizer steps as the method's `total_step` option when it has one the user did not give
    (AdaLoRA's budget schedule ends there); cfg itself otherwise. Only the adapter sees it: the run's config, its
    checkpoints and its resume checks keep the options as given."""
    if cfg.method == "full":
        return cfg
    variant = variant_named(adapter_method(cfg.method))
    if "total_step" not in variant.options or cfg.method_options.get("total_step") is not None:
        return cfg
    per_epoch = micro_batches_per_epoch(n_train, cfg.per_device_train_batch_size, world_size)
    _, total = rundir.schedule_horizon(cfg, None, math.ceil(per_epoch / cfg.gradient_accumulation_steps))
    return dataclasses.replace(cfg, method_options={**cfg.method_options, "total_step": total})


def _base_name(model: str | None) -> str | None:
    """What adapter_config.json's base_model_name_or_path holds: the directory, or the model ID without its
    @revision (PEFT and AutoPeftModel read the field as a repository ID)."""
    from ..loading import parse_model_id

    if model is None or Path(model).expanduser().exists():
        return model
    model_id = parse_model_id(model)
    return model_id.repo_id if model_id else model


def quantize_compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The NF4 compute dtype: as configured, or auto: bf16 on a GPU that has it (else fp16), fp32 on the CPU."""
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if cfg.quantize_compute_dtype != "auto":
        return named[cfg.quantize_compute_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantize_base(model: nn.Module, cfg: TrainConfig, task: str, device: torch.device) -> None:
    """QLoRA on a model already in memory: store the frozen base's Linear layers in NF4 (before the adapter is
    attached, or after it for QPiSSA and LoftQ). The output head and a classification head (trained in full) stay.
    LoftQ's Q was made with fp32 block scales: quantised so again (no double quantisation), its codes are Q's own."""
    from ..quant import quantize
    from ..targeting import output_head_names

    skip = tuple(output_head_names(model)) + tuple(h for h in HEAD_NAMES if task == "classification")
    quantize(model, cfg.quantize, compute_dtype=quantize_compute_dtype(cfg, device), skip=skip,
             double_quant=cfg.init != "loftq")
    check_quantized(model, cfg)


def check_quantized(model: nn.Module, cfg: TrainConfig) -> None:
    """Refuse a --quantize that found nothing to quantise (GPT-2's Conv1D layers are not quantised)."""
    from ..errors import ConfigError
    from ..quant import NF4Linear

    if not any(isinstance(m, NF4Linear) for m in model.modules()):
        raise ConfigError(f"quantize={cfg.quantize!r}: {type(model).__name__} has no nn.Linear layer to quantise "
                          f"besides its heads (GPT-2's Conv1D layers are not quantised); drop --quantize")


@dataclasses.dataclass(frozen=True)
class Setup:
    """How train() readies a model it was given, for callers that choose its trainable parameters themselves (the
    experiments): `attach` False leaves the model's requires_grad flags as they are (no adapter, nothing unfrozen);
    `configure(model)` runs after the attach and before the optimizer is built; `trainer_cls` replaces Trainer
    (e.g. one whose final save holds the trainable parameters alone)."""

    attach: bool = True
    configure: Callable[[nn.Module], None] | None = None
    trainer_cls: type[Trainer] = Trainer


def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None,
          train_records: list[dict] | None = None, eval_records: list[dict] | None = None,
          callbacks: list[Callback] | None = None, setup: Setup | None = None) -> TrainResult:
    """Run one training job as `cfg` describes; model/tokenizer/records may be given instead of paths, and `setup`
    changes how a given model is readied (Setup).

    Raises:
        LorakitError subclasses: bad data (file and line named), a model directory that cannot be loaded,
        a --resume directory from another run, a NaN/inf loss or a collapsed fp16 loss scale (TrainingError;
        the last good checkpoint is kept and named).
        DirectoryLockedError: another live process is training into (or writing) --out.
        DistributedError: under torchrun, another process of the run failed or did not answer within ddp_timeout.
    """
    loggers.check_available(cfg.report_to)  # before anything is written
    tune_for_training(cfg.device)  # CPU: freed step memory stays in the process (LORAKIT_KEEP_HEAP=0: off)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    # under torchrun: a process group for the run (destroyed at its end, also on an error); else one process
    with process_group(cfg.device, cfg.ddp_timeout) as dist:
        return _train_on(dist, cfg, model, tokenizer, train_records, eval_records, callbacks, setup or Setup())


def _train_on(dist: Dist, cfg: TrainConfig, model: nn.Module | None, tokenizer: Any,
              train_records: list[dict] | None, eval_records: list[dict] | None,
              callbacks: list[Callback] | None, setup: Setup) -> TrainResult:
    """train() in its process group: rank 0 checks and locks --out (every rank fails alike), all load and fit."""
    from . import data as D

    device = dist.device
    # a bare --resume: the newest checkpoint in --out; another run's --out is refused before anything is written
    resume_dir = dist.on_main(lambda: rundir.resolve_resume(cfg), share=True)
    dist.on_main(lambda: rundir.check_out_dir(cfg, resume_dir))

    if tokenizer is None or model is None:
        if cfg.model is None:
            raise LorakitError("no --model given (a model directory in Hugging Face format, or a model ID)")
        from ..hf import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    datasets = D.load_datasets(cfg, tokenizer, records=train_records, eval_records=eval_records)
    # --out is locked (by rank 0) from here to the end of the run (io.lock): a second run into it is refused, by name
    with ExitStack() as lock:
        dist.on_main(lambda: lock.enter_context(directory_lock(cfg.out, purpose="lorakit train")))
        return _train_into_out(cfg, model, tokenizer, datasets, callbacks, resume_dir, device, dist, setup)


def _prepare_out(cfg: TrainConfig, resume_dir: Path | None) -> None:
    out_dir = rundir.prepare_out_dir(cfg, resume_dir)  # only once the data is good: bad data writes nothing
    resolved = cfg.to_yaml()
    atomic_write(out_dir, {"train_config.yaml": lambda path: path.write_text(resolved)})


def _train_into_out(cfg: TrainConfig, model: nn.Module | None, tokenizer: Any, datasets: Any,
                    callbacks: list[Callback] | None, resume_dir: Path | None, device: torch.device,
                    dist: Dist, setup: Setup) -> TrainResult:
    """train() once the data is loaded and --out is locked: prepare --out, load the model, attach, fit."""
    task = datasets.task
    dist.on_main(lambda: _prepare_out(cfg, resume_dir))
    # QPiSSA and LoftQ factor the full-precision W0 at attach, and the base is quantised after it
    residual_init = cfg.init in ("pissa", "olora", "loftq") or cfg.init.startswith("pissa_niter_")
    # QLoRA from a checkpoint: quantised while it is read (no full-precision copy); QPiSSA needs the exact W0 first
    streamed = bool(cfg.quantize) and model is None and not residual_init
    sharding = cfg.fsdp and dist.active  # FSDP2: the base stays on the CPU until each unit is sharded to `device`
    if model is None:
        from ..loading import load_model

        model = load_model(cfg.model, dtype=cfg.dtype, device="cpu" if sharding else device, task=task,
                           num_labels=datasets.num_labels or None, quantize=cfg.quantize if streamed else None,
                           compute_dtype=quantize_compute_dtype(cfg, device) if streamed else None)
    if task == "classification":
        model.config.label2id = dict(datasets.label2id)
        model.config.id2label = datasets.id2label
    if not sharding:
        model.to(device)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if streamed:
        check_quantized(model, cfg)
    elif cfg.quantize and not residual_init:
        quantize_base(model, cfg, task, device)
    if setup.attach:
        attach_for_training(model, with_planned_steps(cfg, len(datasets.train), dist.world_size), task)
    if setup.configure is not None:
        setup.configure(model)
    if cfg.quantize and residual_init:  # QPiSSA / LoftQ: factor the full-precision W0, then quantise the rest
        quantize_base(model, cfg, task, device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainable, total = M.trainable_parameters(model)
    if sharding:
        fsdp.shard_for_training(model, device, dist.world_size)  # before the optimizer: it takes the DTensor shards
    elif cfg.fsdp:
        print("lorakit: note: --fsdp with one process: nothing to shard, training as usual")
    for warning in datasets.warnings():
        print(f"lorakit: warning: {warning}")

    trainer = setup.trainer_cls(model, cfg, datasets.train, datasets.eval, callbacks, collate=datasets.collate,
                                task=task, tokenizer=tokenizer, optimizer=build_optimizer(model, cfg), device=device,
                                dist=dist)
    if cfg.resume:
        trainer.resume(resume_dir)
    trainer.message(f"lorakit train: {task}, {len(datasets.train)} examples, {trainer.total_steps} steps, "
                    f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.3f}%), "
                    f"device {device}, base {_dtype_name(model)}, mixed precision {cfg.mixed_precision}"
                    + (", loss scaling on" if trainer.scaler.is_enabled() else "")
                    + (f", {dist.world_size} processes ({'FSDP' if sharding else 'DDP'}, global batch "
                       f"{_global_batch(cfg, dist)})" if dist.active else "")
                    + (f"; this process holds {_mib(fsdp.local_bytes(model)['frozen'])} of the frozen base"
                       if sharding else ""))
    return trainer.fit()


def _global_batch(cfg: TrainConfig, dist: Dist) -> int:
    return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * dist.world_size


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n:,} bytes)"


def _dtype_name(model: nn.Module) -> str:
    """The dtype most of the model's floating weights have, by element count ("bf16", "fp32", ...)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return names.get(dtype, str(dtype).removeprefix("torch."))


__all__ = ["Batches", "TrainResult", "Trainer", "TrainingError", "build_optimizer", "evaluate", "train"]
