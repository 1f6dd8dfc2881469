"""The data layer of `lorakit train`: reading files, format detection, loss masks (checked token by token
with the tiny word-level tokenizer), packing, truncation counts, the validation split, collation, and a
clear one-line DataError for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorakit.errors import DataError, LorakitError
from lorakit.train.config import TrainConfig
from lorakit.train.data import (
    EXPECTED,
    IGNORE_INDEX,
    Records,
    collate_classification,
    collate_lm,
    detect_format,
    encode_classification,
    encode_lm,
    load_datasets,
    pad_token_id,
    read_records,
    render_prompt,
    split_records,
)
from lorakit.train.tokenize import assistant_spans, tokenize_with_spans
from model_dirs import build_tokenizer

QA = {"prompt": "question : what is two plus two ?\nanswer :", "completion": " four"}
CHAT = [
    {"role": "system", "content": "say yes or no ."},
    {"role": "user", "content": "is the cat big ?"},
    {"role": "assistant", "content": "yes , the cat is big ."},
    {"role": "user", "content": "is the dog small ?"},
    {"role": "assistant", "content": "no"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def words(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def learned(example: dict) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def check_labels(example: dict) -> None:
    """Every label is the input token at that position, or masked."""
    assert len(example["labels"]) == len(example["input_ids"])
    assert all(lab in (IGNORE_INDEX, t) for lab, t in zip(example["labels"], example["input_ids"]))


def write_jsonl(path: Path, records: list, blank_after_first: bool = False) -> Path:
    lines = [json.dumps(r) for r in records]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def raises(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# -- each format, end to end ---------------------------------------------------------------------------------
def test_text_counts_every_token_and_ends_with_eos(tok):
    (ex,), stats = encode_lm([{"text": "the cat is big ."}], "text", tok, 64)
    assert ex["input_ids"] == [tok.bos_token_id] + words(tok, "the cat is big .") + [tok.eos_token_id]
    assert ex["labels"] == ex["input_ids"]
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (1, 1, 0, 0)
    assert stats.tokens == stats.label_tokens == 7


def test_prompt_completion_masks_the_prompt(tok):
    (ex,), stats = encode_lm([QA], "prompt_completion", tok, 64)
    check_labels(ex)
    assert ex["input_ids"] == tok(QA["prompt"] + QA["completion"])["input_ids"] + [tok.eos_token_id]
    assert learned(ex) == words(tok, "four") + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(learned(ex)) == ["four", "</s>"]
    assert ex["labels"][:-2] == [IGNORE_INDEX] * (len(ex["input_ids"]) - 2)  # the completion is the suffix
    assert stats.label_tokens == 2


def test_completion_only_false_counts_the_prompt(tok):
    for fmt, rec in (("prompt_completion", QA), ("messages", {"messages": CHAT}),
                     ("alpaca", {"instruction": "add two and two", "output": "four"})):
        (ex,), _ = encode_lm([rec], fmt, tok, 128, completion_only=False)
        assert ex["labels"] == ex["input_ids"], fmt


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_masks_the_rendered_prompt(tok, with_input):
    rec = {"instruction": "translate to french", "input": "hello" if with_input else "", "output": "the answer"}
    prompt = render_prompt(rec, "alpaca")
    assert prompt.startswith("### Instruction:\ntranslate to french\n\n") and prompt.endswith("### Response:\n")
    assert ("### Input:\nhello\n\n" in prompt) == with_input
    (ex,), _ = encode_lm([rec], "alpaca", tok, 128)
    check_labels(ex)
    assert ex["input_ids"] == tok(prompt + "the answer")["input_ids"] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(learned(ex)) == ["the", "answer", "</s>"]
    if not with_input:  # an empty, absent or null input renders the same prompt
        for rec_input in ({}, {"input": None}):
            other = {"instruction": rec["instruction"], "output": rec["output"], **rec_input}
            assert encode_lm([other], "alpaca", tok, 128)[0] == [ex]


def test_messages_count_only_assistant_turns(tok):
    (ex,), _ = encode_lm([{"messages": CHAT}], "messages", tok, 128)
    check_labels(ex)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert ex["input_ids"] == words(tok, rendered)  # the template's tokens, nothing added
    eos = tok.eos_token_id
    assert learned(ex) == words(tok, "yes , the cat is big .") + [eos] + words(tok, "no") + [eos]
    # each assistant turn is one contiguous run of labels, starting right after "<|assistant|>"
    runs, prev = [], IGNORE_INDEX
    for i, lab in enumerate(ex["labels"]):
        if lab != IGNORE_INDEX and prev == IGNORE_INDEX:
            runs.append(i)
        prev = lab
    assert len(runs) == 2
    assert all(ex["input_ids"][i - 1] == tok.convert_tokens_to_ids("<|assistant|>") for i in runs)


def test_messages_without_an_assistant_turn_are_dropped(tok):
    records = [{"messages": CHAT[:2]}, {"messages": CHAT}]
    examples, stats = encode_lm(records, "messages", tok, 128)
    assert len(examples) == 1 and stats.dropped == 1 and stats.records == 2
    assert any("dropped" in w for w in stats.warnings())


def test_messages_starting_with_the_assistant(tok):
    conv = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "thank you"}]
    (ex,), _ = encode_lm([{"messages": conv}], "messages", tok, 64)
    assert tok.convert_ids_to_tokens(learned(ex)) == ["hello", "</s>"]


def test_messages_need_a_chat_template(tok):
    plain = build_tokenizer()
    plain.chat_template = None
    message = raises(encode_lm, [{"messages": CHAT}], "messages", plain, 64, source="chat.jsonl")
    assert message.startswith("chat.jsonl: {messages} records need a tokenizer with a chat template")


def test_token_count_fallback_agrees_with_offsets(tok):
    """Without offsets (slow tokenizers) the span boundaries come from token counts of prefixes."""
    text = tok.apply_chat_template(CHAT, tokenize=False)
    cases = [([text], [assistant_spans(tok, CHAT, text)], False),
             ([QA["prompt"] + QA["completion"]], [[(len(QA["prompt"]), len(QA["prompt"]) + 5)]], True)]
    for texts, spans, special in cases:
        fast = tokenize_with_spans(tok, texts, spans, special, use_offsets=True)
        slow = tokenize_with_spans(tok, texts, spans, special, use_offsets=False)
        assert fast == slow
        assert any(fast[0][1]) and not all(fast[0][1])


# -- truncation, dropping, packing ---------------------------------------------------------------------------
def test_truncation_is_counted(tok):
    records = [{"text": "one two three four five six seven"}, {"text": "one two"}, {"text": "a b c d e f"}]
    examples, stats = encode_lm(records, "text", tok, 6)
    assert [len(ex["input_ids"]) for ex in examples] == [6, 4, 6]
    assert (stats.truncated, stats.dropped, stats.examples) == (2, 0, 3)
    assert examples[0]["input_ids"] == [tok.bos_token_id] + words(tok, "one two three four five")
    (warning,) = stats.warnings()
    assert "2 of 3 examples" in warning and "max_length=6" in warning


def test_examples_with_nothing_left_to_learn_are_dropped(tok):
    long_prompt = {"prompt": "one two three four five six seven eight nine ten", "completion": " yes"}
    cut_completion = {"prompt": "one two", "completion": " three four five six seven eight"}
    short = {"prompt": "one plus one ?", "completion": " two"}
    examples, stats = encode_lm([long_prompt, cut_completion, short], "prompt_completion", tok, 8)
    assert (stats.truncated, stats.dropped, stats.examples) == (2, 1, 2)
    assert tok.convert_ids_to_tokens(learned(examples[0])) == ["three", "four", "five", "six", "seven"]
    assert len(stats.warnings()) == 2


def test_packing_makes_full_blocks_and_keeps_the_masks(tok):
    records = [{"prompt": f"question : {w} plus {w} ?", "completion": f" {w}"}
               for w in ("one two three four five six seven eight nine".split())]
    plain, _ = encode_lm(records, "prompt_completion", tok, 512)
    blocks, stats = encode_lm(records, "prompt_completion", tok, 12, packing=True)
    stream = [t for ex in plain for t in ex["input_ids"]]
    assert len(stream) == 9 * 9
    assert [len(b["input_ids"]) for b in blocks] == [12] * 6 + [9]
    assert [t for b in blocks for t in b["input_ids"]] == stream
    assert [t for b in blocks for t in b["labels"]] == [t for ex in plain for t in ex["labels"]]
    assert (stats.examples, stats.truncated, stats.dropped, stats.tokens) == (7, 0, 0, 81)
    assert all(ex["input_ids"][-1] == tok.eos_token_id for ex in plain)  # each example ends with EOS


def test_packing_runs_long_examples_on_and_drops_masked_blocks(tok):
    prompt = " ".join("one two three four five six seven eight nine ten".split() * 2)
    blocks, stats = encode_lm([{"prompt": prompt, "completion": " yes"}], "prompt_completion", tok, 8,
                              packing=True)
    assert len(blocks) == 1 and stats.dropped == 2 and stats.truncated == 0  # 23 tokens: 2 blocks of prompt
    assert tok.convert_ids_to_tokens(learned(blocks[0])) == ["yes", "</s>"]
    messages, _ = encode_lm([{"messages": CHAT}] * 3, "messages", tok, 20, packing=True)
    assert sum(len(b["input_ids"]) for b in messages) == 3 * len(words(tok, tok.apply_chat_template(
        CHAT, tokenize=False)))  # the template's "</s>" already ends each conversation


# -- classification ------------------------------------------------------------------------------------------
def test_csv_classification(tmp_path, tok):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label\n"good dog, happy",positive\nbad cat,negative\n\nthe bird is red,positive\n')
    records = read_records(path)
    assert records.lines == [2, 3, 5] and detect_format(records) == "classification"
    examples, label2id, stats = encode_classification(records, tok, 32)
    assert label2id == {"negative": 0, "positive": 1}
    assert [ex["label"] for ex in examples] == [1, 0, 1]
    assert examples[0]["input_ids"] == tok("good dog, happy")["input_ids"]
    assert stats.examples == 3 and stats.truncated == 0


def test_integer_labels(tmp_path, tok):
    path = tmp_path / "digits.csv"
    path.write_text("label,text\n1,one\n0,zero\n2,two\n")
    records = read_records(path)
    assert [r["label"] for r in records] == [1, 0, 2]
    _, label2id, _ = encode_classification(records, tok, 32)
    assert label2id == {"0": 0, "1": 1, "2": 2}
    ratings = [{"text": "good", "label": 5}, {"text": "bad", "label": 1}, {"text": "ok", "label": 3}]
    examples, label2id, _ = encode_classification(ratings, tok, 32)
    assert label2id == {"1": 0, "3": 1, "5": 2} and [ex["label"] for ex in examples] == [2, 0, 1]


def test_classification_truncation_keeps_special_tokens(tok):
    records = [{"text": "one two three four five six", "label": "a"}, {"text": "one", "label": "b"}]
    examples, _, stats = encode_classification(records, tok, 4)
    assert stats.truncated == 1 and [len(ex["input_ids"]) for ex in examples] == [4, 2]
    assert examples[0]["input_ids"][0] == tok.bos_token_id


# -- split, collate ------------------------------------------------------------------------------------------
def test_split_is_deterministic_and_disjoint():
    records = Records([{"text": str(i)} for i in range(20)], "d.jsonl", lines=range(3, 23))
    train, held = split_records(records, 0.25, seed=7)
    assert len(held) == 5 and len(train) == 15
    assert sorted([r["text"] for r in train + held], key=int) == [str(i) for i in range(20)]
    again = split_records(records, 0.25, seed=7)
    assert again == (train, held)
    assert split_records(records, 0.25, seed=8)[1] != held
    assert [r["text"] for r in held] == sorted((r["text"] for r in held), key=int)  # file order kept
    assert held.lines == [int(r["text"]) + 3 for r in held] and held.path == "d.jsonl"
    assert split_records(records, 0.0, seed=7) == (records, [])
    assert len(split_records(records[:3], 0.01, seed=0)[1]) == 1  # at least one record held out
    assert "too few" in raises(split_records, records[:1], 0.5, 0)


def test_collate_lm_pads_right():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9, 10, 11, 12],
                                                               "labels": [8, 9, 10, 11, 12]}]
    out = collate_lm(batch, pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (2, 5) and t.dtype == torch.long for t in out.values())
    assert out["input_ids"][0].tolist() == [5, 6, 7, 0, 0]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0] and out["attention_mask"][1].all()
    assert out["labels"][0].tolist() == [-100, 6, 7, -100, -100]


def test_collate_classification():
    out = collate_classification([{"input_ids": [2, 9], "label": 1}, {"input_ids": [2], "label": 0}], pad_id=3)
    assert out["input_ids"].tolist() == [[2, 9], [2, 3]]
    assert out["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert out["labels"].tolist() == [1, 0] and out["labels"].dtype == torch.long


def test_pad_token_id(tok):
    assert pad_token_id(tok) == tok.pad_token_id
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=3)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


# -- load_datasets: one call for the training loop -----------------------------------------------------------
def test_load_datasets_causal_lm(tmp_path, tok):
    records = [{"prompt": f"what is {w} ?", "completion": f" {w}"} for w in "one two three four five six seven eight".split()]
    cfg = TrainConfig(data=str(write_jsonl(tmp_path / "qa.jsonl", records)), eval_fraction=0.25, max_length=32)
    data = load_datasets(cfg, tok)
    assert (data.task, data.format, len(data.train), len(data.eval)) == ("causal-lm", "prompt_completion", 6, 2)
    assert data.label2id is None and data.warnings() == [] and data.pad_id == tok.pad_token_id
    assert load_datasets(cfg, tok).eval == data.eval  # the same seed holds out the same records
    batch = data.collate(data.train[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    # a separate eval file may use another causal LM format
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    data = load_datasets(TrainConfig(data=cfg.data, eval_data=str(tmp_path / "chat.jsonl"), max_length=64), tok)
    assert len(data.train) == 8 and len(data.eval) == 1 and data.eval_format == "messages"


def test_load_datasets_classification(tmp_path, tok):
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"{w} good,pos\n{w} bad,neg\n" for w in "a the one two".split()))
    data = load_datasets(TrainConfig(data=str(path), eval_fraction=0.25, max_length=16), tok)
    assert data.task == "classification" and data.label2id == {"neg": 0, "pos": 1} and data.num_labels == 2
    assert data.id2label == {0: "neg", 1: "pos"} and len(data.train) == 6 and len(data.eval) == 2
    assert data.collate(data.eval)["labels"].shape == (2,)
    bad_eval = write_jsonl(tmp_path / "eval.jsonl", [{"text": "good", "label": "neutral"}])
    message = raises(load_datasets, TrainConfig(data=str(path), eval_data=str(bad_eval)), tok)
    assert message.startswith(f"{bad_eval}: label 'neutral' is not one of the training labels (neg, pos)")


def test_task_and_data_must_agree(tmp_path, tok):
    lm = str(write_jsonl(tmp_path / "lm.jsonl", [QA]))
    cls = str(write_jsonl(tmp_path / "cls.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]))
    message = raises(load_datasets, TrainConfig(data=lm, task="classification"), tok)
    assert message == f"{lm}: task classification needs {{text, label}} records; found {{prompt, completion}} records"
    message = raises(load_datasets, TrainConfig(data=cls, task="causal-lm"), tok)
    assert message.startswith(f"{cls}: task causal-lm needs {{text}} | {{prompt, completion}}")
    message = raises(load_datasets, TrainConfig(data=lm, eval_data=cls), tok)
    assert message.startswith(f"{cls}: task causal-lm needs")
    assert load_datasets(TrainConfig(data=cls), tok).task == "classification"


def test_nothing_left_to_train_on(tmp_path, tok):
    path = str(write_jsonl(tmp_path / "long.jsonl", [{"prompt": "one two three four five six", "completion": " x"}]))
    assert "no example left to train on" in raises(load_datasets, TrainConfig(data=path, max_length=4), tok)


# -- bad input: one clear line each --------------------------------------------------------------------------
def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",,}\n')
    assert raises(read_records, path).startswith(f"{path}:3: invalid JSON: ")
    path.write_text('{"text": "a"}\n["text"]\n')
    assert raises(read_records, path) == f"{path}:2: expected a JSON object per line, got array"


def test_blank_lines_are_allowed(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}], blank_after_first=True)
    records = read_records(path)
    assert records == [{"text": "a"}, {"text": "b"}] and records.lines == [1, 3]


def test_unknown_record_names_the_expected_formats(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}, {"foo": 1}])
    message = raises(detect_format, read_records(path))
    assert message == (f"{path}:3: record has keys ['foo']; expected one of: {{text}} | {{prompt, completion}}"
                       " | {instruction, input, output} | {messages} | {conversations} | {text, label}")
    assert EXPECTED in message


def test_mixed_formats_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}, QA])
    message = raises(detect_format, read_records(path))
    assert message == f"{path}:3: record is {{prompt, completion}} but line 1 is {{text}}; all records must share one format"


def test_empty_missing_and_unsupported_files(tmp_path):
    empty = tmp_path / "data.jsonl"
    empty.write_text("\n  \n")
    assert raises(read_records, empty) == f"{empty}: no records"
    header_only = tmp_path / "data.csv"
    header_only.write_text("text,label\n")
    assert raises(read_records, header_only) == f"{header_only}: no records"
    assert raises(read_records, tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"
    txt = tmp_path / "data.txt"
    txt.write_text("hello\n")
    assert raises(read_records, txt).startswith(f"{txt}: unsupported file type '.txt'; expected .jsonl")
    assert "is a directory" in raises(read_records, tmp_path)


def test_bad_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,class\nhello,1\n")
    assert raises(read_records, path) == (f"{path}: a CSV file needs a header row with columns text,label (or "
                                          "text, prompt,completion, instruction,input,output); found "
                                          "['sentence', 'class']")
    path.write_text("text,label\nhello,1\nworld\n")
    assert raises(read_records, path).startswith(f"{path}:3: row has 1 fields")


def test_bad_messages(tmp_path):
    conv = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "42"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": conv}])
    assert raises(detect_format, read_records(path)) == (
        f"{path}:2: messages[1] has role 'robot'; expected one of: system, user, assistant, tool")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user"}]}])
    assert "messages[0] must be an object with keys role and content" in raises(detect_format, read_records(path))
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": []}])
    assert "non-empty array" in raises(detect_format, read_records(path))


def test_bad_field_types_and_labels(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": 3, "completion": "x"}])
    assert raises(detect_format, read_records(path)) == f"{path}:1: field 'prompt' must be a string, got number"
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": 1.5}])
    assert "field 'label' must be a non-empty string or an integer" in raises(detect_format, read_records(path))
    mixed = [{"text": "a", "label": 1}, {"text": "b", "label": "x"}]
    assert "all strings or all integers" in raises(encode_classification, mixed, tok, 8, source="m.jsonl")
    one = [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]
    assert "at least 2 distinct labels; found ['x']" in raises(encode_classification, one, tok, 8)


def test_data_error_is_a_lorakit_error():
    assert issubclass(DataError, LorakitError) and issubclass(DataError, ValueError)


def test_a_saved_tokenizer_keeps_its_chat_template(tmp_path, causal_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(causal_lm_dir)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:3]}])
    data = load_datasets(TrainConfig(data=str(path), max_length=64), tok)
    assert data.format == "messages" and len(data.train) == 2
    assert tok.convert_ids_to_tokens(learned(data.train[1])) == words_of("yes , the cat is big .") + ["</s>"]


def words_of(text: str) -> list[str]:
    return text.split()
