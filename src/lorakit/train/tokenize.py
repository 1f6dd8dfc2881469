"""Records -> token ids and loss labels for `lorakit train` (the reading and checking is in `data.py`).

Causal LM examples are ``{"input_ids": [...], "labels": [...]}`` with ``labels[i]`` either ``input_ids[i]``
(the token counts in the loss) or ``IGNORE_INDEX`` (-100, masked). Labels are *not* shifted: the model
shifts them, as every Hugging Face causal LM does. Which tokens count is decided on characters, then mapped
to tokens through the fast tokenizer's offsets: the rendered text of an example is one string, and the
completion (or each assistant turn) is a character span of it. A token counts when it overlaps a span, so
a token that straddles the boundary (" four" after "Answer:") is part of the completion.

- ``text``: every token counts; an EOS is appended.
- ``prompt_completion`` / ``alpaca``: prompt tokens are masked (``completion_only=True``), the completion
  and the appended EOS count.
- ``messages``: rendered with the tokenizer's chat template; only assistant turns count, from the start of
  the assistant's content to the end of its turn as the template renders it (end-of-turn marker included).
  The span of turn i is found by rendering the conversation up to it (with the generation prompt) and up to
  and including it, and taking the lengths of those prefixes. Nothing is appended: the template ends turns.
  ``sharegpt`` records are rendered as their messages; ``tools`` go to the template (`apply_chat_template(...,
  tools=...)`), and a turn, tool call or tools field the template leaves out raises DataError.

Classification examples are ``{"input_ids": [...], "label": class_id}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .chat import to_messages
from .readers import where

IGNORE_INDEX = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

Span = tuple[int, int]


@dataclass
class DataStats:
    """What encoding one data set did; `warnings()` gives the lines the caller should print."""

    records: int = 0  # records read
    examples: int = 0  # examples produced (blocks, with packing)
    truncated: int = 0  # examples longer than max_length, cut to it
    dropped: int = 0  # examples (or packed blocks) with no label token left, left out
    tokens: int = 0  # tokens in the examples produced
    label_tokens: int = 0  # of which count in the loss (causal LM; = examples for classification)
    max_length: int = 0
    source: str = ""  # the file the records came from

    def warnings(self) -> list[str]:
        src = self.source or "data"
        out = []
        if self.truncated:
            out.append(f"{src}: {self.truncated} of {self.records} examples are longer than "
                       f"max_length={self.max_length} tokens and were truncated")
        if self.dropped:
            out.append(f"{src}: {self.dropped} examples had no token left to learn from (no completion or "
                       f"assistant turn within max_length={self.max_length}) and were dropped")
        return out


def render_prompt(record: dict[str, Any], fmt: str) -> str:
    """The prompt part of a `prompt_completion` or `alpaca` record, as the model sees it in training."""
    if fmt == "prompt_completion":
        return record["prompt"]
    if fmt == "alpaca":
        if record.get("input"):
            return ALPACA_PROMPT.format(instruction=record["instruction"], input=record["input"])
        return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])
    raise ValueError(f"format {fmt!r} has no prompt")


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# -- causal LM -----------------------------------------------------------------------------------------------
def encode_lm(
    records: Sequence[dict[str, Any]],
    fmt: str,
    tokenizer: Any,
    max_length: int,
    completion_only: bool = True,
    packing: bool = False,
    source: str = "",
) -> tuple[list[dict[str, list[int]]], DataStats]:
    """Tokenise checked records of one LM format (see `data.detect_format`) into examples + stats.

    Without packing, an example longer than `max_length` is cut to it (counted in `truncated`) and one with
    no label token left after position 0 is dropped (counted in `dropped`). With packing, the examples
    (each ending with EOS) are concatenated and cut into blocks of `max_length` tokens (the last one may be
    shorter); an example runs on into the next block instead of being truncated, and blocks with nothing to
    learn are dropped.
    """
    stats = DataStats(records=len(records), max_length=max_length, source=source)
    eos = tokenizer.eos_token_id
    if fmt in ("messages", "sharegpt") and getattr(tokenizer, "chat_template", None) is None:
        keys = "{messages}" if fmt == "messages" else "{conversations}"
        raise DataError(f"{source or 'data'}: {keys} records need a tokenizer with a chat template, and this "
                        "one has none (use {prompt, completion} records instead)")
    rendered = [_render_lm(rec, fmt, tokenizer, completion_only, where(records, i, source))
                for i, rec in enumerate(records)]
    special = fmt not in ("messages", "sharegpt")  # chat templates write their own BOS
    encoded = tokenize_with_spans(tokenizer, [r[0] for r in rendered], [r[1] for r in rendered], special)
    pairs = []
    for (_, spans, append_eos), (ids, mask) in zip(rendered, encoded):
        if spans is None:  # everything counts
            mask = [True] * len(ids)
        if append_eos and eos is not None:
            if ids and ids[-1] == eos:  # the tokenizer adds EOS itself: count it as ours
                ids, mask = ids[:-1], mask[:-1]
            ids, mask = ids + [eos], mask + [True]
        pairs.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]))
    if packing:
        examples = _pack(pairs, max_length, eos, stats)
    else:
        examples = []
        for ids, labels in pairs:
            if len(ids) > max_length:
                ids, labels = ids[:max_length], labels[:max_length]
                stats.truncated += 1
            if not _learnable(labels[1:]):  # the label at position 0 is never predicted
                stats.dropped += 1
                continue
            examples.append({"input_ids": ids, "labels": labels})
    stats.examples = len(examples)
    stats.tokens = sum(len(ex["input_ids"]) for ex in examples)
    stats.label_tokens = sum(sum(lab != IGNORE_INDEX for lab in ex["labels"]) for ex in examples)
    return examples, stats


def _learnable(labels: Sequence[int]) -> bool:
    return any(lab != IGNORE_INDEX for lab in labels)


def _pack(pairs: list[tuple[list[int], list[int]]], max_length: int, eos: int | None,
          stats: DataStats) -> list[dict[str, list[int]]]:
    ids_stream: list[int] = []
    label_stream: list[int] = []
    for ids, labels in pairs:
        if not _learnable(labels):
            stats.dropped += 1
            continue
        ids_stream += ids
        label_stream += labels
        if eos is not None and ids[-1] != eos:  # a messages example: separate it from the next one
            ids_stream.append(eos)
            label_stream.append(eos if labels[-1] != IGNORE_INDEX else IGNORE_INDEX)
    blocks = []
    for start in range(0, len(ids_stream), max_length):
        labels = label_stream[start:start + max_length]
        if not _learnable(labels[1:]):
            stats.dropped += 1
            continue
        blocks.append({"input_ids": ids_stream[start:start + max_length], "labels": labels})
    return blocks


def _render_lm(record: dict[str, Any], fmt: str, tokenizer: Any, completion_only: bool,
               where: str) -> tuple[str, list[Span] | None, bool]:
    """(text, character spans that count in the loss or None for all, whether to append EOS)."""
    if fmt == "text":
        return record["text"], None, True
    if fmt in ("prompt_completion", "alpaca"):
        prompt = render_prompt(record, fmt)
        text = prompt + record["completion" if fmt == "prompt_completion" else "output"]
        return text, [(len(prompt), len(text))] if completion_only else None, True
    if fmt in ("messages", "sharegpt"):
        messages, tools = to_messages(record, fmt), record.get("tools") or None
        text = _chat(tokenizer, messages, tools, where)
        check_rendered(tokenizer, messages, tools, text, where)
        spans = assistant_spans(tokenizer, messages, text, tools) if completion_only else None
        return text, spans, False
    raise ValueError(f"not a causal LM format: {fmt!r}")


def _chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
          where: str) -> str:
    try:
        return _apply(tokenizer, messages, False, tools)
    except Exception as err:  # jinja errors, raise_exception() in the template, ...
        raise DataError(f"{where}: the tokenizer's chat template failed on a conversation: "
                        f"{type(err).__name__}: {err}") from err


def _apply(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool,
           tools: list[dict[str, Any]] | None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **kwargs)


def check_rendered(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                   text: str, where: str) -> None:
    """DataError if the chat template drops something the record holds: a turn (checked by rendering each
    turn's content as a marker), tool calls or the `tools` field (the text is identical without them)."""
    marked = [dict(m, content=f"lorakit_turn_{j}_marker") if isinstance(m.get("content"), str) and m["content"]
              else m for j, m in enumerate(messages)]
    try:
        rendered = _apply(tokenizer, marked, False, tools)
    except Exception:  # a template that inspects the content itself: the real render worked, trust it
        rendered = None
    for j, message in enumerate(messages):
        if rendered is not None and marked[j] is not message and f"lorakit_turn_{j}_marker" not in rendered:
            raise DataError(f"{where}: the tokenizer's chat template does not render messages[{j}] (role "
                            f"{message['role']!r}); use a template that supports this role")
    calls = [j for j, m in enumerate(messages) if m.get("tool_calls")]
    if calls:
        plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if _try_chat(tokenizer, plain, False, tools) == text:
            raise DataError(f"{where}: the tokenizer's chat template does not render the tool calls in "
                            f"messages[{calls[0]}] (the text is the same without them); use a template that "
                            "renders tool_calls")
    if tools and _apply(tokenizer, messages, False, None) == text:
        raise DataError(f"{where}: field 'tools' is ignored by the tokenizer's chat template (the text is "
                        "the same without it); use a template that renders tools, or remove the field")


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], text: str,
                    tools: list[dict[str, Any]] | None = None) -> list[Span]:
    """Character spans of `text` (the rendered conversation) that belong to assistant turns."""
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message.get("content") or ""
        # the conversation rendered up to this turn (with the generation prompt), and through it
        before = _try_chat(tokenizer, messages[:i], True, tools) if i else None
        through = _try_chat(tokenizer, messages[:i + 1], False, tools)
        if before is not None and text.startswith(before) and len(before) >= cursor:
            start = len(before)
        else:  # a template that renders a prefix differently: find the content itself
            start = text.find(content, cursor) if content else -1
        if start < 0:
            continue  # the template does not render this turn verbatim: it cannot count
        if through is not None and text.startswith(through) and len(through) > start:
            end = len(through)
        else:
            end = start + len(content)
        spans.append((start, end))
        cursor = end
    return spans


