"""Chat records: the `messages` format (roles system / user / assistant / tool, a `tools` field for the chat
template) and ShareGPT (`conversations` of `{from, value}`), checked and brought to one shape.

ShareGPT's roles map to the chat template's: human -> user, gpt -> assistant, system -> system, tool -> tool
(user / assistant are accepted as they are). Fields lorakit cannot honour (images, audio, video, message
content that is not a string) are errors naming the record, never silently dropped.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .readers import json_type

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool", "observation": "tool"}
UNSUPPORTED_FIELDS = ("images", "image", "audio", "audios", "video", "videos")


def check_chat(record: dict[str, Any], fmt: str, where: str) -> None:
    """Check a `messages` or `sharegpt` record (DataError naming `where` and the bad turn)."""
    for key in UNSUPPORTED_FIELDS:
        if record.get(key) not in (None, [], ""):
            raise DataError(f"{where}: field {key!r} cannot be used: lorakit trains on text only (remove it, "
                            "or drop the record)")
    if fmt == "sharegpt":
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field 'conversations' must be a non-empty array of {{from, value}} objects")
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: conversations[{j}] must be an object with keys from and value")
            if turn["from"] not in SHAREGPT_ROLES:
                raise DataError(f"{where}: conversations[{j}] has from {turn['from']!r}; expected one of: "
                                f"{', '.join(SHAREGPT_ROLES)}")
            if not isinstance(turn["value"], str):
                raise DataError(f"{where}: field 'conversations[{j}].value' must be a string, got "
                                f"{json_type(turn['value'])}")
    else:
        _check_messages(record["messages"], where)
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: field 'tools' must be an array of objects (function schemas), got "
                        f"{json_type(tools)}")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty array of {{role, content}} objects")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or (
                "content" not in message and "tool_calls" not in message):
            raise DataError(f"{where}: messages[{j}] must be an object with keys role and content")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: messages[{j}] has role {message['role']!r}; expected one of: "
                            f"{', '.join(ROLES)}")
        content = message.get("content")
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant" or not isinstance(calls, list):
                raise DataError(f"{where}: messages[{j}].tool_calls must be an array on an assistant turn")
            if content is None:
                continue
        if not isinstance(content, str):
            raise DataError(f"{where}: field 'messages[{j}].content' must be a string, got {json_type(content)}")


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    """The conversation of a checked `messages` or `sharegpt` record as chat-template messages."""
    if fmt == "sharegpt":
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    return record["messages"]


__all__ = ["ROLES", "SHAREGPT_ROLES", "UNSUPPORTED_FIELDS", "check_chat", "to_messages"]
