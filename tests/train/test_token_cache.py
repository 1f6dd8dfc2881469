"""The token cache: a second load of the same files with the same tokenizer and settings calls the tokenizer
not once and gives identical examples; any change to the data, tokenizer or a token setting misses; a corrupt
entry is rebuilt; LORAKIT_DATA_CACHE=0 and in-memory records write nothing."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerBase

from lorakit.train import cache as token_cache
from lorakit.train.config import TrainConfig
from lorakit.train.data import load_datasets
from model_dirs import build_tokenizer

QA = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {c}"}
      for a, b, c in (("one", "one", "two"), ("two", "two", "four"), ("one", "two", "three"), ("two", "one", "three"))]
CHAT = [{"messages": [{"role": "user", "content": "is the cat big ?"}, {"role": "assistant", "content": "yes"}]}] * 3
LABELS = [{"text": "good dog", "label": "positive"}, {"text": "bad cat", "label": "negative"}] * 3


@pytest.fixture()
def calls(monkeypatch):
    """Counts every call into the tokenizer (encoding and chat templates)."""
    counter = {"n": 0}
    for name in ("__call__", "apply_chat_template", "encode"):
        original = getattr(PreTrainedTokenizerBase, name)

        def counting(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(PreTrainedTokenizerBase, name, counting)
    return counter


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def entries(tmp_path_factory=None):
    return sorted(token_cache.cache_dir().glob("*.safetensors"))


@pytest.mark.parametrize("records, options", [
    (QA, {"eval_fraction": 0.25}), (QA, {"packing": True, "max_length": 8}), (CHAT, {}), (LABELS, {}),
])
def test_a_second_load_does_not_tokenize_and_is_identical(tmp_path, calls, records, options):
    tok = build_tokenizer()
    cfg = TrainConfig(data=write_jsonl(tmp_path / "d.jsonl", records), **options)
    first = load_datasets(cfg, tok)
    assert calls["n"] > 0 and len(entries()) == 1
    calls["n"] = 0
    second = load_datasets(cfg, build_tokenizer())  # another tokenizer object with the same files
    assert calls["n"] == 0
    assert second == first and second.warnings() == first.warnings()


def test_what_changes_tokens_changes_the_key(tmp_path, calls):
    tok = build_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", QA)
    base = load_datasets(TrainConfig(data=path), tok)
    for cfg in (TrainConfig(data=path, max_length=8), TrainConfig(data=path, completion_only=False),
                TrainConfig(data=path, packing=True), TrainConfig(data=path, eval_fraction=0.25)):
        calls["n"] = 0
        assert load_datasets(cfg, tok) != base and calls["n"] > 0
    other = build_tokenizer()
    other.chat_template = "{{ messages }}"
    calls["n"] = 0
    load_datasets(TrainConfig(data=path), other)
    assert calls["n"] > 0
    write_jsonl(tmp_path / "d.jsonl", QA[:3])  # the file's contents changed under the same name
    calls["n"] = 0
    changed = load_datasets(TrainConfig(data=path), tok)
    assert calls["n"] > 0 and len(changed.train) == 3


def test_a_corrupt_entry_is_rebuilt(tmp_path, calls):
    tok = build_tokenizer()
    cfg = TrainConfig(data=write_jsonl(tmp_path / "d.jsonl", QA))
    first = load_datasets(cfg, tok)
    (entry,) = entries()
    for damage in (entry.read_bytes()[:50], b"", b"\x00" * 200):
        entry.write_bytes(damage)
        calls["n"] = 0
        assert load_datasets(cfg, tok) == first and calls["n"] > 0
        assert entry.stat().st_size > 200  # written again, whole
    assert not [p for p in entry.parent.iterdir() if p.suffix == ".tmp"]


def test_cache_off_and_in_memory_records_write_nothing(tmp_path, monkeypatch):
    tok = build_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", QA)
    load_datasets(TrainConfig(data=path), tok, records=QA)
    load_datasets(TrainConfig(data=path), tok, cache=False)
    assert entries() == []
    monkeypatch.setenv("LORAKIT_DATA_CACHE", "0")
    assert token_cache.cache_dir() is None
    load_datasets(TrainConfig(data=path), tok)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAKIT_DATA_CACHE")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "lk"))
    assert token_cache.cache_dir() == tmp_path / "lk" / "data"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert token_cache.cache_dir() == tmp_path / "xdg" / "lorakit" / "data"


def test_bad_data_is_never_cached(tmp_path):
    from lorakit.errors import DataError

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"foo": 1}])
    for _ in range(2):
        with pytest.raises(DataError, match=r"d.jsonl:2: record has keys \['foo'\]"):
            load_datasets(TrainConfig(data=path), build_tokenizer())
    assert entries() == []


def test_the_cache_is_pruned_to_its_budget_least_recently_used_first(tmp_path, monkeypatch):
    tok = build_tokenizer()
    paths = [write_jsonl(tmp_path / f"d{i}.jsonl", QA) for i in range(3)]  # three keys, entries of one size
    load_datasets(TrainConfig(data=paths[0]), tok)
    (first,) = entries()
    load_datasets(TrainConfig(data=paths[1]), tok)
    (second,) = [p for p in entries() if p != first]
    import os

    os.utime(second, (1, 1))  # the second entry is now the least recently used
    load_datasets(TrainConfig(data=paths[0]), tok)  # a hit touches the first entry
    budget = first.stat().st_size + second.stat().st_size + 10  # room for two entries, not three
    monkeypatch.setenv("LORAKIT_DATA_CACHE_MAX_MB", str(budget / 2**20))
    load_datasets(TrainConfig(data=paths[2]), tok)
    left = entries()
    assert first in left and second not in left and len(left) == 2
    monkeypatch.setenv("LORAKIT_DATA_CACHE_MAX_MB", "0")  # a budget below one entry keeps the newest only
    load_datasets(TrainConfig(data=paths[1]), tok)
    assert len(entries()) == 1 and entries()[0] not in left
