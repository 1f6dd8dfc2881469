"""Reading training data files into records, each remembering where it came from (file and line or row).

``.jsonl`` (JSON Lines, also in a ``.json`` file), ``.json`` (an array of objects, or an object with one array
of objects), ``.csv`` (a header row naming the fields), ``.parquet`` (pyarrow) and a directory written by
`datasets.Dataset.save_to_disk`; several files at once are concatenated (`read_many`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
EXPECTED_FILES = (".jsonl (one JSON object per line), .json (an array of objects), .csv (a header row), "
                  ".parquet, or a directory written by datasets' save_to_disk")


class Records(list):
    """A list of records that remembers its file(s) and where each record is, for error messages.

    `lines[i]` is record i's line (JSON Lines, JSON arrays, CSV) or its 0-based row (Parquet, datasets);
    `where(i)` is the whole location, e.g. ``train.jsonl:7`` or ``train.parquet row 3``.
    """

    def __init__(self, items: Sequence[dict[str, Any]] = (), path: str = "",
                 lines: Iterable[int] | None = None, wheres: Sequence[str] | None = None) -> None:
        super().__init__(items)
        self.path = str(path)
        self.lines = list(lines) if lines is not None else list(range(1, len(self) + 1))
        self.wheres = list(wheres) if wheres is not None else None

    def where(self, i: int) -> str:
        """Where record i is: ``file:line`` or ``file row N``."""
        if self.wheres is not None and i < len(self.wheres):
            return self.wheres[i]
        return f"{self.path or 'data'}:{self.lines[i] if i < len(self.lines) else i + 1}"

    def subset(self, indices: Sequence[int]) -> Records:
        """The records at `indices`, with their locations."""
        wheres = [self.where(i) for i in indices] if self.wheres is not None else None
        return Records([self[i] for i in indices], self.path, [self.lines[i] for i in indices], wheres)

    @classmethod
    def concat(cls, parts: Sequence[Records]) -> Records:
        """Several files' records, in order; `path` lists the files."""
        if len(parts) == 1:
            return parts[0]
        items, lines, wheres = [], [], []
        for part in parts:
            items += part
            lines += part.lines
            wheres += [part.where(i) for i in range(len(part))]
        return cls(items, ", ".join(p.path for p in parts), lines, wheres)


def where(records: Sequence[dict[str, Any]], i: int, path: str = "") -> str:
    """Location of record i of any sequence (a `Records` knows it; a plain list is ``path:i+1``)."""
    if isinstance(records, Records):
        return records.where(i)
    return f"{path or 'data'}:{i + 1}"


