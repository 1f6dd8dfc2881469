"""`lorakit train`: fine-tune a local model directory on a data file, or, with no --model and no --data,
the embedded default (all-MiniLM-L6-v2 on standard-library docstrings, LoRA vs full fine-tuning).

Every option of TrainConfig is a flag (`--max-steps`, `--lora-alpha`, ...); `--config run.yaml` supplies
any of them, and flags given on the command line override the file. The adapter method is `--method lora |
dora | lora_fa | full`, its init `--init kaiming | gaussian | pissa | pissa_niter_<n> | olora`, and
`--loraplus-ratio 16` trains B at 16 times A's learning rate (LoRA+).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from ..config import parse_target_spec
from ..errors import ConfigError
from ..train.config import TrainConfig, field_help, field_types

ALIASES = {"learning_rate": ["--lr"], "per_device_train_batch_size": ["--batch-size"], "r": ["--rank"],
           "epochs": ["--num-train-epochs"]}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_targets(text: str) -> list[str] | str:
    """`q_proj,v_proj` and `mlp.down_proj` -> a list of names / dotted suffixes; all-linear and a string with
    a regex metacharacter (`.*q_proj`) stay strings (see lorakit.config.parse_target_spec)."""
    return parse_target_spec(text)


def _converter(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return _parse_bool
    if annotation in (int, float, str):
        return annotation
    return _parse_targets  # list[str] | str


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="fine-tune with LoRA (no --model/--data: the embedded MiniLM demo)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="RUN.YAML", help="YAML file with any of the options below")
    parser.add_argument("--quick", action="store_true", help="embedded demo only: a small, fast version")
    helps, types_ = field_help(), field_types()
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        flags = [f"--{f.name.replace('_', '-')}"] + ALIASES.get(f.name, [])
        parser.add_argument(
            *flags, dest=f.name, type=_converter(types_[f.name]), default=argparse.SUPPRESS,
            metavar=f.name.upper(), help=f"{helps.get(f.name, '')} (default: {default})",
        )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig.from_sources(args.config, overrides)
    if cfg.model is None and cfg.data is None:
        from ..demo.compare import run_demo

        run_demo(out_dir=cfg.out if "out" in overrides else "runs/demo", seed=cfg.seed, quick=args.quick)
        return 0
    if cfg.model is None or cfg.data is None:
        missing = "--model" if cfg.model is None else "--data"
        raise ConfigError(f"{missing} is required when the other is given (give neither for the embedded demo)")
    from ..train.loop import train

    train(cfg)
    return 0
