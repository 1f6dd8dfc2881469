"""The training loop of `lorakit train`: AdamW (LoRA+ groups with --loraplus-ratio), warm-up + decay, gradient
accumulation and clipping, autocast and fp16 loss scaling (precision.py), gradient checkpointing, evaluation,
diagnostics, checkpoints and exact resume.

The data order is a function of (seed, epoch) and the position is the global step, so a resumed run draws
the same batches, the same dropout masks (RNG states are restored) and reproduces the loss curve.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import model as M
from ..config import LoraConfig
from ..errors import LorakitError
from ..io import save_adapter
from ..optim import loraplus_optimizer
from . import checkpoint as ckpt
from . import diagnostics as diag
from . import precision
from .config import TrainConfig
from .precision import TrainingError, autocast_context
from .progress import Progress
from .schedule import lr_factor

HEAD_NAMES = ("classifier", "score")  # new classification heads: trained in full (modules_to_save), as PEFT does


@dataclass
class TrainResult:
    """What a run produced."""

    out_dir: Path
    saved_dir: Path  # the adapter (lora) or the model (full)
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of every optimizer step
    eval: dict[str, float] = field(default_factory=dict)  # final evaluation
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    task: str = "causal-lm"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        use_dora=cfg.method == "dora", lora_fa=cfg.method == "lora_fa",
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM", base_model_name_or_path=_base_name(cfg.model),
    )
    M.attach(model, lora)


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
    attached, or after it for QPiSSA). The output head and a classification head (trained in full) stay."""
    from ..quant import quantize
    from ..targeting import output_head_names

    skip = tuple(output_head_names(model)) + tuple(h for h in HEAD_NAMES if task == "classification")
    quantize(model, cfg.quantize, compute_dtype=quantize_compute_dtype(cfg, device), skip=skip)
    check_quantized(model, cfg)


