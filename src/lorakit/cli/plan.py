"""`lorakit plan`: the memory and storage arithmetic of LoRA for a model before training, from its config alone
(lorakit.report.plan): trainable parameters per module type, the base in fp32 / bf16 / NF4, adapter, gradients,
AdamW state, an activation estimate, data-parallel traffic and the storage of M task adapters."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import TargetError
from . import values
from .model_args import add_model_arguments, quantize_arg

DTYPE_LABELS = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan", help="memory and storage of LoRA training for a model, from its config alone (no weights read)",
    )
    add_model_arguments(parser, what="base model (only its config.json is read)",
                        dtype_help="dtype of the base's weights and of the activations")
    parser.add_argument("--r", type=values.positive_int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--target-modules", type=_targets, default=["q_proj", "v_proj"], metavar="NAMES",
                        help="comma-separated module names or dotted suffixes, or all-linear (default: q_proj,v_proj)")
    parser.add_argument("--batch-size", type=values.positive_int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=values.positive_int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--tasks", type=values.positive_int, default=100,
                        help="M task-specific models to store: M adapters against M full copies (default: 100)")
    parser.add_argument("--world-size", type=values.positive_int, default=None, metavar="N",
                        help="data-parallel processes: adds each rank's ring all-reduce traffic")
    parser.add_argument("--json", action="store_true", help="print every figure (bytes) as JSON")
    parser.set_defaults(func=run)


def _targets(text: str) -> list[str] | str:
    """--target-modules: "all-linear", or comma-separated names (each a module name or a dotted suffix)."""
    if text.strip() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in text.split(",")]
    if not names or any(not name for name in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated module names or all-linear, found {text!r}")
    return names


def run(args: argparse.Namespace) -> int:
    import json

    from ..report.plan_model import plan_model

    try:
        plan = plan_model(args.model, r=args.r, target_modules=args.target_modules, dtype=args.dtype,
                          quantize=quantize_arg(args), batch=args.batch_size, seq_len=args.seq_len,
                          tasks=args.tasks, world_size=args.world_size)
    except TargetError as err:
        raise TargetError(f"--target-modules: {err}") from err
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan.to_dict()))
    return 0


def human_bytes(n: float) -> str:
    """Bytes in decimal units (1 GB = 10^9 bytes), three significant figures or so: "13.5 GB"."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:,.0f}x" if b else "-"


def format_plan(p: dict[str, Any]) -> str:
    """The readable table of a Plan's figures (Plan.to_dict())."""
    targets = p["target_modules"] if isinstance(p["target_modules"], str) else ", ".join(p["target_modules"])
    base_kind = "NF4 linears, the rest " + p["dtype"] if p["quantize"] == "nf4" else p["dtype"]
    total = p["total_params"]
    lines = [f"lorakit plan: {p['model']} ({total:,} parameters), r={p['r']} on {targets} "
             f"({p['adapted_modules']} modules)", "", "trainable parameters"]
    lines += [f"  {name:<24}{count:>16,}" for name, count in p["trainable_by_type"].items()]
    lines.append(f"  {'total':<24}{p['trainable']:>16,}   {100 * p['trainable'] / total:.3f}% of the model, "
                 f"{_ratio(total, p['trainable'])} fewer")
    bases = p["base_bytes"]
    lines += ["", f"base weights: fp32 {human_bytes(bases['fp32'])}, bf16 {human_bytes(bases['bf16'])}, "
                  f"NF4 (double quantisation) {human_bytes(bases['nf4'])}",
              "", f"memory of one training step, batch {p['batch']} x {p['seq_len']} tokens, AdamW",
              f"  {'':<52}{'LoRA':>14}{'full fine-tuning':>20}"]
    full = p["full_finetune"]
    rows = [(f"base weights ({base_kind})", p["base"], full["weights"]), ("adapter (fp32)", p["adapter"], None),
            ("gradients", p["gradients"], full["gradients"]), ("AdamW state (2 fp32 moments)", p["adamw"], full["adamw"]),
            ("activations (estimate)", p["activations"], full["activations"]), ("total", p["total"], full["total"])]
    for label, lora, whole in rows:
        lines.append(f"  {label:<52}{human_bytes(lora):>14}{human_bytes(whole) if whole is not None else '-':>20}")
    ddp, store = p["ddp"], p["storage"]
    lines += ["", f"data-parallel gradient all-reduce per step: {human_bytes(ddp['lora'])} (LoRA) vs "
                  f"{human_bytes(ddp['full'])} (full fine-tuning), {_ratio(ddp['full'], ddp['lora'])} less"]
    if "world_size" in ddp:
        lines.append(f"  ring all-reduce over {ddp['world_size']} ranks, sent per rank: "
                     f"{human_bytes(ddp['lora_per_rank'])} vs {human_bytes(ddp['full_per_rank'])}")
    lines += [f"storage of {store['tasks']} task models: one base {human_bytes(store['base'])} + {store['tasks']} "
              f"adapters of {human_bytes(store['adapter'])} = {human_bytes(store['base_plus_adapters'])}, vs "
              f"{store['tasks']} full copies {human_bytes(store['full_copies'])} "
              f"({_ratio(store['full_copies'], store['base_plus_adapters'])} less)",
              "", "(activations: a per-layer estimate of what backward keeps, see lorakit.report.plan; "
                  "1 GB = 10^9 bytes)"]
    return "\n".join(lines)
