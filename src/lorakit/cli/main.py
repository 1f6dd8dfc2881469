"""`lorakit <command>`: the command-line entry point. Each command is a module of this package with a
`register(subparsers)` function; bad input ends in a one-line error and exit status 2, no traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import LorakitError

COMMANDS = ("train", "quickstart", "generate", "merge", "combine", "inspect")  # modules of lorakit.cli, in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-rank adaptation for PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LorakitError as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