def check_quantized(model: nn.Module, cfg: TrainConfig) -> None:
    """Refuse a --quantize that found nothing to quantise (GPT-2's Conv1D layers are not quantised)."""
    from ..errors import ConfigError
    from ..quant import NF4Linear

    if not any(isinstance(m, NF4Linear) for m in model.modules()):
        raise ConfigError(f"quantize={cfg.quantize!r}: {type(model).__name__} has no nn.Linear layer to quantise "
                          f"besides its heads (GPT-2's Conv1D layers are not quantised); drop --quantize")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: one learning rate, or LoRA+ groups when loraplus_ratio is set."""
    if cfg.loraplus_ratio is not None:
        return loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.learning_rate, ratio=cfg.loraplus_ratio,
                                  weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


class Batches:
    """Micro-batch `m` of the run: epoch m // per_epoch, drawn from a permutation seeded by (seed, epoch)."""

    def __init__(self, examples: list[Any], batch_size: int, seed: int, collate: Any) -> None:
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._order: tuple[int, torch.Tensor] | None = None

    def __call__(self, m: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(m, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.examples), generator=gen))
        index = self._order[1][j * self.batch_size:(j + 1) * self.batch_size]
        return self.collate([self.examples[i] for i in index.tolist()])


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Any], collate: Any, cfg: TrainConfig, task: str,
             device: torch.device) -> dict[str, float]:
    """LM: token-weighted loss and perplexity. Classification: loss and accuracy."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    total_loss = weight = correct = 0.0
    with autocast_context(cfg.mixed_precision, device):
        for start in range(0, len(examples), cfg.per_device_eval_batch_size):
            batch = _to(collate(examples[start:start + cfg.per_device_eval_batch_size]), device)
            output = model(**batch)
            if task == "classification":
                n = batch["labels"].numel()
                correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
            else:
                n = (batch["labels"][:, 1:] != -100).sum().item()  # tokens that carry loss
            total_loss += output.loss.float().item() * n
            weight += n
    model.train(was_training)
    loss = total_loss / max(weight, 1)
    if task == "classification":
        return {"eval_loss": loss, "eval_accuracy": correct / max(weight, 1)}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None,
          train_records: list[dict] | None = None, eval_records: list[dict] | None = None) -> TrainResult:
    """Run one training job as `cfg` describes; model/tokenizer/records may be given instead of paths.

    Raises:
        LorakitError subclasses: bad data (file and line named), a model directory that cannot be loaded,
        a --resume directory from another run, a NaN/inf loss or a collapsed fp16 loss scale (TrainingError;
        the last good checkpoint is kept and named).
    """
    from . import data as D

    torch.manual_seed(cfg.seed)
    import random

    random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.yaml").write_text(cfg.to_yaml())

    if tokenizer is None or model is None:
        if cfg.model is None:
            raise LorakitError("no --model given (a model directory in Hugging Face format, or a model ID)")
        from ..hf import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    datasets = D.load_datasets(cfg, tokenizer, records=train_records, eval_records=eval_records)
    task = datasets.task
    residual_init = cfg.init in ("pissa", "olora") or cfg.init.startswith("pissa_niter_")
    # QLoRA from a checkpoint: quantised while it is read (no full-precision copy); QPiSSA needs the exact W0 first
    streamed = bool(cfg.quantize) and model is None and not residual_init
    if model is None:
        from ..loading import load_model

        model = load_model(cfg.model, dtype=cfg.dtype, device=device, task=task,
                           num_labels=datasets.num_labels or None, quantize=cfg.quantize if streamed else None,
                           compute_dtype=quantize_compute_dtype(cfg, device) if streamed else None)
    if task == "classification":
        model.config.label2id = dict(datasets.label2id)
        model.config.id2label = datasets.id2label
    model.to(device)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if streamed:
        check_quantized(model, cfg)
    elif cfg.quantize and not residual_init:
        quantize_base(model, cfg, task, device)
    attach_for_training(model, cfg, task)
    if cfg.quantize and residual_init:  # QPiSSA: factor the full-precision W0, then quantise only the residual
        quantize_base(model, cfg, task, device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainable, total = M.trainable_parameters(model)
    for warning in datasets.warnings():
        print(f"lorakit: warning: {warning}")

    collate = datasets.collate
    batches = Batches(datasets.train, cfg.per_device_train_batch_size, cfg.seed, collate)
    steps_per_epoch = math.ceil(batches.per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg)
    schedule = lr_factor(cfg.lr_scheduler_type, warmup, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = precision.make_scaler(cfg.mixed_precision, model, device)  # fp16: loss scaling; else pass-through
    saves = "full" if cfg.method == "full" else "lora"  # checkpoints hold the whole model or the adapter

    start_step, losses = 0, []
    config_dict = cfg.to_dict()
    if cfg.resume:
        state = ckpt.read_state(Path(cfg.resume), config_dict)
        ckpt.restore(Path(cfg.resume), model, saves, optimizer, scheduler, scaler)
        start_step, losses = state["global_step"], list(state.get("losses", []))

    w0_norms = diag.weight_norms(model) if saves == "lora" and cfg.diagnostics_steps else {}
    progress = Progress(out_dir / "metrics.jsonl", total_steps, start_step, bar=cfg.progress)
    progress.message(f"lorakit train: {task}, {len(datasets.train)} examples, {total_steps} steps, "
                     f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.3f}%), "
                     f"device {device}, base {_dtype_name(model)}, mixed precision {cfg.mixed_precision}"
                     + (", loss scaling on" if scaler.is_enabled() else ""))
    model.train()
    started = time.perf_counter()
    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
    last_checkpoint: Path | None = Path(cfg.resume) if cfg.resume else None
    skipped = 0  # optimizer steps skipped in a row by the loss scaler (inf / nan gradients)
    try:
        for step in range(start_step + 1, total_steps + 1):
            step_loss = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                batch = _to(batches((step - 1) * cfg.gradient_accumulation_steps + micro), device)
                with autocast_context(cfg.mixed_precision, device):
                    loss = model(**batch).loss / cfg.gradient_accumulation_steps
                if not torch.isfinite(loss):
                    where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
                    raise TrainingError(f"the loss became {loss.item()} at step {step}: training stopped{where}")
                scaler.scale(loss).backward()
                step_loss += loss.item()
                window_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            scaler.unscale_(optimizer)  # true gradients for clipping and diagnostics (no-op without scaling)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if cfg.diagnostics_steps and w0_norms and step % cfg.diagnostics_steps == 0:
                layers = diag.layer_diagnostics(model, w0_norms)
                progress.log({"step": step, "diagnostics": diag.summarise(layers), "layers": layers})
                for warning in diag.check(layers):
                    progress.message(f"lorakit: warning: step {step}: {warning}")
            if precision.optimizer_step(scaler, optimizer):
                scheduler.step()  # as transformers' Trainer: a skipped step does not advance the schedule
                skipped = 0
            else:
                skipped += 1
                if precision.scale_collapsed(scaler.get_scale()):
                    message = precision.collapse_message(step, scaler.get_scale(), skipped, last_checkpoint)
                    raise TrainingError(message)
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            window_loss.append(step_loss)
            if step % max(cfg.logging_steps, 1) == 0 or step == total_steps:
                seconds = time.perf_counter() - window_start
                mean = sum(window_loss) / len(window_loss)
                lr = cfg.learning_rate * schedule(scheduler.last_epoch)  # the base rate (LoRA+: A's)
                tps = window_tokens / seconds if seconds > 0 else 0.0
                scaling = {"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}
                progress.log({"step": step, "loss": mean, "lr": lr, "tokens_per_s": tps,
                              "epoch": step / steps_per_epoch, **scaling})
                progress.step(step, mean, lr, tps, force_line=True)
                window_loss, window_tokens, window_start = [], 0, time.perf_counter()
            else:
                progress.step(step, step_loss, cfg.learning_rate * schedule(scheduler.last_epoch), 0.0,
                              force_line=False)
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps and datasets.eval:
                metrics = evaluate(model, datasets.eval, collate, cfg, task, device)
                progress.log({"step": step, **metrics})
                progress.message(f"eval at step {step}: " + _fmt(metrics))
            if cfg.save_steps and step % cfg.save_steps == 0:
                state = {"config": config_dict, "losses": losses}
                last_checkpoint = ckpt.save_checkpoint(out_dir, step, model, saves, optimizer, scheduler,
                                                       state, cfg.save_total_limit, scaler)
        seconds = time.perf_counter() - started
        final = evaluate(model, datasets.eval, collate, cfg, task, device) if datasets.eval else {}
        if final:
            progress.log({"step": total_steps, **final})
            progress.message("final eval: " + _fmt(final))
        saved = _save_final(model, tokenizer, cfg, out_dir)
        progress.message(f"saved {'model' if cfg.method == 'full' else 'adapter'} to {saved}")
    finally:
        progress.close()
    return TrainResult(out_dir=out_dir, saved_dir=saved, steps=total_steps, losses=losses, eval=final,
                       trainable=trainable, total=total, seconds=seconds, task=task)


def _save_final(model: nn.Module, tokenizer: Any, cfg: TrainConfig, out_dir: Path) -> Path:
    if cfg.method != "full":
        # PiSSA / OLoRA changed the base: save as a plain LoRA on the original weights, usable with cfg.model
        convert = M.get_config(model, "default").residual_init
        return save_adapter(model, out_dir / "adapter", convert_to_lora=convert)
    target = out_dir / "model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _dtype_name(model: nn.Module) -> str:
    """The dtype most of the model's floating weights have, by element count ("bf16", "fp32", ...)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return names.get(dtype, str(dtype).removeprefix("torch."))


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
