"""`lorakit train`: fine-tune a local model directory on a data file, or, with no --model and no --data,
the embedded default (all-MiniLM-L6-v2 on standard-library docstrings, LoRA vs full fine-tuning).

Every option of TrainConfig is a flag (`--max-steps`, `--lora-alpha`, ...); `--config run.yaml` supplies
any of them, and flags given on the command line override the file. The adapter method is `--method lora |
dora | adalora | vera | delta_lora | lora_fa | full` (its own settings: `--method-options KEY=VALUE,...`), its
init `--init kaiming | gaussian | pissa | pissa_niter_<n> | olora | loftq`, and `--loraplus-ratio 16` trains B
at 16 times A's learning rate (LoRA+).

Spellings: `--learning_rate` works as well as `--learning-rate`; a boolean option is a bare flag (`--packing`),
turned off with `--no-packing`, and still takes a value (`--packing false`). "none" clears an optional option.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from ..config import parse_target_spec
from ..errors import ConfigError
from ..peft_fields import as_bool
from ..train import rundir
from ..train.config import TrainConfig, field_help, field_types
from ..train.config_values import convert_value, type_name

ALIASES = {"learning_rate": ["--lr"], "per_device_train_batch_size": ["--batch-size"], "r": ["--rank"],
           "epochs": ["--num-train-epochs"]}


def _parse_bool(text: str) -> bool:
    try:
        return as_bool(text, "value")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from err


def _parse_targets(text: str) -> list[str] | str:
    """`q_proj,v_proj` and `mlp.down_proj` -> a list of names / dotted suffixes; all-linear and a string with
    a regex metacharacter (`.*q_proj`) stay strings (see lorakit.config.parse_target_spec)."""
    return parse_target_spec(text)


def _converter(name: str, annotation: Any) -> Any:
    """The argparse `type` of a field: its own conversion (config_values.convert_value), target_modules parsed as
    the Python API reads it."""
    if name == "target_modules":
        return _parse_targets

    def convert(text: str) -> Any:
        try:
            return convert_value(text, annotation, name)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(f"expected {type_name(annotation)}, got {text!r}") from err

    convert.__name__ = type_name(annotation)  # argparse names it in "invalid <type> value"
    return convert


def _flag_names(name: str) -> tuple[list[str], list[str]]:
    """(shown, hidden) option strings of a field: `--max-steps` and its aliases shown; the underscore
    spellings (`--max_steps`, `--num_train_epochs`) accepted but left out of --help."""
    shown = [f"--{name.replace('_', '-')}"] + ALIASES.get(name, [])
    hidden = [flag.replace("-", "_").replace("__", "--", 1) for flag in shown]
    return shown, [flag for flag in dict.fromkeys(hidden) if flag not in shown]


class _RepeatedPaths(argparse.Action):
    """A repeated --data: the files as a list (a single --data stays a string)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, None)
        if before is not None:
            values = (before if isinstance(before, list) else [before]) + [values]
        setattr(namespace, self.dest, values)


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, annotation: Any, help_text: str) -> None:
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    shown, hidden = _flag_names(f.name)
    common = {"dest": f.name, "default": argparse.SUPPRESS}
    if annotation is bool:
        off = f"--no-{f.name.replace('_', '-')}"
        value = {**common, "nargs": "?", "const": True, "type": _parse_bool}  # bare --packing: const
        parser.add_argument(*shown, **value, metavar="BOOL",
                            help=f"{help_text} (default: {default}; bare {shown[0]}: true, {off}: false)")
        if hidden:
            parser.add_argument(*hidden, **value, help=argparse.SUPPRESS)
        offs = [off] + ([f"--no_{f.name}"] if "_" in f.name else [])  # named in the help text above
        parser.add_argument(*offs, **common, action="store_const", const=False, help=argparse.SUPPRESS)
        return
    kwargs = {**common, "type": _converter(f.name, annotation), "metavar": f.name.upper()}
    if f.name == "resume":  # a bare --resume: the newest checkpoint in --out (train.rundir.resolve_resume)
        kwargs.update(nargs="?", const="latest")
    if f.name in ("data", "eval_data"):  # --data a.jsonl --data b.parquet: several files (also a.jsonl,b.parquet)
        kwargs.update(action=_RepeatedPaths)
    parser.add_argument(*shown, **kwargs, help=f"{help_text} (default: {default})")
    if hidden:
        parser.add_argument(*hidden, **kwargs, help=argparse.SUPPRESS)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="fine-tune with LoRA (no --model/--data: the embedded MiniLM demo)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="RUN.YAML", help="YAML file with any of the options below")
    parser.add_argument("--quick", action="store_true", help="embedded demo only: a small, fast version")
    parser.add_argument("--methods", metavar="M1,M2,...",
                        help="embedded demo only: the methods of the table, in order (default lora,full; e.g. "
                             "lora,dora,adalora,vera,lora_fa,delta_lora,full)")
    helps, types_ = field_help(), field_types()
    for f in dataclasses.fields(TrainConfig):
        _add_field(parser, f, types_[f.name], helps.get(f.name, ""))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    cfg = rundir.train_config(args.config, overrides)  # resuming: the checkpoint's own configuration first
    if cfg.model is None and cfg.data is None:
        return _run_demo(cfg, overrides, args)
    if args.methods is not None:  # a flag of the demo's only: refused, not dropped
        raise ConfigError("--methods is for the embedded demo (no --model and no --data); to train one method on "
                          "your own data give --method")
    if cfg.model is None or cfg.data is None:
        missing = "--model" if cfg.model is None else "--data"
        raise ConfigError(f"{missing} is required when the other is given (give neither for the embedded demo)")
    from ..train.loop import train
    from ..train.memory import PeakMemory, write_memory_json

    memory = PeakMemory().start()  # this process is the CLI's own: resetting its peak-memory mark is ours to do
    train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0's process (each process measures its own)
        write_memory_json(cfg.out, memory.stop(), covers="loading, training, evaluation and saving in this process"
                          + (" (rank 0 of a torchrun run)" if "RANK" in os.environ else ""))
    return 0


DEMO_FLAGS = ("out", "seed", "device")  # what the embedded demo takes besides --quick and --methods; it fixes the rest


def _run_demo(cfg: TrainConfig, overrides: dict[str, object], args: argparse.Namespace) -> int:
    """The embedded demo (no --model, no --data). A training flag it would ignore is refused, not dropped."""
    ignored = sorted(name for name in overrides if name not in DEMO_FLAGS)
    if ignored or args.config:
        given = ", ".join(["--config"] * bool(args.config) + [f"--{n.replace('_', '-')}" for n in ignored])
        raise ConfigError(f"the embedded demo (no --model and no --data) takes only --out, --seed, --device, "
                          f"--methods and --quick; {given} would be ignored: give --model and --data to train your "
                          "own run")
    from ..demo.family import parse_methods
    from ..loading.options import resolve_device

    methods = parse_methods(args.methods)  # an unknown method: refused by name before anything runs

    resolve_device(cfg.device)  # a device that is not there: an error before anything is written
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this process is the CLI's own: MiniLM is local, never fetched
    from ..demo.compare import run_demo

    run_demo(out_dir=cfg.out if "out" in overrides else "runs/demo", seed=cfg.seed, quick=args.quick,
             device=cfg.device, methods=methods)
    return 0
