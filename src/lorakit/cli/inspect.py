"""`lorakit inspect`: per-module statistics of an adapter (norms, spectrum, effective rank) from its files."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect", help="per-module norms, singular values and effective ranks of an adapter",
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter directory (PEFT layout)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="base model directory: adds ||sBA||_F / ||W0||_F and the full fine-tune size")
    parser.add_argument("--rank-tol", type=float, default=1e-3,
                        help="numerical rank: count singular values above this fraction of the largest (default: 1e-3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..analysis import adapter_report, format_report

    report = adapter_report(args.adapter, model_dir=args.model, rel_tol=args.rank_tol)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
