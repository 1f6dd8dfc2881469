"""Which modules of a model get an adapter: names, dotted suffixes, a full-match regex or "all-linear",
minus `exclude_modules` and `modules_to_save`, restricted to `layers_to_transform`. PEFT's matching rules.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

from torch import nn

from .config import LoraConfig
from .errors import TargetError
from .layer_kinds import check_supported, kind_of
from .layers import LoraLayer, SavedModule


def iter_candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of the model as the user sees it: a LoraLayer stands for its base layer, a
    SavedModule for its original; their internals are not listed."""
    skip: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (LoraLayer, SavedModule)):
            skip.append(path + ".")
        yield path, module


def _matches_names(spec: list[str] | str, path: str) -> bool:
    """PEFT's rule: a string is a regex matched against the whole path; a list matches a name exactly
    or as a dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return path in spec or any(path.endswith("." + name) for name in spec)


def matches_modules_to_save(names: list[str] | None, path: str) -> bool:
    """True if `path` is one of `modules_to_save` (a name or a dotted suffix)."""
    return bool(names) and any(re.match(rf"(^|.*\.){re.escape(n)}$", path) for n in names)


def _layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first number in the path after a layer-list name (`layers_pattern`, or any name)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        return int(match.group("idx")) if match else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
        if match:
            return int(match.group("idx"))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head (excluded by "all-linear"): the output embeddings if the model has them."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    return {path for path, module in iter_candidate_modules(model) if module is head}


def is_target(config: LoraConfig, path: str, module: nn.Module, heads: set[str]) -> bool:
    """Whether `module` at `path` gets an adapter under `config`."""
    if config.exclude_modules and _matches_names(config.exclude_modules, path):
        return False
    if matches_modules_to_save(config.modules_to_save, path):
        return False
    target = config.target_modules
    if target == "all-linear":
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = kind_of(base)
        found = kind is not None and kind.is_linear and path not in heads
    elif target is None:
        found = False
    else:
        found = _matches_names(target, path)
    if found and config.layers_to_transform is not None:  # names, suffixes or all-linear (a regex is refused)
        index = _layer_index(path, config.layers_pattern)
        found = index is not None and index in config.layers_to_transform
    return found


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules that `config` targets in `model`.

    Raises:
        TargetError: nothing matched (the message lists the closest module names), or a matched module
            has a type that cannot take an adapter.
    """
    if config.target_modules is None:
        raise TargetError("LoraConfig.target_modules is not set: name modules, give a regex, or use 'all-linear'")
    heads = output_head_names(model) if config.target_modules == "all-linear" else set()
    found: list[str] = []
    for path, module in iter_candidate_modules(model):
        if is_target(config, path, module, heads):
            base = module.base_layer if isinstance(module, LoraLayer) else module
            if isinstance(module, SavedModule):
                raise TargetError(f"module {path!r} is a modules_to_save copy and cannot also take an adapter")
            check_supported(base, path)
            found.append(path)
    if not found:
        raise TargetError(_no_match_message(model, config))
    return found


def _no_match_message(model: nn.Module, config: LoraConfig) -> str:
    supported = [p for p, m in iter_candidate_modules(model) if kind_of(m) is not None or isinstance(m, LoraLayer)]
    leaf_names = sorted({p.rsplit(".", 1)[-1] for p in supported})
    asked = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules or [])
    close: list[str] = []
    for name in asked:
        pool = leaf_names + supported if "." in name else leaf_names
        close += [c for c in difflib.get_close_matches(name, pool, n=5, cutoff=0.4) if c not in close]
    hint = ", ".join(close) if close else ", ".join(leaf_names[:12])
    extra = ""
    if config.layers_to_transform is not None:
        extra = f" within layers {config.layers_to_transform}"
    return (
        f"no module of {type(model).__name__} matched target_modules={config.target_modules!r}{extra}. "
        f"Closest module names that can take an adapter: {hint or '(none: the model has no supported layers)'}"
    )
