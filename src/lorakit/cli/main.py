"""`lorakit <command>`: the command-line entry point. Each command is a module of this package with a
`register(subparsers)` function; a user's mistake ends in a one-line error (exit 2, or 1 for a failure while
running such as an unreadable path), never a traceback; a bug in lorakit still shows its traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import LorakitError

COMMANDS = ("train", "quickstart", "generate", "merge", "combine", "inspect", "report", "plan", "serve",
            "experiment")  # modules of lorakit.cli, in --help order
EPILOG = """exit status:
  0    done
  1    a failure while running: a path that cannot be read or written (permission denied, a directory where a
       file is expected, a full disk), out of memory; also `inspect --check vllm` with findings and a
       quickstart whose checks fail
  2    bad input: an unknown or invalid flag or value, a missing or corrupt model, adapter, data or config
       file, a device that is not there, a training run that diverged
  130  interrupted (Ctrl-C)
each error is one line on standard error: "lorakit: error: ..." naming the flag, value or file"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-rank adaptation for PyTorch models.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(commands)
    return parser


CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"  # torch's CPU allocator raises a RuntimeError


def is_out_of_memory(err: BaseException) -> bool:
    """MemoryError, torch's device out-of-memory error, or torch's CPU allocator refusing an allocation."""
    torch = sys.modules.get("torch")
    device_oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (isinstance(err, MemoryError) or (device_oom is not None and isinstance(err, device_oom))
            or (isinstance(err, RuntimeError) and CPU_OUT_OF_MEMORY in str(err)))


def describe_os_error(err: OSError) -> str:
    """One line for an OSError from a user's path: the reason and the path(s), e.g. "permission denied: a.jsonl"."""
    reason = (err.strerror or str(err) or type(err).__name__).rstrip(".")
    if isinstance(err, FileExistsError) and err.filename is not None and os.path.isfile(err.filename):
        reason = "a file is where a directory was expected"  # mkdir(parents=True) under a file
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{reason[:1].lower()}{reason[1:]}: {' -> '.join(paths)}" if paths else reason


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (see EPILOG). A LorakitError is a user's bad input (2); an OSError
    or running out of memory is a failure while running (1); any other exception is a bug and propagates."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LorakitError as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a path the user gave that cannot be read or written (after LorakitError's OSErrors)
        print(f"lorakit: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise  # a bug: its traceback stays visible
        detail = " ".join(str(err).split())[:200]
        print(f"lorakit: error: out of memory ({detail}): try a smaller --r, --per-device-train-batch-size, "
              f"--max-length or model, or --quantize nf4", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
