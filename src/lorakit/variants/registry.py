"""The variant registry: method name -> adapter class, and PEFT's peft_type -> the classes that read it.

A leaf module (it imports only the protocol), so that LoraConfig can check a method and its options at
construction. Variants register themselves in lorakit/variants/__init__.py, one line each.
"""

from __future__ import annotations

from typing import Any

from .protocol import VariantClass

VARIANTS: dict[str, Any] = {}  # method name -> adapter class (a VariantClass), in registration order


def register_variant(cls: Any) -> Any:
    """Add an adapter class to the registry under its `name` (usable as a class decorator); returns it.

    Raises:
        ValueError: the name is taken by another class, or the class lacks a declaration of the protocol.
    """
    for attr in ("name", "peft_type", "abilities", "options", "kinds", "file_keys", "build", "prepare",
                 "training_hook", "shared_file_tensors", "peft_config", "config_from_peft"):
        if not hasattr(cls, attr):
            raise ValueError(f"register_variant({cls.__name__}): the class does not declare {attr!r} (see "
                             "lorakit.variants.protocol)")
    known = VARIANTS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"register_variant: a variant named {cls.name!r} is already registered ({known.__name__})")
    VARIANTS[cls.name] = cls
    return cls


def variant_named(name: str) -> VariantClass:
    """The adapter class of method `name`.

    Raises:
        KeyError: no such method (the message lists the registered ones).
    """
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"no adapter method {name!r}; registered: {', '.join(VARIANTS)}") from None


def variants_for_peft_type(peft_type: str) -> list[VariantClass]:
    """The registered classes whose files carry `peft_type` ("LORA": lora, dora, ...), in registration order."""
    return [cls for cls in VARIANTS.values() if cls.peft_type == peft_type]


def file_key_suffixes() -> tuple[str, ...]:
    """Every per-layer key suffix a registered variant writes, longest first (a file key's module path is what
    precedes one of them)."""
    suffixes = {suffix for cls in VARIANTS.values() for suffix in cls.file_keys}
    return tuple(sorted(suffixes, key=lambda s: (-len(s), s)))


__all__ = ["VARIANTS", "register_variant", "variant_named", "variants_for_peft_type"]
