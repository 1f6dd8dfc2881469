"""A text-classification task built at run time from the Python standard library: no download, no data file.

Each example is the first paragraph of one docstring (a module's, a class's, a function's or a method's)
of a fixed list of standard-library packages; its label is the top-level package it comes from (``email``,
``json``, ``logging``, ...). The split into train and test is fixed: it depends only on a SHA-256 hash of each
docstring's qualified name (``package.module.Class.method``), never on the order modules are walked in, on
``hash()`` randomisation, or on the set of other docstrings. Identical texts are kept once (texts that occur
under two labels are dropped), so no test text appears in train.

The docstrings themselves come from the running interpreter, so the exact examples differ a little between
Python versions; on one interpreter, two builds are identical.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import pkgutil
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

# The labels: top-level standard-library packages with many docstrings, present in every CPython >= 3.10,
# pure Python (their docstrings are not stripped), and about related-but-distinct topics (protocols,
# concurrency, test tooling, logging), so the task is neither trivial nor hopeless.
DEFAULT_PACKAGES: tuple[str, ...] = ("asyncio", "email", "http", "logging", "multiprocessing", "unittest", "xml")

# never imported: side effects on import (`this` prints, `antigravity` opens a browser), GUIs, test suites,
# entry points (`__main__` runs a program), or platform-specific parts that fail or warn elsewhere.
_SKIP_PARTS = frozenset({"test", "tests", "__main__", "idlelib", "tkinter", "turtledemo", "this", "antigravity"})
_SKIP_PREFIXES = ("_test", "test_")
_SKIP_MODULES = frozenset({"asyncio.windows_events", "asyncio.windows_utils", "multiprocessing.popen_spawn_win32"})

TEST_FRACTION = 0.25  # share of docstrings (by hash of qualified name) in the test split
MAX_WORDS = 40  # first paragraph, cut to this many words (about 64 word-piece tokens)
MIN_WORDS = 4  # shorter texts ("Close.", "Return the name.") are dropped


@dataclass
class DocDataset:
    """Train and test records ``{"text": str, "label": str}`` and the label list (sorted)."""

    train: list[dict[str, str]]
    test: list[dict[str, str]]
    labels: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per label: ``{"train": n, "test": m}``."""
        train, test = Counter(r["label"] for r in self.train), Counter(r["label"] for r in self.test)
        return {label: {"train": train[label], "test": test[label]} for label in self.labels}

    def describe(self) -> str:
        """A one-line summary: sizes and per-label counts (train/test)."""
        per = ", ".join(f"{k} {v['train']}/{v['test']}" for k, v in self.counts().items())
        return (f"{len(self.labels)} labels, {len(self.train)} train / {len(self.test)} test docstrings "
                f"(train/test per label: {per})")


def stable_fraction(key: str) -> float:
    """A number in [0, 1) from a SHA-256 hash of `key`: the same on every run, machine and Python."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def clean(doc: str | None, max_words: int = MAX_WORDS) -> str | None:
    """The first paragraph of a docstring as one line of at most `max_words` words; None if empty."""
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc).strip()
    if not doc:
        return None
    first = re.split(r"\n\s*\n", doc, maxsplit=1)[0]
    words = first.split()
    return " ".join(words[:max_words]) if words else None


def _skip(name: str) -> bool:
    parts = name.split(".")
    return (name in _SKIP_MODULES or any(p in _SKIP_PARTS for p in parts)
            or any(p.startswith(_SKIP_PREFIXES) for p in parts))


def _import(name: str) -> ModuleType | None:
    """Import a module quietly; None if it fails for any reason (missing C extension, other platform)."""
    if _skip(name):
        return None
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):  # an import error, or a module that refuses this platform
        return None


def iter_modules(package: str) -> Iterator[ModuleType]:
    """The package and its importable submodules, in sorted order, skipping those listed above."""
    root = _import(package)
    if root is None:
        return
    yield root
    # pkgutil.walk_packages would import every subpackage (test suites included) before we could skip it
    for info in sorted(pkgutil.iter_modules(getattr(root, "__path__", None) or []), key=lambda i: i.name):
        name = f"{package}.{info.name}"
        if not _skip(name):
            yield from iter_modules(name)


def _own_doc(obj: Any) -> str | None:
    """The docstring an object defines itself (not one inherited from a base class, as getdoc would)."""
    if isinstance(obj, type):
        return obj.__dict__.get("__doc__")
    return getattr(obj, "__doc__", None)


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Functions, static/class methods and properties defined in the class body itself."""
    for name, value in sorted(cls.__dict__.items()):
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            yield name, value


