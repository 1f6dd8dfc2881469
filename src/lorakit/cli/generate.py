"""`lorakit generate`: text from a model (a directory or a model ID) (plus adapters, summed), streamed to stdout as it is produced."""

from __future__ import annotations

import argparse

from . import values
from .model_args import add_model_arguments, quantize_arg


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate", help="generate text with a model and optional adapters (streamed to stdout)",
    )
    add_model_arguments(parser, what="the model")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="adapter directory; repeat to load several (all active, their updates summed)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt")
    source.add_argument("--prompts", metavar="FILE.jsonl", help='JSONL file, one {"prompt": ...} per line')
    parser.add_argument("--max-new-tokens", type=values.positive_int, default=64, help="tokens to generate per prompt (default: 64)")
    parser.add_argument("--temperature", type=values.finite_float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=values.finite_float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this probability mass (default: 1.0)")
    parser.add_argument("--seed", type=values.seed, default=None, help="random seed, set before each prompt (reproducible sampling)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user message in the tokenizer's chat template")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..generation import generate_all, read_prompts

    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    generate_all(
        args.model, prompts, adapter_dirs=args.adapter, device=args.device,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        chat=args.chat, dtype=args.dtype, quantize=quantize_arg(args),
    )
    return 0
