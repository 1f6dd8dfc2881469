"""What the "model" of a request and the name of a served adapter may be: pure string rules, no state.

    check_served_name("sql", reserved=("auto", "llama"))     a name an adapter may be registered under, or a 400
    parse_mix("a:0.7+b:0.3") -> (("a", 0.7), ("b", 0.3))    a mix of registered adapters, or a 400
    not_found("gpt-4")                                       OpenAI's 404 (code "model_not_found")
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..names import name_problem
from .params import ServeError

MAX_NAME_BYTES = 200  # a served name plus "@<version>" stays a valid adapter name (255 bytes)
MAX_MIX_WEIGHT = 100.0  # |weight| of a mix term; beyond it float32 factors lose the base
MAX_EXAMPLES = 64  # example prompts per adapter, for routing
_WEIGHT = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")  # a plain decimal number, as a mix term's weight


def is_mix(adapters: tuple[tuple[str, float], ...]) -> bool:
    """Whether a target's adapters need a combination (anything but one adapter at weight 1)."""
    return len(adapters) > 1 or (len(adapters) == 1 and adapters[0][1] != 1.0)


def mix_names(text: str) -> list[str]:
    """The adapter names of a mix string, unchecked ("a:0.7+b:0.3" -> ["a", "b"])."""
    return [term.partition(":")[0].strip() for term in text.split("+")]


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """"a:0.7+b:0.3" -> (("a", 0.7), ("b", 0.3)); a term without ":w" weighs 1; weights may be negative.

    Raises:
        ServeError: 400: an empty term or name, a weight that is not a plain finite number or is beyond
            ±MAX_MIX_WEIGHT, a repeated adapter, or a single term of weight 1 (that is the adapter itself).
    """
    terms: list[tuple[str, float]] = []
    for term in text.split("+"):
        name, colon, weight_text = (part.strip() for part in term.partition(":"))
        if not name:
            raise bad_model(f"mix {shown(text)}: an empty term (write it as 'a:0.7+b:0.3')")
        if colon and not _WEIGHT.fullmatch(weight_text):
            raise bad_model(f"mix {shown(text)}: the weight of {name!r} must be a number like 0.7 or -0.5, got "
                            f"{weight_text!r}")
        weight = float(weight_text) if colon else 1.0
        if not math.isfinite(weight) or abs(weight) > MAX_MIX_WEIGHT:
            raise bad_model(f"mix {shown(text)}: the weight of {name!r} must be within ±{MAX_MIX_WEIGHT:g}, got "
                            f"{weight_text}")
        if any(name == seen for seen, _ in terms):
            raise bad_model(f"mix {shown(text)}: adapter {name!r} appears twice; give each adapter once")
        terms.append((name, weight))
    if not is_mix(tuple(terms)):
        raise bad_model(f"mix {shown(text)} is adapter {terms[0][0]!r} itself: ask for {terms[0][0]!r}")
    return tuple(terms)


def shown(text: Any, limit: int = 100) -> str:
    """repr(text), cut to about `limit` characters (a hostile "model" may be megabytes long)."""
    full = repr(text)
    return full if len(full) <= limit else f"{full[:limit - 20]}...({len(full)} characters)"


def bad_model(message: str) -> ServeError:
    """A 400 about the request's "model"."""
    return ServeError(400, message, param="model")


def not_found(model: str, detail: str = "") -> ServeError:
    """OpenAI's 404 for a model that does not exist (type invalid_request_error, code model_not_found)."""
    name = model if len(model) <= 100 else shown(model)
    return ServeError(404, f"The model `{name}` does not exist.{detail}", param="model", code="model_not_found")


def check_served_name(name: Any, reserved: tuple[str, ...]) -> None:
    """Refuse a name an adapter cannot be served under: lorakit.names' rules (a str, not empty, no '.', '/', '\\',
    ':' or control characters, not "__base__"), none of `reserved` ("auto", the base model's name), no leading
    "__" (the server's own adapters), no '+' or whitespace (mix syntax), at most MAX_NAME_BYTES bytes (so that
    "<name>@<version>" is a valid adapter name too).

    Raises:
        ServeError: 400 naming the rule (param "lora_name").
    """
    problem = name_problem(name)
    if isinstance(name, str) and name:
        if any(c in "+:" or c.isspace() for c in name):
            problem = "it contains '+', ':' or whitespace (a mix of adapters is written 'a:0.7+b:0.3')"
        elif name in reserved:
            problem = f"{name!r} is reserved (for routing, or as the base model's name)"
        elif name.startswith("__"):
            problem = "names starting with '__' are reserved for the server's own adapters"
        elif problem is None and len(name.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
            problem = f"it is longer than {MAX_NAME_BYTES} bytes in UTF-8"
    if problem is not None:
        raise ServeError(400, f"lora_name {shown(name)} is not a valid adapter name: {problem}", param="lora_name")


def routing_texts(description: Any, examples: Any) -> list[str]:
    """The texts "auto" routes an adapter by: its description (None: none) and its example prompts.

    Raises:
        ServeError: 400 for a description that is not a non-empty string, or examples that are not a list of at
            most MAX_EXAMPLES non-empty strings (param "description" / "examples").
    """
    if description is not None and (not isinstance(description, str) or not description.strip()):
        raise ServeError(400, f"description must be a non-empty string, got {shown(description)}",
                         param="description")
    if (isinstance(examples, str) or not isinstance(examples, (list, tuple)) or len(examples) > MAX_EXAMPLES
            or not all(isinstance(e, str) and e.strip() for e in examples)):
        raise ServeError(400, f"examples must be a list of at most {MAX_EXAMPLES} non-empty strings",
                         param="examples")
    return ([description] if description else []) + list(examples)
