"""`lorakit experiment NAME`: one of the seeds' experiments (rank-sweep, intrinsic-dim, lora-vs-full,
magnitude-direction, variants; `--list` names them) on the embedded default (MiniLM on the standard library's
docstrings) or on --model DIR|ID with --data FILE. Writes results.json, table.md and page.html into --out, prints
the table; an interrupted experiment run again with the same flags resumes from its finished cells."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .model_args import MODEL_METAVAR
from .values import positive_int


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "experiment", help="the seeds' experiments (rank sweep, intrinsic dimension, LoRA vs full, ...): results.json, "
                           "a page and a table",
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="the experiment (--list shows them)")
    parser.add_argument("--list", action="store_true", help="list the experiments, one line each, and exit")
    parser.add_argument("--out", metavar="DIR", help="output directory (required): results.json, table.md, page.html, "
                                                     "runs/ and the finished cells (cells/) for resuming")
    parser.add_argument("--model", metavar=MODEL_METAVAR, help="your base model (with --data; default: the embedded "
                                                               "all-MiniLM-L6-v2)")
    parser.add_argument("--data", metavar="FILE", help="your data, any file `lorakit train --data` reads ({text, label} "
                                                       "records: classification by accuracy; others: causal LM by loss)")
    parser.add_argument("--quick", action="store_true", help="a short version (about 2 minutes on a 2-core CPU)")
    parser.add_argument("--seeds", type=positive_int, metavar="N", help="seeds per setting (default: the experiment's)")
    parser.add_argument("--device", default="auto", metavar="cpu|cuda|auto", help="where to train (default: auto)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the finished cells in --out and start again (needed when the settings changed)")
    parser.set_defaults(func=run)


def list_text() -> str:
    """One line per experiment: its name and description."""
    from ..experiments import EXPERIMENTS

    width = max(len(name) for name in EXPERIMENTS)
    return "\n".join(f"{name:<{width}}  {e.description}" for name, e in EXPERIMENTS.items())


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..experiments import EXPERIMENTS, experiment_named
    from ..experiments.core import CellStore, load_task

    if args.list:
        print(list_text())
        return 0
    if args.name is None:
        raise ConfigError(f"give an experiment NAME, one of: {', '.join(EXPERIMENTS)} (lorakit experiment --list)")
    experiment = experiment_named(args.name)  # an unknown name: one line naming the valid ones
    if not args.out:
        raise ConfigError(f"experiment {args.name}: --out DIR is required (results.json, table.md and page.html go "
                          "there)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file is there; give a directory")
    if args.model is not None and Path(args.model).exists():
        from ..names import check_out_not_input

        check_out_not_input(out, [("--model", args.model)], flag="--out")
    module = experiment.load()
    task = load_task(args.model, args.data, args.quick, device=args.device)
    store = CellStore(out, experiment.name, {"task": task.describe(), "seeds": args.seeds}, restart=args.restart)
    print(f"lorakit experiment {experiment.name}: {task.name}, {len(task.train_records)} training / "
          f"{len(task.eval_records)} evaluation examples, {task.settings['steps']} steps a run"
          f"{', quick' if args.quick else ''}; writing into {out}", file=sys.stderr, flush=True)
    module.run(task, out, args.quick, args.seeds, store, progress_stream=sys.stderr)
    return 0
