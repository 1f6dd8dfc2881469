"""The token cache: tokenised train / eval examples saved on disk, so a second run on the same data starts at once.

Key: SHA-256 of the data files' paths and bytes, the tokenizer (its class, backend JSON or vocabulary, chat
template, special tokens), every setting that changes the examples, and the data layer's own source. Entries are
safetensors files (flat int32 token and label arrays, offsets, JSON metadata; no pickle) written atomically under
`cache_dir()`; an entry that cannot be read back is ignored and rebuilt. After each save the cache is pruned to
`max_bytes()` (`$LORAKIT_DATA_CACHE_MAX_MB`, default 2048 MiB), least recently used entries first; the entry just
written is always kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..io.files import atomic_write, write_safetensors
from .readers import file_digest
from .tokenize import DataStats

CACHE_FORMAT = 1
DEFAULT_MAX_MB = 2048
_SOURCES = ("readers.py", "chat.py", "tokenize.py", "data.py", "cache.py")


def cache_dir() -> Path | None:
    """Where entries live: `$LORAKIT_DATA_CACHE` (``0`` / ``off``: no cache), else `$LORAKIT_CACHE/data`,
    else `$XDG_CACHE_HOME/lorakit/data` (default ``~/.cache/lorakit/data``)."""
    own = os.environ.get("LORAKIT_DATA_CACHE")
    if own is not None:
        return None if own.strip().lower() in ("", "0", "off", "false", "no") else Path(own)
    root = os.environ.get("LORAKIT_CACHE")
    if root:
        return Path(root) / "data"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit" / "data"


def max_bytes() -> int:
    """The cache's size budget: `$LORAKIT_DATA_CACHE_MAX_MB` (MiB; a bad value falls back to the default)."""
    try:
        mb = float(os.environ.get("LORAKIT_DATA_CACHE_MAX_MB", DEFAULT_MAX_MB))
    except ValueError:
        mb = DEFAULT_MAX_MB
    return max(0, int(mb * 2**20)) if mb == mb else DEFAULT_MAX_MB * 2**20  # NaN: the default


def prune(directory: Path, budget: int, keep: str | None = None) -> list[Path]:
    """Delete the least recently used entries (`*.safetensors`, by modification time: `load` touches an entry)
    until the rest fit in `budget` bytes; the entry `keep` (a key) stays whatever its size. Returns the deleted
    paths; files that vanish meanwhile (another run pruning) are skipped."""
    entries = []
    for path in directory.glob("*.safetensors"):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, path in sorted(entries):
        if total <= budget:
            break
        if path.stem == keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        deleted.append(path)
    return deleted


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's output: class, backend (fast) or vocabulary (slow), chat template,
    special tokens and init options."""
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode())
    for name in ("chat_template", "special_tokens_map", "bos_token_id", "eos_token_id", "pad_token_id",
                 "padding_side"):
        h.update(json.dumps(getattr(tokenizer, name, None), sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()


def _code_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256(str(CACHE_FORMAT).encode())
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def cache_key(paths: Sequence[str], eval_paths: Sequence[str], tokenizer: Any, settings: dict[str, Any]) -> str:
    """The key of one load: files (path and bytes), tokenizer, settings, data-layer code. Raises OSError."""
    h = hashlib.sha256(_code_digest().encode())
    for group in (paths, eval_paths):
        for p in group:
            h.update(f"{p}\0{file_digest(p)}\0".encode())
        h.update(b"|")
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _flat(examples: list[dict[str, Any]], prefix: str) -> dict[str, torch.Tensor]:
    ids = [t for ex in examples for t in ex["input_ids"]]
    lengths = [len(ex["input_ids"]) for ex in examples]
    out = {f"{prefix}.input_ids": torch.tensor(ids, dtype=torch.int32),
           f"{prefix}.offsets": torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)}
    if examples and "labels" in examples[0]:
        out[f"{prefix}.labels"] = torch.tensor([t for ex in examples for t in ex["labels"]], dtype=torch.int32)
    elif examples:
        out[f"{prefix}.label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.int64)
    return out


def _unflat(tensors: dict[str, torch.Tensor], prefix: str) -> list[dict[str, Any]]:
    offsets = tensors[f"{prefix}.offsets"].tolist()
    ids = tensors[f"{prefix}.input_ids"].tolist()
    if offsets[0] != 0 or offsets[-1] != len(ids) or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError("inconsistent offsets")
    spans = list(zip(offsets, offsets[1:]))
    if f"{prefix}.labels" in tensors:
        labels = tensors[f"{prefix}.labels"].tolist()
        if len(labels) != len(ids):
            raise ValueError("labels and input_ids differ in length")
        return [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in spans]
    if not spans:
        return []
    classes = tensors[f"{prefix}.label"].tolist()
    if len(classes) != len(spans):
        raise ValueError("one class per example expected")
    return [{"input_ids": ids[a:b], "label": c} for (a, b), c in zip(spans, classes)]


def save(directory: Path, key: str, fields: dict[str, Any]) -> None:
    """Write one entry (`fields`: Datasets' fields) atomically; an OSError (read-only disk, ...) is ignored:
    the cache only saves time."""
    tensors = {**_flat(fields["train"], "train"), **_flat(fields["eval"], "eval")}
    meta = {k: v for k, v in fields.items() if k not in ("train", "eval")}
    for name in ("train_stats", "eval_stats"):
        meta[name] = None if meta[name] is None else vars(meta[name])
    try:
        atomic_write(directory, {f"{key}.safetensors": write_safetensors(tensors, {"lorakit": json.dumps(meta)})})
        prune(directory, max_bytes(), keep=key)
    except OSError:
        pass


def load(directory: Path, key: str) -> dict[str, Any] | None:
    """Datasets' fields of an entry, or None when absent or unreadable (a corrupt entry is rebuilt)."""
    from safetensors import safe_open

    path = directory / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["lorakit"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        fields = dict(meta, train=_unflat(tensors, "train"), eval=_unflat(tensors, "eval"))
        for name in ("train_stats", "eval_stats"):
            fields[name] = None if fields[name] is None else DataStats(**fields[name])
        _touch(path)
        return fields
    except Exception:  # truncated file, bad header, foreign JSON: rebuild it
        return None


def _touch(path: Path) -> None:
    """Mark an entry as used now (pruning removes the least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass


__all__ = ["cache_dir", "cache_key", "load", "max_bytes", "prune", "save", "tokenizer_fingerprint"]
