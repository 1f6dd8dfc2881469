"""`lorakit report`: one self-contained HTML page of what an adapter learned (lorakit.report.data gathers,
lorakit.report.page draws): training curves of a run, the plan next to the measured memory, ||sBA||_F / ||W0||_F per
module (with --model, or a run's own model), each module's spectrum, the rank slider, the "B A forming" widget,
DoRA's magnitude per row and, with --quantize nf4, the NF4 error per module. The embedded demo's output directory
gives its table and its LoRA run. Works offline: no CDN, everything inline."""

from __future__ import annotations

import argparse
from pathlib import Path

from .model_args import add_model_arguments, quantize_arg


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report", help="one self-contained HTML page of a run or adapter: curves, spectra, the rank slider",
    )
    parser.add_argument("directory", metavar="RUN_OR_ADAPTER_DIR",
                        help="a `lorakit train` output directory (metrics.jsonl, adapter/), the embedded demo's output "
                             "directory (runs/demo), or an adapter directory (PEFT layout)")
    add_model_arguments(parser, required=False, what="base model (adds ||sBA||_F / ||W0||_F per module and per "
                                                     "checkpoint)")
    parser.add_argument("--out", default="report.html", metavar="FILE",
                        help="the HTML file to write (default: report.html)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.files import atomic_write
    from ..report.data import gather
    from ..report.page import render

    data = gather(args.directory, model_dir=args.model, dtype=args.dtype, quantize=quantize_arg(args))
    html = render(data)
    out = Path(args.out)
    atomic_write(out.parent, {out.name: lambda path: path.write_text(html, encoding="utf-8")})
    print(out)
    return 0
