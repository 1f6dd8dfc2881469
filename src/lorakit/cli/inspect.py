"""`lorakit inspect`: per-module statistics of an adapter (norms, spectrum, effective rank) from its files, or with
`--check vllm` whether vLLM's LoRA loader takes the file and computes as trained (lorakit.io.vllm)."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from . import values
from .model_args import add_model_arguments, quantize_arg

CHECKS = ("vllm",)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect", help="per-module norms, singular values and effective ranks of an adapter; --check vllm",
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter directory (PEFT layout)")
    add_model_arguments(parser, required=False,
                        what="base model (adds ||sBA||_F / ||W0||_F and the full fine-tune size)")
    parser.add_argument("--rank-tol", type=_fraction, default=1e-3,
                        help="numerical rank: count singular values above this fraction of the largest (default: 1e-3)")
    parser.add_argument("--check", choices=CHECKS, default=None,
                        help="vllm: will vLLM's LoRA loader take the file, and compute as trained? Prints every "
                             "reason if not; exit status 0 if it will, 1 if not")
    parser.add_argument("--max-lora-rank", type=values.positive_int, default=None, metavar="N",
                        help="with --check vllm: vLLM's --max-lora-rank (default: 16, vLLM's default)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.set_defaults(func=run)


def _fraction(text: str) -> float:
    """--rank-tol: a finite number in [0, 1) (a share of the largest singular value)."""
    value = values.finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), found {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    if args.check == "vllm":
        return _check_vllm(args)
    if args.max_lora_rank is not None:
        raise ConfigError("lorakit inspect: --max-lora-rank applies to --check vllm only")
    import json

    from ..analysis import adapter_report, format_report

    report = adapter_report(args.adapter, model_dir=args.model, rel_tol=args.rank_tol, dtype=args.dtype,
                            quantize=quantize_arg(args))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _check_vllm(args: argparse.Namespace) -> int:
    from ..io import vllm

    max_rank = args.max_lora_rank if args.max_lora_rank is not None else vllm.DEFAULT_MAX_LORA_RANK
    findings = vllm.check_vllm(args.adapter, max_lora_rank=max_rank)
    if args.json:
        print(vllm.findings_json(findings, args.adapter, max_rank))
    else:
        print(vllm.format_findings(findings, args.adapter, max_rank))
    return 1 if findings else 0
