"""The data layer of `lorakit train`: read data files, check and detect their format, hold out a validation
split, tokenise (see `tokenize.py`, cached by `cache.py`), and pad batches.

Files (`readers.py`): ``.jsonl``, ``.json`` (an array, or an object holding one array), ``.csv`` (a header row
naming the fields; labels that are all integers are read as integers), ``.parquet`` and a `datasets`
save_to_disk directory; several files are concatenated, each record keeping its file and line or row.

Formats, detected from the keys of the records (extra keys are ignored; all records share one format):

====================  ============================================  ==========================================
format                keys                                          loss on
====================  ============================================  ==========================================
``text``              ``{text}``                                    every token (plain language modelling)
``prompt_completion`` ``{prompt, completion}``                      the completion + EOS
``alpaca``            ``{instruction, input, output}`` (input opt.) the output + EOS (prompt: ALPACA_PROMPT)
``messages``          ``{messages: [{role, content}, ...]}``        assistant turns (the chat template's)
``sharegpt``          ``{conversations: [{from, value}, ...]}``     assistant (gpt) turns, as messages
``classification``    ``{text, label}`` (label: string or integer)  the class
====================  ============================================  ==========================================

Chat records take roles system / user / assistant / tool, assistant ``tool_calls`` and a ``tools`` field, all
passed to the chat template (`chat.py`); one the template drops is an error. ``completion_only=False`` puts
every token of the causal LM formats in the loss. Bad input raises `DataError` with a one-line message naming
the file and line (or row).

One call for the training loop::

    data = load_datasets(cfg, tokenizer)              # Datasets: train / eval examples, stats, label2id
    for line in data.warnings(): print("warning:", line)
    loader = DataLoader(data.train, batch_size=8, shuffle=True, collate_fn=data.collate)
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DataError
from . import cache as token_cache
from .cache import cache_dir
from .chat import ROLES, check_chat
from .config import TrainConfig
from .readers import Records, data_paths, json_type, read_many, read_records, where
from .tokenize import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    DataStats,
    build_label2id,
    encode_classification,
    encode_lm,
    pad_token_id,
    render_prompt,
)

FORMAT_KEYS = {
    "text": "{text}",
    "prompt_completion": "{prompt, completion}",
    "alpaca": "{instruction, input, output}",
    "messages": "{messages}",
    "sharegpt": "{conversations}",
    "classification": "{text, label}",
}
FORMATS = tuple(FORMAT_KEYS)
LM_FORMATS = ("text", "prompt_completion", "alpaca", "messages", "sharegpt")
EXPECTED = " | ".join(FORMAT_KEYS.values())


# -- formats -------------------------------------------------------------------------------------------------
def record_format(record: dict[str, Any]) -> str | None:
    """The format of one record from its keys, or None."""
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def detect_format(records: Sequence[dict[str, Any]], path: str = "") -> str:
    """The format shared by all records, each checked (DataError naming file:line otherwise)."""
    path = path or getattr(records, "path", "") or "data"
    if not records:
        raise DataError(f"{path}: no records")
    first, first_at = None, ""
    for i, record in enumerate(records):
        at = where(records, i, path)
        fmt = record_format(record)
        if fmt is None:
            raise DataError(f"{at}: record has keys {sorted(record)}; expected one of: {EXPECTED}")
        if first is None:
            first, first_at = fmt, at
        elif fmt != first:
            raise DataError(f"{at}: record is {FORMAT_KEYS[fmt]} but {_short(first_at, at)} is "
                            f"{FORMAT_KEYS[first]}; all records must share one format")
        _check(record, fmt, at)
    assert first is not None
    return first


def _short(first_at: str, at: str) -> str:
    """`first_at` without the file when both are lines of one file (``line 1``), else in full."""
    head, _, line = first_at.rpartition(":")
    return f"line {line}" if line.isdigit() and at.rpartition(":")[0] == head else first_at


def _check(record: dict[str, Any], fmt: str, where: str) -> None:
    def need_str(key: str, value: Any, optional: bool = False) -> None:
        if not isinstance(value, str) and not (optional and value is None):
            raise DataError(f"{where}: field {key!r} must be a string, got {json_type(value)}")

    if fmt in ("text", "classification"):
        need_str("text", record["text"])
    elif fmt == "prompt_completion":
        need_str("prompt", record["prompt"])
        need_str("completion", record["completion"])
    elif fmt == "alpaca":
        need_str("instruction", record["instruction"])
        need_str("input", record.get("input"), optional=True)
        need_str("output", record["output"])
    elif fmt in ("messages", "sharegpt"):
        check_chat(record, fmt, where)
    if fmt == "classification":
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise DataError(f"{where}: field 'label' must be a non-empty string or an integer, got "
                            f"{json_type(label)} {label!r}")


def resolve_task(task: str, fmt: str, path: str = "") -> str:
    """`auto` -> classification for {text, label} data, else causal-lm; DataError if task and data disagree."""
    path = path or "data"
    if task == "auto":
        return "classification" if fmt == "classification" else "causal-lm"
    if task == "classification" and fmt != "classification":
        raise DataError(f"{path}: task classification needs {{text, label}} records; found "
                        f"{FORMAT_KEYS[fmt]} records")
    if task == "causal-lm" and fmt == "classification":
        raise DataError(f"{path}: task causal-lm needs {' | '.join(FORMAT_KEYS[f] for f in LM_FORMATS)} "
                        "records; found {text, label} records (classification data)")
    return task


# -- validation split ----------------------------------------------------------------------------------------
def split_records(records: Sequence[dict[str, Any]], fraction: float, seed: int) -> tuple[Records, Records]:
    """(train, held out): round(fraction * n) records (at least 1) held out by a permutation fixed by
    `seed`; both keep file order. fraction 0: (records, [])."""
    path = getattr(records, "path", "") or "data"
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"{path}: eval_fraction must be in [0, 1); got {fraction}")
    recs = records if isinstance(records, Records) else Records(records, path)
    n = len(recs)
    indices = list(range(n))
    if fraction == 0.0:
        return recs.subset(indices), Records([], path)
    n_eval = max(1, round(n * fraction))
    if n - n_eval < 1:
        raise DataError(f"{path}: {n} record(s) are too few to hold out eval_fraction={fraction}")
    random.Random(seed).shuffle(indices)
    held, kept = sorted(indices[:n_eval]), sorted(indices[n_eval:])
    return recs.subset(kept), recs.subset(held)


# -- batches -------------------------------------------------------------------------------------------------
def collate_lm(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad causal LM examples to the longest: input_ids (pad_id), attention_mask, labels (-100)."""
    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_classification(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad classification examples: input_ids, attention_mask, labels (class ids, shape [batch])."""
    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
    labels = torch.tensor([ex["label"] for ex in batch], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -- one call for the training loop --------------------------------------------------------------------------
@dataclass
class Datasets:
    """Tokenised train and eval examples (lists: map-style datasets for a DataLoader) and what to report."""

    task: str  # causal-lm | classification
    format: str  # the training data's format
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]  # empty: no validation
    train_stats: DataStats
    eval_stats: DataStats | None
    pad_id: int
    label2id: dict[str, int] | None = None  # classification only
    eval_format: str | None = None  # the eval data's format (None: no eval data)

    @property
    def id2label(self) -> dict[int, str] | None:
        return None if self.label2id is None else {i: lab for lab, i in self.label2id.items()}

    @property
    def num_labels(self) -> int:
        return len(self.label2id or {})

    def collate(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The collate function for this task (pass as DataLoader's collate_fn)."""
        fn = collate_classification if self.task == "classification" else collate_lm
        return fn(batch, self.pad_id)

    def warnings(self) -> list[str]:
        """Truncated and dropped examples, one line each, for the caller to print."""
        return self.train_stats.warnings() + (self.eval_stats.warnings() if self.eval_stats else [])


def load_datasets(cfg: TrainConfig, tokenizer: Any, task: str | None = None,
                  records: Sequence[dict[str, Any]] | None = None,
                  eval_records: Sequence[dict[str, Any]] | None = None, cache: bool = True) -> Datasets:
    """Read, check, split and tokenise `cfg.data` (and `cfg.eval_data`, or hold out `cfg.eval_fraction`
    with `cfg.seed`) for `task` (default `cfg.task`; `auto` is resolved from the data).

    `cfg.data` / `cfg.eval_data` are one file, a list of files or comma-separated files (concatenated).
    `records` / `eval_records` give the data in memory instead of files (e.g. the embedded demo's). Data from
    files is cached tokenised (see `cache.py`; `cache=False` or ``LORAKIT_DATA_CACHE=0`` turns it off).

    Raises:
        DataError: no data, a bad file, record or field (file and line or row named), task and data that
            disagree, or nothing left to train on.
    """
    paths = [] if records is not None else data_paths(cfg.data)
    eval_paths = [] if eval_records is not None else data_paths(cfg.eval_data)
    if records is None and not paths:
        raise DataError("no training data: pass --data FILE (.jsonl, .json, .csv, .parquet or a save_to_disk "
                        "directory; several as --data a.jsonl,b.jsonl)")
    directory = cache_dir() if cache and records is None and eval_records is None else None
    key = None
    if directory is not None:
        settings = {"task": task or cfg.task, "max_length": cfg.max_length, "packing": cfg.packing,
                    "completion_only": cfg.completion_only,
                    "split": None if eval_paths or not cfg.eval_fraction else (cfg.eval_fraction, cfg.seed)}
        try:
            key = token_cache.cache_key(paths, eval_paths, tokenizer, settings)
        except OSError:  # a missing or unreadable file: reading it below names the problem
            key = None
        fields = token_cache.load(directory, key) if key else None
        if fields is not None:
            return Datasets(**fields)
    datasets = _load(cfg, tokenizer, task, records, eval_records, paths, eval_paths)
    if directory is not None and key:
        token_cache.save(directory, key, {f.name: getattr(datasets, f.name) for f in dataclasses.fields(datasets)})
    return datasets


def _load(cfg: TrainConfig, tokenizer: Any, task: str | None, records: Sequence[dict[str, Any]] | None,
          eval_records: Sequence[dict[str, Any]] | None, paths: list[str], eval_paths: list[str]) -> Datasets:
    if records is not None:
        records = Records(records, path=", ".join(paths) or str(cfg.data or "<records>"))
    else:
        records = read_many(paths)
    source = records.path
    fmt = detect_format(records, source)
    task = resolve_task(task or cfg.task, fmt, source)
    if eval_records is not None:
        eval_records = Records(eval_records, path="<eval records>")
    elif eval_paths:
        eval_records = read_many(eval_paths)
    if eval_records is not None:
        eval_fmt = detect_format(eval_records, eval_records.path)
        resolve_task(task, eval_fmt, eval_records.path)
        eval_source = eval_records.path
    else:
        records, eval_records = split_records(records, cfg.eval_fraction, cfg.seed)
        eval_fmt, eval_source = fmt, f"{source} (held out)"
    eval_examples: list[dict[str, Any]] = []
    eval_stats = None
    label2id = None
    if task == "classification":
        train, label2id, stats = encode_classification(records, tokenizer, cfg.max_length, source=source)
        if eval_records:
            eval_examples, _, eval_stats = encode_classification(eval_records, tokenizer, cfg.max_length,
                                                                 label2id, source=eval_source)
    else:
        options = {"completion_only": cfg.completion_only, "packing": cfg.packing}
        train, stats = encode_lm(records, fmt, tokenizer, cfg.max_length, source=source, **options)
        if eval_records:
            eval_examples, eval_stats = encode_lm(eval_records, eval_fmt, tokenizer, cfg.max_length,
                                                  source=eval_source, **options)
    if not train:
        raise DataError(f"{source}: no example left to train on: all {stats.records} have no token to "
                        f"learn from within max_length={cfg.max_length}")
    return Datasets(task=task, format=fmt, train=train, eval=eval_examples, train_stats=stats,
                    eval_stats=eval_stats, pad_id=pad_token_id(tokenizer), label2id=label2id,
                    eval_format=eval_fmt if eval_records else None)


__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "EXPECTED", "FORMATS", "FORMAT_KEYS", "IGNORE_INDEX", "ROLES",
    "DataError", "DataStats", "Datasets", "Records", "build_label2id", "collate_classification", "collate_lm",
    "detect_format", "encode_classification", "encode_lm", "load_datasets", "pad_token_id", "read_records",
    "read_many", "record_format", "render_prompt", "resolve_task", "split_records",
]