def json_type(value: Any) -> str:
    """JSON's name for the type of `value` (string, number, array, object, boolean, null)."""
    for kind, name in ((bool, "boolean"), (str, "string"), ((int, float), "number"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def data_paths(data: str | Sequence[str] | None) -> list[str]:
    """The files of a `data` setting: a list, or one string with comma-separated files (a path that exists
    as given is never split)."""
    if data is None:
        return []
    if isinstance(data, (list, tuple)):
        return [str(p) for part in data for p in data_paths(part)]
    text = str(data)
    if Path(text).exists() or "," not in text:
        return [text] if text.strip() else []
    return [p.strip() for p in text.split(",") if p.strip()]


def read_many(paths: Sequence[str]) -> Records:
    """The records of several files, concatenated (each keeps its file and line). Raises DataError."""
    return Records.concat([read_records(p) for p in paths])


def read_records(path: str | Path) -> Records:
    """The records of one data file or `save_to_disk` directory, in file order.

    Raises:
        DataError: a missing file, an unsupported type, invalid UTF-8 or JSON (file and line named), a line
            that is not a JSON object, JSON nested too deeply, a CSV row of the wrong width, no records.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file")
    if p.is_dir():
        records = _read_saved_dataset(p)
    else:
        ext = p.suffix.lower()
        if ext not in EXTENSIONS:
            raise DataError(f"{path}: unsupported file type {ext or '(no extension)'!r}; expected {EXPECTED_FILES}")
        records = _read_parquet(p) if ext == ".parquet" else _read_text_file(p, ext)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _read_text_file(p: Path, ext: str) -> Records:
    try:
        data = p.read_bytes()
    except OSError as err:
        raise DataError(f"{p}: cannot read: {err.strerror or err}") from err
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if ext == ".csv":
        return _read_csv(raw, str(p))
    if ext == ".json" and raw.lstrip().startswith(("[", "{")):
        records = _read_json(raw, str(p))
        if records is not None:
            return records
    return _read_jsonl(raw, str(p))


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from err
    except RecursionError as err:
        raise DataError(f"{where}: JSON nested too deeply to read") from err


def _read_jsonl(raw: str, path: str) -> Records:
    items, lines = [], []
    for n, line in enumerate(raw.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        line = line.strip()
        if not line:
            continue
        obj = _loads(line, f"{path}:{n}")
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {json_type(obj)}")
        items.append(obj)
        lines.append(n)
    return Records(items, path, lines)


def _read_json(raw: str, path: str) -> Records | None:
    """A JSON array of objects (each with its line), or an object with exactly one array of objects; None
    for JSON Lines in a .json file (as `datasets`' to_json writes)."""
    decoder = json.JSONDecoder()
    start = len(raw) - len(raw.lstrip())
    if raw[start] == "{":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":
                return None  # several objects: JSON Lines
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from err
        except RecursionError as err:
            raise DataError(f"{path}: JSON nested too deeply to read") from err
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) != 1:
            return None if not lists else _one_list_error(path, lists)
        key = lists[0]
        items = obj[key]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise DataError(f"{path}: {key}[{i}]: expected a JSON object, got {json_type(item)}")
        return Records(items, path, range(len(items)), [f"{path} {key}[{i}]" for i in range(len(items))])
    items, lines = [], []
    pos, line = start + 1, raw.count("\n", 0, start) + 1
    while True:
        nxt = _skip_space(raw, pos)
        line += raw.count("\n", pos, nxt)
        pos = nxt
        if pos < len(raw) and raw[pos] == "]" and not items:
            break
        try:
            obj, end = decoder.raw_decode(raw, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from err
        except RecursionError as err:
            raise DataError(f"{path}:{line}: JSON nested too deeply to read") from err
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: expected an array of JSON objects, got {json_type(obj)}")
        items.append(obj)
        lines.append(line)
        line += raw.count("\n", pos, end)
        nxt = _skip_space(raw, end)
        line += raw.count("\n", end, nxt)
        pos = nxt
        if pos < len(raw) and raw[pos] == ",":
            pos += 1
            continue
        if pos < len(raw) and raw[pos] == "]" and not raw[pos + 1:].strip():
            break
        raise DataError(f"{path}:{line}: invalid JSON: expected ',' or ']' after an array element")
    return Records(items, path, lines)


def _skip_space(raw: str, pos: int) -> int:
    while pos < len(raw) and raw[pos] in " \t\r\n":
        pos += 1
    return pos


def _one_list_error(path: str, keys: list[str]) -> Records:
    raise DataError(f"{path}: a JSON object file must hold exactly one array of records; found arrays "
                    f"{', '.join(keys)}")


def _read_csv(raw: str, path: str) -> Records:
    """A header row names the fields (text,label | prompt,completion | instruction,input,output | text)."""
    reader = csv.reader(io.StringIO(raw, newline=""))
    items, lines = [], []
    try:
        header = next(reader, None)
        if header is None:
            return Records([], path)
        header = [h.strip() for h in header]
        if not _csv_header_ok(header):
            raise DataError(f"{path}: a CSV file needs a header row with columns text,label (or text, "
                            f"prompt,completion, instruction,input,output); found {header}")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: row has {len(row)} fields; the header has "
                                f"{len(header)}")
            record = dict(zip(header, row))
            if "label" in record:
                record["label"] = record["label"].strip()
            items.append(record)
            lines.append(reader.line_num)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV: {err}") from err
    if items and "label" in header and all(re.fullmatch(r"-?\d+", rec["label"]) for rec in items):
        for rec in items:
            rec["label"] = int(rec["label"])
    return Records(items, path, lines)


def _csv_header_ok(header: list[str]) -> bool:
    keys = set(header)
    return bool({"text"} <= keys or {"prompt", "completion"} <= keys or {"instruction", "output"} <= keys)


def _rows(items: list[dict[str, Any]], path: str) -> Records:
    return Records(items, path, range(len(items)), [f"{path} row {i}" for i in range(len(items))])


def _read_parquet(p: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{p}: reading .parquet files needs the package pyarrow (pip install pyarrow)") from err
    try:
        table = pq.read_table(p)
    except Exception as err:  # pyarrow.ArrowInvalid, OSError: not a parquet file, truncated, ...
        raise DataError(f"{p}: not a readable Parquet file: {type(err).__name__}: {err}") from err
    return _rows(table.to_pylist(), str(p))


def _read_saved_dataset(p: Path) -> Records:
    """A directory written by `Dataset.save_to_disk` (a `DatasetDict`: its only split, or its train split)."""
    if not ((p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        raise DataError(f"{p}: is a directory but not a dataset written by datasets' save_to_disk (no "
                        f"state.json or dataset_dict.json); expected {EXPECTED_FILES}")
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{p}: reading a save_to_disk directory needs the package datasets "
                        "(pip install datasets)") from err
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as err:  # FileNotFoundError, ArrowInvalid, ... from a damaged directory
        raise DataError(f"{p}: cannot load the saved dataset: {type(err).__name__}: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1 and "train" not in splits:
            raise DataError(f"{p}: a DatasetDict with splits {', '.join(splits)} and no 'train' split; pass "
                            f"one split's directory ({p}/<split>)")
        split = splits[0] if len(splits) == 1 else "train"
        ds, p = ds[split], p / split
    return _rows(ds.to_list(), str(p))


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (names and bytes, sorted). Raises OSError."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


__all__ = ["EXPECTED_FILES", "EXTENSIONS", "Records", "data_paths", "file_digest", "json_type", "read_many",
           "read_records", "where"]