def iter_docstrings(module: ModuleType) -> Iterator[tuple[str, str]]:
    """(qualified name, raw docstring) of the module, and of the classes, functions and methods it defines."""
    name = module.__name__
    if module.__doc__:
        yield name, module.__doc__
    for attr, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != name or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # imported from elsewhere, or not a class/function
        if getattr(obj, "__name__", attr) != attr:
            continue  # an alias: the object is documented under its own name
        doc = _own_doc(obj)
        if doc:
            yield f"{name}.{attr}", doc
        if inspect.isclass(obj):
            for member, func in _members(obj):
                if func.__doc__:
                    yield f"{name}.{attr}.{member}", func.__doc__


def collect(packages: tuple[str, ...] | list[str] = DEFAULT_PACKAGES, max_words: int = MAX_WORDS,
            min_words: int = MIN_WORDS) -> list[dict[str, str]]:
    """Every cleaned docstring of `packages`: ``{"name": qualified name, "text": ..., "label": package}``,
    sorted by name, each text once (a text found under two labels is dropped, one found twice under one
    label is kept under its first qualified name)."""
    found: dict[str, dict[str, str]] = {}
    for package in packages:
        for module in iter_modules(package):
            for qualname, doc in iter_docstrings(module):
                text = clean(doc, max_words)
                if text is None or len(text.split()) < min_words:
                    continue
                found.setdefault(qualname, {"name": qualname, "text": text, "label": package})
    by_text: dict[str, list[dict[str, str]]] = {}
    for record in sorted(found.values(), key=lambda r: r["name"]):
        by_text.setdefault(record["text"], []).append(record)
    records = [group[0] for group in by_text.values() if len({r["label"] for r in group}) == 1]
    return sorted(records, key=lambda r: r["name"])


def _cap(records: list[dict[str, str]], limit: int | None) -> list[dict[str, str]]:
    """At most `limit` records per label, chosen by hash order (a fixed pseudo-random sample)."""
    ordered = sorted(records, key=lambda r: (stable_fraction("order:" + r["name"]), r["name"]))
    taken: Counter[str] = Counter()
    kept = []
    for record in ordered:
        if limit is None or taken[record["label"]] < limit:
            taken[record["label"]] += 1
            kept.append(record)
    return sorted(kept, key=lambda r: r["name"])


def build_dataset(
    packages: tuple[str, ...] | list[str] = DEFAULT_PACKAGES,
    test_fraction: float = TEST_FRACTION,
    max_train_per_label: int | None = 160,
    max_test_per_label: int | None = 60,
    max_words: int = MAX_WORDS,
    min_words: int = MIN_WORDS,
) -> DocDataset:
    """The docstring-classification task.

    A docstring is a test example when ``stable_fraction(qualified name) < test_fraction``; each split is
    then capped per label (a fixed hash-ordered sample) so that classes are balanced and the run is short.
    Records are ``{"text": ..., "label": package}``, sorted by qualified name.
    """
    records = collect(packages, max_words, min_words)
    train = [r for r in records if stable_fraction(r["name"]) >= test_fraction]
    test = [r for r in records if stable_fraction(r["name"]) < test_fraction]
    before = Counter(r["label"] for r in records)
    train, test = _cap(train, max_train_per_label), _cap(test, max_test_per_label)
    labels = sorted({r["label"] for r in records})
    info = {
        "source": f"docstrings of the Python {sys.version.split()[0]} standard library",
        "packages": list(packages),
        "docstrings_per_label": dict(sorted(before.items())),
        "test_fraction": test_fraction,
        "max_words": max_words,
        "split": "sha256(qualified name) < test_fraction -> test",
    }
    strip = [{"text": r["text"], "label": r["label"]} for r in train], [
        {"text": r["text"], "label": r["label"]} for r in test]
    return DocDataset(train=strip[0], test=strip[1], labels=labels, info=info)


__all__ = ["DEFAULT_PACKAGES", "DocDataset", "build_dataset", "clean", "collect", "iter_docstrings",
           "iter_modules", "stable_fraction"]
