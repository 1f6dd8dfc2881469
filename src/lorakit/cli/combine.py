"""`lorakit combine`: adapter directories with weights in, one combined adapter directory (PEFT's format) out."""

from __future__ import annotations

import argparse
import math

from ..errors import ConfigError
from ..names import check_adapter_name
from ..ops.combine import METHODS
from . import values
from .model_args import add_model_arguments, quantize_arg


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "combine", help="combine weighted adapters into one adapter (linear, svd, ties, dare, magnitude_prune)",
        description="Combine adapters trained on the same base model into one PEFT-format adapter. "
                    "Example: lorakit combine --model base/ --adapter math=runs/a/adapter:0.7 "
                    "--adapter code=runs/b/adapter:0.3 --out combined/",
    )
    add_model_arguments(parser)
    parser.add_argument("--adapter", required=True, action="append", metavar="[NAME=]DIR[:WEIGHT]",
                        help="an input adapter directory, optionally labelled and weighted (a negative weight "
                             "subtracts); repeat for each adapter")
    parser.add_argument("--weights", default=None, metavar="W1,W2,...",
                        help="one weight per --adapter, comma-separated, instead of DIR:WEIGHT "
                             "(write --weights=-0.5,1 when the first is negative)")
    parser.add_argument("--method", choices=METHODS, default="linear",
                        help="linear: the exact weighted sum (rank = sum of ranks); svd: truncated to --rank; "
                             "ties / dare_linear / dare_ties / magnitude_prune: merged deltas, truncated to --rank "
                             "(default: linear)")
    parser.add_argument("--rank", type=values.positive_int, default=None, metavar="N",
                        help="rank of the result for the SVD-based methods (default: the largest input rank)")
    parser.add_argument("--density", type=values.finite_float, default=None, metavar="D",
                        help="share of each delta kept, in (0, 1]: ties, dare_*, magnitude_prune")
    parser.add_argument("--seed", type=values.seed, default=0, help="seed of DARE's random drop (default: 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output adapter directory (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=run)


def parse_adapter_spec(spec: str) -> tuple[str | None, str, float | None]:
    """`[NAME=]DIR[:WEIGHT]` -> (name or None, directory, weight or None).

    The weight is what follows the last ':' when it parses as a finite number; a NAME has no '/'.
    """
    given, name = spec, None
    head, sep, tail = spec.partition("=")
    if sep and head and "/" not in head and "\\" not in head:
        name, spec = check_adapter_name(head, f"--adapter {given!r}: the label"), tail
    weight = None
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            weight = None
        if weight is not None:
            if not math.isfinite(weight):
                raise ConfigError(f"--adapter {given!r}: the weight {tail!r} is not a finite number")
            spec = path
    if not spec:
        raise ConfigError(f"--adapter {given!r}: no directory given; expected [NAME=]DIR[:WEIGHT]")
    return name, spec, weight


def resolve_inputs(specs: list[str], weights: str | None) -> list[tuple[str, str, float]]:
    """(label, directory, weight) per --adapter, the weights inline or from --weights (never both).

    Raises:
        ConfigError: a missing weight, weights given both ways, a --weights list of the wrong length.
    """
    parsed = [parse_adapter_spec(spec) for spec in specs]
    inline = [w is not None for _, _, w in parsed]
    if weights is not None:
        if any(inline):
            raise ConfigError("give the weights either as --adapter DIR:WEIGHT or with --weights, not both")
        try:
            values = [float(v) for v in weights.split(",")]
        except ValueError as err:
            raise ConfigError(f"--weights {weights!r}: expected comma-separated numbers ({err})") from err
        if len(values) != len(parsed):
            raise ConfigError(f"--weights has {len(values)} value(s) for {len(parsed)} --adapter(s); "
                              "give one weight per adapter")
    elif not all(inline):
        missing = next(spec for spec, has in zip(specs, inline) if not has)
        raise ConfigError(f"--adapter {missing!r} has no weight: write DIR:WEIGHT, or give --weights W1,W2,...")
    else:
        values = [w for _, _, w in parsed]
    return [(name or directory, directory, value) for (name, directory, _), value in zip(parsed, values)]


def run(args: argparse.Namespace) -> int:
    from ..combine import combine_dirs

    inputs = resolve_inputs(args.adapter, args.weights)
    report = combine_dirs(args.model, inputs, args.out, method=args.method, rank=args.rank,
                          density=args.density, seed=args.seed, force=args.force,
                          dtype=args.dtype, quantize=quantize_arg(args))
    ranks = [r for r in report["rank"].values() if r is not None]
    mix = " ".join(f"{w:+g}*{label}" for label, w in report["weights"].items())
    print(f"combined {mix} with method {report['method']}: {len(ranks)} module(s), "
          f"rank {min(ranks)}-{max(ranks)}, energy kept {report['energy_kept_total']:.4f}")
    print(f"adapter written to {report['out']}")
    return 0
