"""The data layer of `lorakit train`: read a data file, check and detect its format, hold out a validation
split, tokenise (see `tokenize.py`), and pad batches.

Files: ``.jsonl`` (one JSON object per line, blank lines allowed) and ``.csv`` (header row with ``text`` and
``label`` columns, for classification; labels that are all integers are read as integers).

Formats, detected from the keys of the records (extra keys are ignored; all records share one format):

====================  ============================================  ==========================================
format                keys                                          loss on
====================  ============================================  ==========================================
``text``              ``{text}``                                    every token (plain language modelling)
``prompt_completion`` ``{prompt, completion}``                      the completion + EOS
``alpaca``            ``{instruction, input, output}`` (input opt.) the output + EOS (prompt: ALPACA_PROMPT)
``messages``          ``{messages: [{role, content}, ...]}``        assistant turns (the chat template's)
``classification``    ``{text, label}`` (label: string or integer)  the class
====================  ============================================  ==========================================

``completion_only=False`` puts every token of the causal LM formats in the loss. Bad input raises
`DataError` with a one-line message naming the file and line.

One call for the training loop::

    data = load_datasets(cfg, tokenizer)              # Datasets: train / eval examples, stats, label2id
    for line in data.warnings(): print("warning:", line)
    loader = DataLoader(data.train, batch_size=8, shuffle=True, collate_fn=data.collate)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .config import TrainConfig
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
    "classification": "{text, label}",
}
FORMATS = tuple(FORMAT_KEYS)
LM_FORMATS = ("text", "prompt_completion", "alpaca", "messages")
EXPECTED = " | ".join(FORMAT_KEYS.values())
ROLES = ("system", "user", "assistant")
EXTENSIONS = (".jsonl", ".csv")


class Records(list):
    """A list of records that remembers its file and the line of each record, for error messages."""

    def __init__(self, items: Sequence[dict[str, Any]] = (), path: str = "",
                 lines: Sequence[int] | None = None) -> None:
        super().__init__(items)
        self.path = str(path)
        self.lines = list(lines) if lines is not None else list(range(1, len(self) + 1))


def _line(records: Sequence[dict[str, Any]], i: int) -> int:
    lines = getattr(records, "lines", None)
    return lines[i] if lines is not None and i < len(lines) else i + 1


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (str, "string"), ((int, float), "number"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


# -- reading -------------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> Records:
    """The records of a .jsonl or .csv file, in file order (DataError: missing file, bad extension, a line
    that is not a JSON object, a CSV without text/label columns, no records)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file")
    if p.is_dir():
        raise DataError(f"{path}: is a directory; expected a .jsonl or .csv file")
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {ext or '(no extension)'!r}; expected .jsonl "
                        "(one JSON object per line) or .csv (columns text,label)")
    try:
        raw = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from err
    records = _read_csv(raw, str(path)) if ext == ".csv" else _read_jsonl(raw, str(path))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _read_jsonl(raw: str, path: str) -> Records:
    items, lines = [], []
    for n, line in enumerate(raw.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: invalid JSON: {err.msg} (column {err.colno})") from err
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {_json_type(obj)}")
        items.append(obj)
        lines.append(n)
    return Records(items, path, lines)


def _read_csv(raw: str, path: str) -> Records:
    reader = csv.reader(io.StringIO(raw, newline=""))
    items, lines = [], []
    try:
        header = next(reader, None)
        if header is None:
            return Records([], path)
        header = [h.strip() for h in header]
        if "text" not in header or "label" not in header:
            raise DataError(f"{path}: a CSV file needs a header row with columns text,label; found {header}")
        t, lab = header.index("text"), header.index("label")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: row has {len(row)} fields; the header has "
                                f"{len(header)}")
            items.append({"text": row[t], "label": row[lab].strip()})
            lines.append(reader.line_num)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV: {err}") from err
    if items and all(re.fullmatch(r"-?\d+", rec["label"]) for rec in items):
        for rec in items:
            rec["label"] = int(rec["label"])
    return Records(items, path, lines)


# -- formats -------------------------------------------------------------------------------------------------
def record_format(record: dict[str, Any]) -> str | None:
    """The format of one record from its keys, or None."""
    keys = set(record)
    if "messages" in keys:
        return "messages"
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
    first, first_line = None, 0
    for i, record in enumerate(records):
        where = f"{path}:{_line(records, i)}"
        fmt = record_format(record)
        if fmt is None:
            raise DataError(f"{where}: record has keys {sorted(record)}; expected one of: {EXPECTED}")
        if first is None:
            first, first_line = fmt, _line(records, i)
        elif fmt != first:
            raise DataError(f"{where}: record is {FORMAT_KEYS[fmt]} but line {first_line} is "
                            f"{FORMAT_KEYS[first]}; all records must share one format")
        _check(record, fmt, where)
    assert first is not None
    return first