def _try_chat(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool,
              tools: list[dict[str, Any]] | None = None) -> str | None:
    try:
        return _apply(tokenizer, messages, generation_prompt, tools)
    except Exception:  # some templates refuse a partial conversation (raise_exception, ...)
        return None


def tokenize_with_spans(tokenizer: Any, texts: list[str], spans: list[list[Span] | None],
                        add_special_tokens: bool, use_offsets: bool | None = None,
                        ) -> list[tuple[list[int], list[bool]]]:
    """Token ids of each text, and for each token whether it overlaps one of the text's character spans.

    Fast tokenizers map tokens to characters with their offsets (`use_offsets`, the default where
    available). Otherwise the token boundary of a character position p is the token count of text[:p]
    (exact when the tokenizer does not merge across p, true at the template and prompt boundaries in
    practice).
    """
    if use_offsets is None:
        use_offsets = bool(getattr(tokenizer, "is_fast", False))
    if not texts:
        return []
    if use_offsets:
        enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        out = []
        for ids, offsets, text_spans in zip(enc["input_ids"], enc["offset_mapping"], spans):
            mask = [any(max(a, s) < min(b, e) for s, e in (text_spans or ())) for a, b in offsets]
            out.append((list(ids), mask))
        return out
    return [_count_tokens(tokenizer, text, text_spans, add_special_tokens) for text, text_spans in zip(texts, spans)]


