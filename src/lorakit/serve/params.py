"""What a serving request asks for (sampling parameters) and how the server says no (an HTTP error in OpenAI's
shape). Shared by the engine, the adapter registry and the HTTP app; imports nothing else from `serve`.

    SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, stop=(), seed=None).check(context, prompt_tokens)
    ServeError(400, "max_tokens must be >= 1, got 0", param="max_tokens").body()
        -> {"error": {"message": ..., "type": "invalid_request_error", "param": "max_tokens", "code": None}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_STOP_STRINGS = 4  # OpenAI accepts at most four stop sequences
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit value


class ServeError(Exception):
    """An error with an HTTP status and OpenAI's error shape, raised anywhere in `lorakit.serve` for a request
    the server refuses (bad parameter: 400, unknown model: 404, shutting down: 503). The app turns it into the
    JSON response `body()` with status `status`, so a bad request never becomes a 500."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"ServeError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def _is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded; OpenAI's names and defaults (as /v1/completions documents them)."""

    max_tokens: int = 16  # new tokens at most; OpenAI's default for /v1/completions is 16
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax of the logits)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches top_p
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence (not included)
    seed: int | None = None  # per-request torch.Generator seed (sampling reproducible per request)

    @property
    def greedy(self) -> bool:
        """Whether decoding is argmax (temperature 0)."""
        return self.temperature == 0

    def check(self, context: int | None, prompt_tokens: int) -> None:
        """Refuse values the engine cannot honour, naming the parameter.

        Args:
            context: the model's context length (max_position_embeddings), or None when unknown (no limit).
            prompt_tokens: the number of tokens of the prompt; prompt + max_tokens must fit in the context.

        Raises:
            ServeError: status 400 with `param` set, for max_tokens not an int >= 1 or beyond the context,
                temperature not a finite number in [0, 2], top_p outside (0, 1], stop not a list of at most 4
                non-empty strings, seed not an int in [0, 2**63), or a prompt that alone fills the context.
        """
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ServeError(400, f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", param="max_tokens")
        if context is not None:
            if prompt_tokens >= context:
                raise ServeError(400, f"the prompt has {prompt_tokens} tokens, the model's context is {context}: "
                                 "no room for one new token", param="prompt", code="context_length_exceeded")
            if prompt_tokens + self.max_tokens > context:
                raise ServeError(400, f"max_tokens={self.max_tokens} with a prompt of {prompt_tokens} tokens exceeds "
                                 f"the model's context of {context} tokens (at most {context - prompt_tokens})",
                                 param="max_tokens", code="context_length_exceeded")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or not 0 <= self.temperature <= 2:
            raise ServeError(400, f"temperature must be a number in [0, 2], got {self.temperature!r}", param="temperature")
        if not _is_number(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ServeError(400, f"top_p must be a number in (0, 1], got {self.top_p!r}", param="top_p")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise ServeError(400, f"stop must be a string or a list of strings, got {self.stop!r}", param="stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ServeError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}", param="stop")
        if any(s == "" for s in self.stop):
            raise ServeError(400, "stop strings must not be empty", param="stop")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise ServeError(400, f"seed must be an integer in [0, 2**63), got {self.seed!r}", param="seed")