def _check(record: dict[str, Any], fmt: str, where: str) -> None:
    def need_str(key: str, value: Any, optional: bool = False) -> None:
        if not isinstance(value, str) and not (optional and value is None):
            raise DataError(f"{where}: field {key!r} must be a string, got {_json_type(value)}")

    if fmt in ("text", "classification"):
        need_str("text", record["text"])
    elif fmt == "prompt_completion":
        need_str("prompt", record["prompt"])
        need_str("completion", record["completion"])
    elif fmt == "alpaca":
        need_str("instruction", record["instruction"])
        need_str("input", record.get("input"), optional=True)
        need_str("output", record["output"])
    elif fmt == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty array of {{role, content}} objects")
        for j, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"{where}: messages[{j}] must be an object with keys role and content")
            if message["role"] not in ROLES:
                raise DataError(f"{where}: messages[{j}] has role {message['role']!r}; expected one of: "
                                f"{', '.join(ROLES)}")
            need_str(f"messages[{j}].content", message["content"])
    if fmt == "classification":
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise DataError(f"{where}: field 'label' must be a non-empty string or an integer, got "
                            f"{_json_type(label)} {label!r}")


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
    n = len(records)
    indices = list(range(n))
    if fraction == 0.0:
        return Records(records, path, [_line(records, i) for i in indices]), Records([], path)
    n_eval = max(1, round(n * fraction))
    if n - n_eval < 1:
        raise DataError(f"{path}: {n} record(s) are too few to hold out eval_fraction={fraction}")
    random.Random(seed).shuffle(indices)
    held, kept = sorted(indices[:n_eval]), sorted(indices[n_eval:])

    def subset(idx: list[int]) -> Records:
        return Records([records[i] for i in idx], path, [_line(records, i) for i in idx])

    return subset(kept), subset(held)


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
                  eval_records: Sequence[dict[str, Any]] | None = None) -> Datasets:
    """Read, check, split and tokenise `cfg.data` (and `cfg.eval_data`, or hold out `cfg.eval_fraction`
    with `cfg.seed`) for `task` (default `cfg.task`; `auto` is resolved from the data).

    `records` / `eval_records` give the data in memory instead of files (e.g. the embedded demo's)."""
    if records is not None:
        records = Records(records, path=cfg.data or "<records>")
        cfg = dataclasses.replace(cfg, data=records.path)
    elif not cfg.data:
        raise DataError("no training data: pass --data FILE (.jsonl, or .csv for classification)")
    else:
        records = read_records(cfg.data)
    fmt = detect_format(records, cfg.data)
    task = resolve_task(task or cfg.task, fmt, cfg.data)
    if eval_records is not None:
        eval_records = Records(eval_records, path="<eval records>")
        eval_fmt = detect_format(eval_records, eval_records.path)
        resolve_task(task, eval_fmt, eval_records.path)
        cfg = dataclasses.replace(cfg, eval_data=eval_records.path)
    elif cfg.eval_data:
        eval_records = read_records(cfg.eval_data)
        eval_fmt = detect_format(eval_records, cfg.eval_data)
        resolve_task(task, eval_fmt, cfg.eval_data)
    else:
        records, eval_records = split_records(records, cfg.eval_fraction, cfg.seed)
        eval_fmt = fmt
    eval_source = cfg.eval_data or f"{cfg.data} (held out)"
    eval_examples: list[dict[str, Any]] = []
    eval_stats = None
    label2id = None
    if task == "classification":
        train, label2id, stats = encode_classification(records, tokenizer, cfg.max_length, source=cfg.data)
        if eval_records:
            eval_examples, _, eval_stats = encode_classification(eval_records, tokenizer, cfg.max_length,
                                                                 label2id, source=eval_source)
    else:
        options = {"completion_only": cfg.completion_only, "packing": cfg.packing}
        train, stats = encode_lm(records, fmt, tokenizer, cfg.max_length, source=cfg.data, **options)
        if eval_records:
            eval_examples, eval_stats = encode_lm(eval_records, eval_fmt, tokenizer, cfg.max_length,
                                                  source=eval_source, **options)
    if not train:
        raise DataError(f"{cfg.data}: no example left to train on: all {stats.records} have no token to "
                        f"learn from within max_length={cfg.max_length}")
    return Datasets(task=task, format=fmt, train=train, eval=eval_examples, train_stats=stats,
                    eval_stats=eval_stats, pad_id=pad_token_id(tokenizer), label2id=label2id,
                    eval_format=eval_fmt if eval_records else None)


__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "EXPECTED", "FORMATS", "FORMAT_KEYS", "IGNORE_INDEX", "ROLES",
    "DataError", "DataStats", "Datasets", "Records", "build_label2id", "collate_classification", "collate_lm",
    "detect_format", "encode_classification", "encode_lm", "load_datasets", "pad_token_id", "read_records",
    "record_format", "render_prompt", "resolve_task", "split_records",
]
