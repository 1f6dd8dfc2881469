"""`lorakit merge`: base model + adapter -> a plain transformers model directory (no lorakit needed to load it)."""

from __future__ import annotations

import argparse

from .model_args import add_model_arguments, quantize_arg


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge", help="merge an adapter into its base model and save a plain transformers model",
    )
    add_model_arguments(parser, dtype_help="dtype of the merged model (the merge itself runs in fp32; with "
                        "--quantize nf4 the adapter is merged into the NF4-dequantised base it was trained on)")
    parser.add_argument("--adapter", required=True, action="append", metavar="DIR",
                        help="adapter directory; repeat to merge the sum of several")
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hf import merge_to_dir

    out = merge_to_dir(args.model, args.adapter, args.out, dtype=args.dtype, force=args.force,
                       quantize=quantize_arg(args))
    print(f"merged model written to {out}")
    return 0
