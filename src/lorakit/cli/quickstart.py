"""`lorakit quickstart`: LoRA on a small Llama built from a config: train, save, reload, merge, check."""

from __future__ import annotations

import argparse

from . import values


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "quickstart", help="attach LoRA to a small Llama, train, save (PEFT format), reload, merge, check",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="runs/quickstart", help="output directory")
    parser.add_argument("--steps", type=values.positive_int, default=300, help="training steps")
    parser.add_argument("--seed", type=values.seed, default=0, help="random seed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..quickstart import run as run_quickstart

    return 0 if run_quickstart(out_dir=args.out, steps=args.steps, seed=args.seed)["ok"] else 1
