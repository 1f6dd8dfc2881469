"""lorakit's exceptions: one base class, a subclass per kind of bad input.

Every message names what was wrong, where (module path, file, field), the expected and the found value.
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """An invalid configuration value (r <= 0, alpha <= 0, dropout outside [0, 0.99], unknown init, ...)."""


class TargetError(LorakitError, ValueError):
    """Targeting failed: no module matched, or a matched module has an unsupported type."""


class AdapterNameError(LorakitError, KeyError):
    """An adapter name that is unknown, or already taken."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class AdapterFileError(LorakitError, OSError):
    """A missing, corrupt or unreadable adapter file, or an unknown peft_type."""


class ShapeMismatchError(LorakitError, ValueError):
    """Adapter weights whose shapes do not fit the model they are loaded into."""


class MergeError(LorakitError, ValueError):
    """Merging was refused (a delta with NaN or inf in safe mode, merging twice, ...)."""


class DataError(LorakitError, ValueError):
    """Unusable training data: a missing or unreadable file, a malformed line (named as file:line), a record
    of no known format, mixed formats, an unknown role or label, or data that does not fit the task."""


class ModelDirError(LorakitError, OSError):
    """A model directory that is missing, has no config.json or tokenizer, or cannot be loaded."""


class DirectoryLockedError(LorakitError, OSError):
    """Another live process (or another thread of this one) holds the lock of the directory being written."""
