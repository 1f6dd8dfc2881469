"""OpenAI's API as `lorakit serve` speaks it (the shapes vLLM serves): request bodies parsed and checked into
typed requests, and the response objects built from results. Pure functions of JSON values; no I/O.

    parse_json(raw) -> dict                        400 for malformed JSON or a body that is not an object
    parse_completion(body, max_n) -> GenerateRequest    POST /v1/completions
    parse_chat(body, max_n) -> GenerateRequest          POST /v1/chat/completions
    completion_response(...) / chat_response(...) / *_chunk(...)   the JSON objects sent back

Every refusal is a ServeError(400) naming the field, so a bad body never reaches the engine.
Reference: https://platform.openai.com/docs/api-reference/completions, .../chat
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, overload

from .params import SamplingParams, ServeError

MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused (413) before it is parsed
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options",
                 "user", "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                               "tool_choice", "functions", "function_call", "response_format",
                               "parallel_tool_calls"}
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass(frozen=True)
class GenerateRequest:
    """A checked completion or chat request: what to generate from, for which model, how many, and how."""

    model: str  # the "model" field: the base name, an adapter, a mix "a:0.7+b:0.3" or "auto"
    params: SamplingParams  # sampling of choice 0; choice i gets seed + i when a seed is given
    n: int  # choices to generate
    stream: bool  # server-sent events instead of one JSON object
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage counts
    prompt: str | None = None  # /v1/completions
    messages: tuple[dict[str, str], ...] = ()  # /v1/chat/completions: {"role", "content"} with text content

    @property
    def route_text(self) -> str:
        """The text "auto" routing embeds: the prompt, or the last user message of a chat."""
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else (self.messages[-1]["content"] if self.messages else "")


def bad(message: str, param: str | None = None, code: str | None = None) -> ServeError:
    """A 400 invalid_request_error naming `param`."""
    return ServeError(400, message, param=param, code=code)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The JSON object in a request body.

    Raises:
        ServeError: 413 for a body over MAX_BODY_BYTES; 400 for text that is not UTF-8 JSON (NaN and Infinity
            included) or JSON that is not an object.
    """
    if len(raw) > MAX_BODY_BYTES:
        raise ServeError(413, f"the request body has {len(raw)} bytes, more than the {MAX_BODY_BYTES} accepted")
    if not raw.strip():
        raise bad("the request body is empty; expected a JSON object")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as err:
        raise bad(f"the request body is not UTF-8 ({err.reason} at byte {err.start})") from err
    except ValueError as err:  # json.JSONDecodeError is a ValueError, as is a NaN refused above
        raise bad(f"the request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got a JSON {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    """Raises: ServeError: the first field of `body` not in `allowed` (sorted, so the message is stable)."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(allowed))}", param=unknown[0])


def get_str(body: dict[str, Any], key: str, required: bool = False) -> str | None:
    """Raises: ServeError: a missing required field, or a value that is not a string."""
    value = body.get(key)
    if value is None:
        if required:
            raise bad(f"missing required field {key!r}", param=key)
        return None
    if not isinstance(value, str):
        raise bad(f"{key} must be a string, got a JSON {_json_type(value)}", param=key)
    return value


@overload
def get_int(body: dict[str, Any], key: str, default: int, low: int | None = None, high: int | None = None) -> int: ...
@overload
def get_int(body: dict[str, Any], key: str, default: None, low: int | None = None,
            high: int | None = None) -> int | None: ...
def get_int(body: dict[str, Any], key: str, default: int | None, low: int | None = None,
            high: int | None = None) -> int | None:
    """An integer field (not a boolean, not 2.0) within [low, high]; `default` when absent or null.

    Raises:
        ServeError: a value that is not an integer or lies outside the bounds.
    """
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{key} must be an integer, got {json.dumps(value)[:80]}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(f"{key} must be an integer {bounds}, got {value}", param=key)
    return value


def get_float(body: dict[str, Any], key: str, default: float) -> float:
    """Raises: ServeError: a value that is not a finite number (ranges: SamplingParams.check)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{key} must be a number, got {json.dumps(value)[:80]}", param=key)
    return float(value)


def get_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    """Raises: ServeError: a value that is not true or false."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{key} must be true or false, got {json.dumps(value)[:80]}", param=key)
    return value


def get_stop(body: dict[str, Any]) -> tuple[str, ...]:
    """`stop`: a string or a list of strings (null: none).

    Raises:
        ServeError: any other value.
    """
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise bad(f"stop must be a string or a list of strings, got {json.dumps(value)[:80]}", param="stop")


def refuse_unsupported(body: dict[str, Any], fields: dict[str, tuple[Any, ...]]) -> None:
    """Refuse an option this server does not implement unless it has a harmless value (null, false, 0, ...).

    Raises:
        ServeError: the option and the values that are accepted.
    """
    for key, harmless in fields.items():
        if key in body and body[key] is not None and body[key] not in harmless:
            accepted = " or ".join(json.dumps(v) for v in (None, *harmless))
            raise bad(f"{key}={json.dumps(body[key])[:80]} is not supported by lorakit serve (accepted: {accepted})",
                      param=key)


