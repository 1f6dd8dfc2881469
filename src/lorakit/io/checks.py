"""Checks of an adapter file against a model before anything is allocated or attached, and the undo of a load
that failed half-way: loading a hostile or broken adapter costs bounded memory and leaves the model as it was.

The rank a config declares (`r`, `rank_pattern`) decides the size of the tensors `attach` allocates; a file
declaring r = 10**9 beside rank-8 tensors would ask for gigabytes. So every module's A and B shapes are computed
from the config (integers only) and compared with the shapes in the file's header first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from .. import model as M
from ..config import LoraConfig, match_pattern_key
from ..errors import AdapterFileError, ShapeMismatchError
from ..layer_kinds import check_supported
from ..layers import LoraLayer
from ..targeting import iter_candidate_modules
from ..variants import variant_for
from .format import PREFIX


def rank_field(config: LoraConfig, path: str) -> str:
    """The config field that sets the rank of the module at `path`: "rank_pattern[<key>]" or "r"."""
    key = match_pattern_key(config.rank_pattern, path)
    return f"rank_pattern[{key!r}]" if key is not None else "r"


def check_shapes(
    model: nn.Module, config: LoraConfig, paths: list[str], shapes: dict[str, tuple[int, ...]], where: Path
) -> None:
    """Every module in `paths` is one the model has and can adapt, and its lora_A / lora_B in `shapes` (file key
    -> shape, e.g. from the safetensors header) have the shapes the config's rank gives on that module.

    Raises:
        AdapterFileError: a module the model lacks, or a module without its lora_A or lora_B tensor.
        TargetError: a module whose type cannot take an adapter.
        ShapeMismatchError: a tensor whose shape differs from the one the config's rank and the module give
            (names the module, the rank field and both shapes): an absurd `r` is caught here, before allocation.
    """
    known = dict(iter_candidate_modules(model))
    for path in paths:
        if path not in known:
            raise AdapterFileError(f"{where}: the file has adapter weights for module {path!r}, which this model "
                                   f"does not have; was it trained on another model?")
        module = known[path]
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = check_supported(base, path)
        rank = config.rank_for(path)
        expected = variant_for(config).file_shapes(kind, base, config, path)  # integers: nothing allocated
        for suffix, want in expected.items():
            key = f"{PREFIX}{path}.{suffix}"
            if key not in shapes:
                raise AdapterFileError(f"{where}: module {path!r} has no tensor {key!r} ({' and '.join(expected)} "
                                       f"are all needed)")
            if tuple(shapes[key]) != tuple(want):
                raise ShapeMismatchError(
                    f"{where}: module {path!r}: {suffix} has shape {tuple(shapes[key])}, but adapter_config.json's "
                    f"{rank_field(config, path)}={rank} on this {kind.name} layer needs {tuple(want)}"
                )


@contextmanager
def unchanged_on_failure(model: nn.Module, name: str) -> Iterator[None]:
    """Run a load of adapter `name`; if it raises, remove whatever part of the adapter was attached (wrappers
    it created are unwrapped) and restore the active set and every parameter's requires_grad."""
    had_record = "_lorakit" in model.__dict__  # M's record: created by the first lookup
    active = M.active_adapters(model)
    flags = [(param, param.requires_grad) for param in model.parameters()]
    had_name = name in M.adapter_names(model)
    try:
        yield
    except BaseException:
        if not had_name:
            _remove_partial(model, name)
        for param, flag in flags:
            param.requires_grad_(flag)
        if active:
            M.set_active(model, active)
        if not had_record:
            M._forget(model)
        raise


def _remove_partial(model: nn.Module, name: str) -> None:
    """Adapter `name` removed from every wrapper, even when attach stopped before recording its config."""
    if name in M.adapter_names(model):
        M.delete_adapter(model, name)
        return
    for layer in list(M.lora_layers(model)):
        if name in layer.adapters:
            del layer.adapters[name]
            layer.active = [n for n in layer.active if n != name]
        if not layer.adapters:
            M._replace_module(model, layer.path, layer.base_layer)
    for saved in list(M.saved_modules(model)):
        if name in saved.copies:
            del saved.copies[name]
        if not saved.copies:
            M._replace_module(model, saved.path, saved.original_module)
    if not M.adapter_names(model):
        M._forget(model)
