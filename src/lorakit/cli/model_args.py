"""The base-model flags every command that takes `--model` shares: the model (a directory or a Hugging Face
model ID), `--dtype` and `--quantize`; lorakit.load_model reads them."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
QUANTIZE_CHOICES = ("none", "nf4")
MODEL_METAVAR = "DIR|ORG/NAME[@REV]"


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True, what: str = "base model",
                        dtype_help: str = "dtype of the base model's weights") -> None:
    """--model, --dtype auto|fp32|bf16|fp16 and --quantize none|nf4 on `parser`."""
    parser.add_argument("--model", required=required, default=None, metavar=MODEL_METAVAR,
                        help=f"{what}: a local Hugging Face model directory, or a model ID looked up in the Hugging "
                             "Face cache (HF_HUB_CACHE / HF_HOME) and downloaded when the network allows")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help=f"{dtype_help} (default: auto, the checkpoint's own dtype)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                        help="nf4: store the base's linear layers in 4-bit NormalFloat as they are read (QLoRA)")


def quantize_arg(args: argparse.Namespace) -> str | None:
    """`--quantize` as load_model takes it (None for none)."""
    return None if args.quantize == "none" else args.quantize