def _count_tokens(tokenizer: Any, text: str, spans: list[Span] | None,
                  add_special_tokens: bool) -> tuple[list[int], list[bool]]:
    """The fallback of `tokenize_with_spans`: span boundaries from token counts of text prefixes."""
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = next((k for k in range(len(ids) - len(plain) + 1) if ids[k:k + len(plain)] == plain), 0)

    def boundary(pos: int) -> int:
        return lead + len(tokenizer(text[:pos], add_special_tokens=False)["input_ids"]) if pos else lead

    mask = [False] * len(ids)
    for s, e in spans or ():
        for k in range(boundary(s), min(boundary(e), len(ids))):
            mask[k] = True
    return ids, mask


# -- classification ------------------------------------------------------------------------------------------
def build_label2id(labels: Sequence[str | int], source: str = "") -> dict[str, int]:
    """Deterministic label -> class id: integers 0..n-1 are kept; other integers and strings are numbered
    in sorted order. Keys are strings (as in a model config's label2id)."""
    src = source or "data"
    if all(isinstance(lab, int) and not isinstance(lab, bool) for lab in labels):
        unique: list[Any] = sorted(set(labels))
    elif all(isinstance(lab, str) for lab in labels):
        unique = sorted(set(labels))
    else:
        raise DataError(f"{src}: labels must be all strings or all integers; found both")
    if len(unique) < 2:
        raise DataError(f"{src}: classification needs at least 2 distinct labels; found {unique}")
    return {str(lab): i for i, lab in enumerate(unique)}


def encode_classification(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    label2id: dict[str, int] | None = None,
    source: str = "",
) -> tuple[list[dict[str, Any]], dict[str, int], DataStats]:
    """Tokenise checked `{text, label}` records into ``{"input_ids", "label"}`` examples.

    `label2id` (e.g. the training set's, for the eval set) defaults to `build_label2id` of these labels;
    a label missing from it raises DataError. Texts longer than `max_length` are truncated (by the
    tokenizer, so special tokens such as [SEP] stay) and counted.
    """
    src = source or "data"
    if label2id is None:
        label2id = build_label2id([rec["label"] for rec in records], source)
    stats = DataStats(records=len(records), max_length=max_length, source=source)
    texts = [rec["text"] for rec in records]
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    examples = []
    for rec, ids in zip(records, enc):
        key = str(rec["label"])
        if key not in label2id:
            raise DataError(f"{src}: label {rec['label']!r} is not one of the training labels "
                            f"({', '.join(label2id)})")
        if len(ids) > max_length:
            stats.truncated += 1
            ids = tokenizer(rec["text"], add_special_tokens=True, truncation=True, max_length=max_length)[
                "input_ids"]
        examples.append({"input_ids": list(ids), "label": label2id[key]})
    stats.examples = stats.label_tokens = len(examples)
    stats.tokens = sum(len(ex["input_ids"]) for ex in examples)
    return examples, label2id, stats
