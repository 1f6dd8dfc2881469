"""What an adapter name may be: one rule, checked by every verb that takes a name (attach, load_adapter, save_adapter,
combine, swap_adapter, prepare_swap, `lorakit combine`), before anything changes or is written.

A name is a single path component in the file layout (`save_adapter(model, dir, name)` writes `dir/name/`), a key of
an nn.ModuleDict and a PEFT adapter name, so it is refused when it could be any of these things but a plain name.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError

BASE = "__base__"  # the base model's name in mixed batches (PEFT's): never an adapter's
MAX_NAME_BYTES = 255  # the longest file name most file systems take (ext4, APFS, NTFS: 255)
_SEPARATORS = ("/", "\\", ":")  # POSIX and Windows separators; ':' makes a Windows drive-relative path ("C:x")


def name_problem(name: Any) -> str | None:
    """Which rule `name` breaks as an adapter name, in words; None for a valid name.

    A valid name is a non-empty str of at most MAX_NAME_BYTES UTF-8 bytes, without '.' (nn.ModuleDict keys and
    PEFT's key layout split on it; this also refuses '.' and '..'), without '/', '\\' or ':' (it would be a path,
    possibly absolute), without control characters (NUL, newline, DEL, ...), and not "__base__".
    """
    if not isinstance(name, str):
        return f"it must be a str, not {type(name).__name__}"
    if not name:
        return "it is empty"
    if name == BASE:
        return f"{BASE!r} is reserved for the base model (mixed batches)"
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"it is {size} bytes long in UTF-8, the limit is {MAX_NAME_BYTES}"
    for char in name:
        if char == ".":
            return "it contains '.' (module keys are dotted paths; '.' and '..' are directories)"
        if char in _SEPARATORS:
            return f"it contains {char!r}, a path separator (a name is one directory name, never a path)"
        if unicodedata.category(char) in ("Cc", "Cs"):
            return f"it contains the control character {char!r}"
    return None


def check_adapter_name(name: Any, where: str = "adapter name") -> str:
    """Return `name` if it is a valid adapter name (see name_problem).

    Args:
        name: the name to check.
        where: what the name is, for the message (e.g. "save_adapter(name=...)", "--adapter NAME=").

    Raises:
        ConfigError: "<where> <repr> is not a valid adapter name: <the rule it breaks>".
    """
    problem = name_problem(name)
    if problem is not None:
        raise ConfigError(f"{where} {_shown(name)} is not a valid adapter name: {problem}")
    return name


def _shown(name: Any) -> str:
    """repr(name), cut to about 80 characters (a hostile name may be megabytes long)."""
    text = repr(name)
    return text if len(text) <= 80 else f"{text[:60]}...{text[-12:]} ({len(text)} characters)"


def check_out_not_input(out: str | Path, inputs: Iterable[tuple[str, str | Path]], flag: str = "out") -> None:
    """Refuse an output directory that is one of the inputs, contains one, or lies inside one (symlinks resolved):
    replacing it (`--force`) would delete the inputs, or write the result into them.

    Args:
        out: the output directory (it need not exist).
        inputs: (what the input is, e.g. "--model", its directory) pairs.
        flag: the output's name in the message ("--out").

    Raises:
        ConfigError: naming the output, the input and how they overlap.
    """
    target = Path(out).resolve()
    for what, directory in inputs:
        source = Path(directory).resolve()
        relation = ("is" if target == source else "contains" if source.is_relative_to(target)
                    else "is inside" if target.is_relative_to(source) else None)
        if relation is not None:
            raise ConfigError(
                f"{flag} {str(out)!r} {relation} the {what} directory {str(directory)!r}: writing the result there "
                f"would replace or change its own input; choose an output directory outside every input"
            )
