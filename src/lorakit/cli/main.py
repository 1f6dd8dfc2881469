"""`lorakit <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

from ..errors import LorakitError


def _quickstart(args: argparse.Namespace) -> int:
    from ..quickstart import run

    return 0 if run(out_dir=args.out, steps=args.steps, seed=args.seed)["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-rank adaptation for PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)
    quick = commands.add_parser(
        "quickstart", help="attach LoRA to a small Llama, train, save (PEFT format), reload, merge, check",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    quick.add_argument("--out", default="runs/quickstart", help="output directory")
    quick.add_argument("--steps", type=int, default=300, help="training steps")
    quick.add_argument("--seed", type=int, default=0, help="random seed")
    quick.set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LorakitError as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
