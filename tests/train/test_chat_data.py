"""Chat data as users have it: ShareGPT `conversations`, the `tool` role, a `tools` field and assistant
`tool_calls` passed to the chat template; loss only on assistant turns (checked token by token); and a field
the template cannot honour (tools it ignores, a role it drops, images) is an error naming file and line."""

from __future__ import annotations

import json

import pytest

from lorakit.errors import DataError
from lorakit.train.config import TrainConfig
from lorakit.train.data import IGNORE_INDEX, detect_format, encode_lm, load_datasets, read_records
from model_dirs import build_tokenizer

# renders tools (their names) in a system block, every role, and each tool call's name after "say"
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|system|> ' }}{% for t in tools %}{{ t['function']['name'] + ' ' }}{% endfor %}"
    "{{ '</s> ' }}{% endif %}"
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' }}{% if m['content'] %}{{ m['content'] + ' ' }}{% endif %}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}{{ 'say ' + c['function']['name'] + ' ' }}{% endfor %}"
    "{% endif %}{{ '</s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
CALL = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]
TOOL_CHAT = [
    {"role": "user", "content": "what is two plus two ?"},
    {"role": "assistant", "content": None, "tool_calls": CALL},
    {"role": "tool", "content": "four"},
    {"role": "assistant", "content": "the answer is four ."},
]
SHAREGPT = [{"from": "system", "value": "say yes or no ."}, {"from": "human", "value": "is the cat big ?"},
            {"from": "gpt", "value": "yes"}, {"from": "human", "value": "is the dog big ?"},
            {"from": "gpt", "value": "no"}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tools_tok():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def learned_runs(tok, example: dict) -> list[list[str]]:
    """The contiguous runs of tokens that count in the loss, as token strings."""
    runs, current = [], []
    for t, lab in zip(example["input_ids"], example["labels"]):
        assert lab in (IGNORE_INDEX, t)
        if lab != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.convert_ids_to_tokens(run) for run in runs]


def raises(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sharegpt_is_the_same_as_messages(tmp_path, tok):
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": SHAREGPT}])
    records = read_records(path)
    assert detect_format(records) == "sharegpt"
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in SHAREGPT]
    (sg,), _ = encode_lm(records, "sharegpt", tok, 128)
    (ms,), _ = encode_lm([{"messages": messages}], "messages", tok, 128)
    assert sg == ms
    assert learned_runs(tok, sg) == [["yes", "</s>"], ["no", "</s>"]]


def test_sharegpt_through_load_datasets_with_completion_only_false(tmp_path, tok):
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": SHAREGPT}] * 2)
    data = load_datasets(TrainConfig(data=str(path), max_length=128, completion_only=False), tok)
    assert data.format == "sharegpt" and data.task == "causal-lm"
    assert all(ex["labels"] == ex["input_ids"] for ex in data.train)


def test_tool_turns_and_tool_calls_are_rendered_and_only_assistant_turns_learned(tools_tok):
    (ex,), _ = encode_lm([{"messages": TOOL_CHAT, "tools": TOOLS}], "messages", tools_tok, 128)
    text = tools_tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False)
    assert text.startswith("<|system|> add </s> ")
    assert ex["input_ids"] == tools_tok(text, add_special_tokens=False)["input_ids"]
    # the tool call and the final answer count; the tools block, the user and the tool result do not
    assert learned_runs(tools_tok, ex) == [["say", "add", "</s>"], ["the", "answer", "is", "four", ".", "</s>"]]


def test_sharegpt_tool_role(tools_tok):
    conv = [{"from": "human", "value": "add two and two"}, {"from": "tool", "value": "four"},
            {"from": "gpt", "value": "four"}]
    (ex,), _ = encode_lm([{"conversations": conv, "tools": TOOLS}], "sharegpt", tools_tok, 128)
    assert learned_runs(tools_tok, ex) == [["four", "</s>"]]


def test_tools_the_template_ignores_are_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": TOOL_CHAT[2:]}, {"messages": TOOL_CHAT[2:], "tools": TOOLS}])
    records = read_records(path)
    detect_format(records)
    message = raises(encode_lm, records, "messages", tok, 128, source=str(path))
    assert message.startswith(f"{path}:2: field 'tools' is ignored by the tokenizer's chat template")


def test_a_role_or_tool_call_the_template_drops_is_an_error(tmp_path, tok, tools_tok):
    no_tool_role = build_tokenizer()
    no_tool_role.chat_template = TOOLS_TEMPLATE.replace("{% for m in messages %}",
                                                        "{% for m in messages if m['role'] != 'tool' %}")
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": TOOL_CHAT}])
    message = raises(encode_lm, read_records(path), "messages", no_tool_role, 128, source=str(path))
    assert message.startswith(f"{path}:1: the tokenizer's chat template does not render messages[2] (role 'tool')")
    # the test tokenizer's own template renders content only: the tool call would vanish
    calling = [TOOL_CHAT[0], {"role": "assistant", "content": "i will add", "tool_calls": CALL}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": calling}])
    message = raises(encode_lm, read_records(path), "messages", tok, 128, source=str(path))
    assert message.startswith(f"{path}:1: the tokenizer's chat template does not render the tool calls in messages[1]")


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": "hi"}], "images": ["a.png"]}, "field 'images' cannot be used"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "field 'messages[0].content' must be a string, got array"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": CALL}]},
     "messages[0].tool_calls must be an array on an assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": {"name": "add"}}, "field 'tools' must be an array"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "conversations[0] has from 'bot'; expected one of: human"),
    ({"conversations": [{"from": "human"}]}, "conversations[0] must be an object with keys from and value"),
    ({"conversations": []}, "field 'conversations' must be a non-empty array"),
    ({"conversations": [{"from": "gpt", "value": 3}]}, "field 'conversations[0].value' must be a string, got number"),
])
def test_bad_chat_records_name_file_and_line(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "ok"}]}, record]
                       if "messages" in record else [{"conversations": SHAREGPT}, record])
    message = raises(detect_format, read_records(path))
    assert message.startswith(f"{path}:2: ") and expected in message
