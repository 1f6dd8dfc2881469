"""`lorakit report`: one self-contained HTML page of what an adapter learned (lorakit.report.data gathers,
lorakit.report.page draws): training curves of a run, ||sBA||_F / ||W0||_F per module (with --model), each
module's spectrum, the rank slider and the "B A forming" widget. Works offline: no CDN, everything inline."""

from __future__ import annotations

import argparse
from pathlib import Path

from .model_args import add_model_arguments, quantize_arg


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report", help="one self-contained HTML page of a run or adapter: curves, spectra, the rank slider",
    )
    parser.add_argument("directory", metavar="RUN_OR_ADAPTER_DIR",
                        help="a `lorakit train` output directory (metrics.jsonl, adapter/) or an adapter directory "
                             "(PEFT layout)")
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
