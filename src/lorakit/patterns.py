"""Regular expressions from configs and files (target_modules, exclude_modules, rank_pattern, alpha_pattern,
layers_pattern), checked before use so that matching them against module paths takes bounded time.

Python's `re` backtracks and has no timeout: `(a+)+$` or `(.*)*x` take time exponential in the length of the
module path, and `.*.*.*.*.*x` time ~ n^5. A pattern is therefore refused unless its backtracking is provably
small (a conservative rule, checked on the parsed pattern, with no match ever run):

    * no nested quantifier: a repeat that can loop (`*`, `+`, `{m,n}` with n > 1, n != m) must repeat a single
      character or class (`.`, `\\w`, `[a-z]`, a literal), not a group holding a repeat, `?` or alternation
    * no backreference (`\\1`, `(?P=name)`, `(?(1)...)`): matching with them is NP-hard
    * at most MAX_LOOPS loops one after the other (alternatives count their worst branch): time ~ n^MAX_LOOPS
    * at most MAX_PATTERN_LENGTH characters

Every real PEFT pattern seen (`.*\\.layers\\.1\\..*(q_proj|v_proj)`, `^(?!.*visual).*(?:q_proj|v_proj)$`, full
module paths) passes.
"""

from __future__ import annotations

from typing import Any

try:  # Python >= 3.11
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse  # type: ignore[no-redef]
import re

from .errors import ConfigError

MAX_PATTERN_LENGTH = 2000  # characters of one pattern
MAX_LOOPS = 3  # loops in sequence: the match of a wrapped pattern (rank_pattern's `(.*\.)?(key)$`) stays ~ n^4
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
_BACKREFS = ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE")
_HINT = ("; simplify it (e.g. '(a+)+' -> 'a+', '(\\w+\\.)*x' -> '.*x', '.*a.*b.*c.*d' -> fewer wildcards) or "
         "list the module names instead of a regex")


def check_pattern(field: str, pattern: Any, max_loops: int = MAX_LOOPS) -> None:
    """Refuse a regex whose matching time is not bounded (see the module docstring).

    Args:
        field: the field it comes from, named in the message (e.g. "LoraConfig.rank_pattern key").
        pattern: the regex.
        max_loops: the most loops allowed one after the other.

    Raises:
        ConfigError: not a string, too long, invalid, nested repetition, a backreference or too many loops; the
            message names `field` and the pattern.
    """
    if not isinstance(pattern, str):
        raise ConfigError(f"{field} must be a string (a module name or regex), got {type(pattern).__name__} "
                          f"{pattern!r}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ConfigError(f"{field}: a pattern of {len(pattern)} characters is longer than the "
                          f"{MAX_PATTERN_LENGTH} allowed: {pattern[:60]!r}...")
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ConfigError(f"{field} is not a valid regular expression ({err}): {pattern!r}") from err
    try:
        loops = _loops(list(parsed), field, pattern)
    except RecursionError as err:
        raise ConfigError(f"{field}: {pattern[:60]!r} nests groups too deeply") from err
    if loops > max_loops:
        raise ConfigError(f"{field}: {pattern!r} has {loops} repetitions one after the other (at most {max_loops} "
                          f"are allowed: matching time grows as the module path's length to that power){_HINT}")


def _loops(items: list[tuple[Any, Any]], field: str, pattern: str) -> int:
    """Loops one after the other in a parsed sequence (a branch counts its worst alternative).

    Raises:
        ConfigError: a nested quantifier or a backreference.
    """
    total = 0
    for op, arg in items:
        name = str(op)
        if name in _BACKREFS:
            raise ConfigError(f"{field}: {pattern!r} uses a backreference, which lorakit refuses (matching time "
                              f"is unbounded){_HINT}")
        if name in _REPEATS:
            low, high, body = arg
            inner = _loops(list(body), field, pattern)
            if high > 1 and high != low:
                if inner or _has_choice(list(body)):
                    raise ConfigError(f"{field}: {pattern!r} repeats a group that itself repeats or branches "
                                      f"(nested quantifier: matching time exponential in the path's length){_HINT}")
                total += 1
            else:
                total += inner
        elif name == "SUBPATTERN":
            total += _loops(list(arg[-1]), field, pattern)
        elif name in ("ASSERT", "ASSERT_NOT"):
            total += _loops(list(arg[1]), field, pattern)
        elif name == "ATOMIC_GROUP":
            total += _loops(list(arg), field, pattern)
        elif name == "BRANCH":
            total += max((_loops(list(branch), field, pattern) for branch in arg[1]), default=0)
    return total


def _has_choice(items: list[tuple[Any, Any]]) -> bool:
    """Whether a parsed sequence can match in more than one way: a repeat of any kind, an alternation, a group
    or an assertion holding one."""
    for op, arg in items:
        name = str(op)
        if name in _REPEATS or name == "BRANCH":
            return True
        if name == "SUBPATTERN" and _has_choice(list(arg[-1])):
            return True
        if name in ("ASSERT", "ASSERT_NOT") and _has_choice(list(arg[1])):
            return True
        if name == "ATOMIC_GROUP" and _has_choice(list(arg)):
            return True
    return False
