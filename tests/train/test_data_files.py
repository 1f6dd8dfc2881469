"""Data files as users have them: .json (array, object with one array, JSON Lines), .csv with any format's
columns, .parquet, a `datasets` save_to_disk directory, several files at once, and a one-line DataError naming
the file and line or row for each kind of bad file (invalid UTF-8, deep nesting, wrong types, damaged files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli.main import main
from lorakit.errors import DataError
from lorakit.train.config import TrainConfig
from lorakit.train.data import detect_format, encode_lm, load_datasets, read_records
from lorakit.train.readers import Records, data_paths, read_many
from model_dirs import build_tokenizer

ROWS = [{"prompt": "what is two plus two ?", "completion": " four"},
        {"prompt": "what is one plus one ?", "completion": " two"},
        {"prompt": "say hello", "completion": " hello world"}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def raises(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, records: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


# -- each file type reads the same records -------------------------------------------------------------------
def test_every_file_type_reads_the_same_records(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, indent=2))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    lines_json = write_jsonl(tmp_path / "lines.json", ROWS)  # what datasets' to_json writes
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\n' for r in ROWS))
    parquet = write_parquet(tmp_path / "d.parquet", ROWS)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    for path in (jsonl, array, wrapped, lines_json, csv, parquet, saved):
        records = read_records(path)
        assert list(records) == ROWS, path
        assert detect_format(records) == "prompt_completion"


def test_a_json_array_keeps_each_records_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text": "b",\n   "extra": 1},\n  {"text": 3}\n]\n')
    records = read_records(path)
    assert records.lines == [2, 4, 6]
    assert raises(detect_format, records) == f"{path}:6: field 'text' must be a string, got number"
    path.write_text('[{"text": "a"},\n 7]')
    assert raises(read_records, path) == f"{path}:2: expected an array of JSON objects, got number"
    path.write_text('[{"text": "a"},\n {"text": }]')
    assert raises(read_records, path).startswith(f"{path}:2: invalid JSON: ")
    path.write_text('{"a": [{"text": "x"}], "b": [{"text": "y"}]}')
    assert "exactly one array of records; found arrays a, b" in raises(read_records, path)


def test_a_datasetdict_directory_reads_its_train_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    records = read_records(tmp_path / "dd")
    assert list(records) == ROWS and records.path == str(tmp_path / "dd" / "train")
    assert list(read_records(tmp_path / "dd" / "test")) == ROWS[:1]
    assert "is a directory but not a dataset" in raises(read_records, tmp_path)


# -- several files -------------------------------------------------------------------------------------------
def test_several_files_are_concatenated_and_keep_their_origin(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    b = write_parquet(tmp_path / "b.parquet", ROWS[2:])
    assert data_paths(f"{a},{b}") == data_paths([str(a), str(b)]) == [str(a), str(b)]
    records = read_many([str(a), str(b)])
    assert list(records) == ROWS and records.where(1) == f"{a}:2" and records.where(2) == f"{b} row 0"
    one = load_datasets(TrainConfig(data=f"{a},{b}", max_length=32), tok, cache=False)
    many = load_datasets(TrainConfig(data=[str(a), str(b)], max_length=32), tok, cache=False)
    alone, _ = encode_lm(ROWS, "prompt_completion", tok, 32)
    assert one.train == many.train == alone
    bad = write_parquet(tmp_path / "c.parquet", [{"text": "a"}, {"text": "b"}])
    message = raises(detect_format, read_many([str(a), str(bad)]))
    assert message == (f"{bad} row 0: record is {{text}} but {a}:1 is {{prompt, completion}}; all records must "
                       "share one format")


def test_a_comma_in_an_existing_file_name_is_not_split(tmp_path):
    path = write_jsonl(tmp_path / "a,b.jsonl", ROWS)
    assert data_paths(str(path)) == [str(path)]


# -- bad files: one clear line each --------------------------------------------------------------------------
def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n')
    assert raises(read_records, path).startswith(f"{path}:3: not UTF-8 text (invalid continuation byte")


def test_deeply_nested_json_is_a_data_error(tmp_path):
    deep = '{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + deep + "\n")
    assert raises(read_records, path) == f"{path}:2: JSON nested too deeply to read"
    path = tmp_path / "d.json"
    path.write_text('[{"text": "ok"},\n' + deep + "]")
    assert raises(read_records, path) == f"{path}:2: JSON nested too deeply to read"


def test_a_parquet_row_of_the_wrong_type_names_the_row(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"text": "a", "label": 1}, {"text": "b", "label": None},
                                                  {"text": "c", "label": 0}])
    assert "row 1: field 'label' must be a non-empty string or an integer, got null" in raises(
        detect_format, read_records(path))
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "a", "completion": "b"},
                                                  {"prompt": None, "completion": "c"}])
    assert raises(detect_format, read_records(path)) == f"{path} row 1: field 'prompt' must be a string, got null"


def test_a_csv_row_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n"add two",,"four"\n"say",x\n')
    assert raises(read_records, path).startswith(f"{path}:3: row has 2 fields; the header has 3")


def test_damaged_files_are_data_errors(tmp_path):
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    assert raises(read_records, parquet).startswith(f"{parquet}: not a readable Parquet file: ")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{broken")
    assert raises(read_records, saved).startswith(f"{saved}: cannot load the saved dataset: ")
    assert "no such file" in raises(load_datasets, TrainConfig(data=f"{tmp_path / 'x.jsonl'},{parquet}"), None)


def test_records_subset_keeps_locations():
    records = Records([{"text": "a"}, {"text": "b"}], "d.parquet", [0, 1], ["d.parquet row 0", "d.parquet row 1"])
    assert records.subset([1]).where(0) == "d.parquet row 1"


def test_cli_bad_data_is_one_line_and_writes_nothing(tmp_path, causal_lm_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    out = tmp_path / "run"
    code = main(["train", "--model", str(causal_lm_dir), "--data", str(path), "--out", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"lorakit: error: {path}:2: not UTF-8 text") and "Traceback" not in err
    assert not (out / "adapter").exists()


def test_a_missing_pyarrow_is_named(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # import fails as if not installed
    assert raises(read_records, path) == f"{path}: reading .parquet files needs the package pyarrow (pip install pyarrow)"


def test_cli_trains_on_sharegpt_parquet_and_jsonl_together(tmp_path, causal_lm_dir, capsys):
    conv = [{"from": "human", "value": "is the cat big ?"}, {"from": "gpt", "value": "yes"}]
    a = write_parquet(tmp_path / "a.parquet", [{"conversations": conv}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"conversations": conv}])
    out = tmp_path / "run"
    code = main(["train", "--model", str(causal_lm_dir), "--data", f"{a},{b}", "--out", str(out), "--max-steps", "2",
                 "--per-device-train-batch-size", "2", "--progress", "false"])
    assert code == 0 and (out / "adapter" / "adapter_model.safetensors").exists()
    captured = capsys.readouterr()
    assert "4 examples" in captured.out + captured.err


def test_data_flags_repeat_or_take_commas(tmp_path, tok):
    from lorakit.cli.main import build_parser

    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
    parser = build_parser()
    repeated = parser.parse_args(["train", "--data", str(a), "--data", str(b), "--eval_data", str(b)])
    assert repeated.data == [str(a), str(b)] and repeated.eval_data == str(b)
    assert parser.parse_args(["train", "--data", f"{a},{b}"]).data == f"{a},{b}"
    data = load_datasets(TrainConfig(data=repeated.data, eval_data=repeated.eval_data, max_length=32), tok)
    assert len(data.train) == 3 and len(data.eval) == 1