def _common(body: dict[str, Any], max_n: int, max_tokens: int | None) -> dict[str, Any]:
    """The fields completions and chat share, checked: model, sampling, n, stream, stream_options."""
    refuse_unsupported(body, {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},)})
    get_str(body, "user")
    model = get_str(body, "model", required=True)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", 16, low=1)
    n = get_int(body, "n", 1, low=1, high=max_n)
    seed = get_int(body, "seed", None, low=0)
    params = SamplingParams(max_tokens=max_tokens, temperature=get_float(body, "temperature", 1.0),
                            top_p=get_float(body, "top_p", 1.0), stop=get_stop(body), seed=seed)
    params.check(None, 0)
    if seed is not None and n > 1:
        SamplingParams(seed=seed + n - 1).check(None, 0)  # the last choice's seed is seed + n - 1
    stream = get_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad('stream_options must be an object with only "include_usage"', param="stream_options")
    include_usage = get_bool(options or {}, "include_usage")
    if options is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", param="stream_options")
    return {"model": model, "params": params, "n": n, "stream": stream, "include_usage": include_usage}


def parse_completion(body: dict[str, Any], max_n: int) -> GenerateRequest:
    """A /v1/completions body: prompt (a string or a list of one string), model, max_tokens (default 16),
    temperature (default 1), top_p, stop, seed, n (<= max_n), stream, stream_options; echo, logprobs,
    best_of and suffix only with values that change nothing.

    Raises:
        ServeError: 400 for a missing prompt or model, a value of the wrong type or range, an unknown field, or
            an option this server does not implement.
    """
    check_fields(body, COMPLETION_FIELDS)
    refuse_unsupported(body, {"echo": (False,), "logprobs": (), "suffix": ("",)})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise bad("missing required field 'prompt'", param="prompt")
    if not isinstance(prompt, str):
        raise bad("prompt must be a string or a list of one string (send one request per prompt; token ids are "
                  f"not accepted), got {json.dumps(prompt)[:80]}", param="prompt")
    common = _common(body, max_n, None)
    best_of = get_int(body, "best_of", None, low=1)
    if best_of is not None and best_of != common["n"]:
        raise bad(f"best_of={best_of} is not supported by lorakit serve (only best_of = n)", param="best_of")
    return GenerateRequest(prompt=prompt, **common)


def _message(index: int, message: Any) -> dict[str, str]:
    """One chat message as {"role", "content"} with text content (a string, or a list of text parts joined).

    Raises:
        ServeError: a message that is not an object, an unknown role, or content that is not text.
    """
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad(f"{where} must be an object with role and content", param="messages")
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        raise bad(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)[:40]}",
                  param="messages")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise bad(f'{where}.content: only text parts ({{"type": "text", "text": ...}}) are supported',
                      param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string, got a JSON {_json_type(content)}", param="messages")
    unknown = sorted(set(message) - {"role", "content", "name"})
    if unknown:
        raise bad(f"{where} has an unsupported field {unknown[0]!r}", param="messages")
    return {"role": role, "content": content}


def parse_chat(body: dict[str, Any], max_n: int) -> GenerateRequest:
    """A /v1/chat/completions body: messages, model, max_tokens or max_completion_tokens (default 16),
    temperature, top_p, stop, seed, n, stream, stream_options; tools, logprobs and response_format other than
    text are refused.

    Raises:
        ServeError: 400 as parse_completion, and for messages that are not a non-empty list of text messages.
    """
    check_fields(body, CHAT_FIELDS)
    refuse_unsupported(body, {"logprobs": (False,), "top_logprobs": (), "tools": ([],), "functions": ([],),
                              "tool_choice": ("none",), "function_call": ("none",),
                              "response_format": ({"type": "text"},), "parallel_tool_calls": (True, False)})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", param="messages")
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    max_tokens = get_int(body, "max_completion_tokens", None, low=1)
    return GenerateRequest(messages=parsed, **_common(body, max_n, max_tokens))


def parse_load(body: dict[str, Any]) -> tuple[str, str, str | None, tuple[str, ...]]:
    """POST /v1/load_lora_adapter: (lora_name, lora_path, description, examples).

    Raises:
        ServeError: 400 for a missing name or path, wrong types, or an unknown field.
    """
    check_fields(body, {"lora_name", "lora_path", "description", "examples"})
    name = get_str(body, "lora_name", required=True)
    path = get_str(body, "lora_path", required=True)
    examples = body.get("examples") or []
    if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
        raise bad("examples must be a list of strings", param="examples")
    assert name is not None and path is not None  # required=True
    return name, path, get_str(body, "description"), tuple(examples)


def parse_unload(body: dict[str, Any]) -> str:
    """POST /v1/unload_lora_adapter: lora_name (vLLM's lora_int_id is accepted and ignored).

    Raises:
        ServeError: 400 for a missing or non-string name, or an unknown field.
    """
    check_fields(body, {"lora_name", "lora_int_id"})
    name = get_str(body, "lora_name", required=True)
    assert name is not None
    return name


# -- responses -------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, created: int, model: str, choices: list[tuple[str, str | None]],
                        prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A "text_completion" object; `choices` are (text, finish_reason) in index order."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                        for i, (text, reason) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_response(rid: str, created: int, model: str, choices: list[tuple[str, str | None]],
                  prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A "chat.completion" object; each choice's message is the assistant's text."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                         "logprobs": None} for i, (text, reason) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None) -> dict[str, Any]:
    """One streamed piece of a completion (object "text_completion", as OpenAI streams it)."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, str],
               finish_reason: str | None) -> dict[str, Any]:
    """One "chat.completion.chunk": delta {"role"} first, then {"content"} pieces, then {} with finish_reason."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(rid: str, created: int, model: str, chat: bool, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage counts."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: "data: <json>\\n\\n" (or the literal "[DONE]")."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
