"""Load a safetensors checkpoint straight into NF4 (QLoRA's base) without ever holding the model in full precision.

    config ──► skeleton on the meta device (accelerate; buffers real) ──► which nn.Linear to quantise: not `skip`
           ──► the model's tensors and NF4 codes allocated up front (empty), tied names sharing one tensor
    *.safetensors ──► key by key, in row ranges of ~256 K elements ──► a quantised Linear's weight: cast to `dtype`,
                                                                      NF4 codes written piece by piece on `device`
                                                                └──► anything else: copied into its tensor in `dtype`
    then: new heads initialised as transformers would, NF4Linear swapped in for each quantised Linear

The peak memory of loading is the NF4 model plus a few row ranges of temporaries (and what malloc keeps). The
result computes what `quantize(from_pretrained(dir, dtype=dtype), "nf4", compute_dtype, skip)` computes.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelDirError
from ..quant.linear import NF4Linear, check_compute_dtype
from ..quant.nf4 import ABSMAX_BLOCKSIZE, NF4State, nf4_codes, pack_nibbles, quantize_blockwise_8bit
from .checkpoint import checkpoint_files, key_renamer, label_dim_mismatch, open_safetensors

QUANT_CHUNK = 1 << 18  # elements of a checkpoint tensor read (and quantised) at a time, in whole rows


# -- the skeleton ----------------------------------------------------------------------------------------
def build_skeleton(auto_cls: Any, config: Any, dtype: torch.dtype, **model_kwargs: Any) -> nn.Module:
    """`auto_cls.from_config(config)` with every parameter on the meta device (no memory) and real buffers."""
    from accelerate import init_empty_weights

    model_kwargs.setdefault("dtype", dtype)
    with init_empty_weights(include_buffers=False):
        model = auto_cls.from_config(config, **model_kwargs)
    with contextlib.suppress(AttributeError, TypeError):
        model.tie_weights()  # on the meta device: tied parameters become one object
    return model


def quantised_linears(model: nn.Module, skip: Callable[[str], bool]) -> dict[str, nn.Linear]:
    """The nn.Linear modules to store in NF4 (as lorakit.quant.quantize picks them), by qualified name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not skip(name)
            and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)}


def tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """canonical parameter name -> every name of that parameter (tied weights share one object)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {names[0]: names for names in groups.values()}


def _keep_fp32(model: nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Module names transformers keeps in fp32 at this dtype (`_keep_in_fp32_modules[_strict]`)."""
    names: list[str] = []
    if dtype == torch.float16:
        names += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        names += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return tuple(names)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    else:
        module._buffers[leaf] = value


def empty_nf4_state(shape: torch.Size, device: torch.device, blocksize: int = 64) -> NF4State:
    """Uninitialised NF4 buffers for a weight of `shape` (double quantisation, as quantize_nf4's defaults).

    Allocated before any checkpoint tensor is read, so that the long-lived codes never land between the freed
    temporaries of quantisation (with glibc, that fragmentation kept about the full-precision size resident).
    """
    n = shape.numel()
    blocks = -(-n // blocksize)
    return NF4State(torch.empty((n + 1) // 2, dtype=torch.uint8, device=device),
                    torch.empty(blocks, dtype=torch.uint8, device=device),
                    torch.empty(-(-blocks // ABSMAX_BLOCKSIZE), dtype=torch.float32, device=device),
                    torch.empty((), dtype=torch.float32, device=device), shape, blocksize)


def row_ranges(shape: tuple[int, ...], chunk: int = QUANT_CHUNK, align: int = 128) -> list[tuple[int, int]]:
    """Ranges of the first dimension of a tensor of `shape` holding about `chunk` elements each, every range but
    the last a multiple of `align` elements (whole NF4 blocks and whole bytes); [(0, 1)] for a 0-d tensor."""
    if not shape:
        return [(0, 1)]
    row = math.prod(shape[1:])
    unit = align // math.gcd(row, align) if row else 1  # rows whose elements fill whole aligned groups
    rows = max(unit, chunk // max(row, 1) // unit * unit)
    return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)] or [(0, 0)]


@torch.no_grad()
def quantize_nf4_into(state: NF4State, parts: Iterable[torch.Tensor], dtype: torch.dtype) -> None:
    """Write quantize_nf4(weight.to(dtype)) into the preallocated `state` (the same bytes) from consecutive pieces
    of the weight (`parts`, e.g. row ranges): every piece but the last must hold whole pairs of blocks.

    Blocks are independent, so piecewise codes and block scales are those of the whole weight; the double
    quantisation then runs once on all block scales (n / 64 values). Temporaries: a few times one piece.

    Raises:
        ModelDirError: a piece that is not floating point or splits a block, or pieces that do not add up to
            `state`'s size.
    """
    blocksize, device = state.blocksize, state.packed.device
    absmax = torch.empty(state.absmax.numel(), dtype=torch.float32, device=device)  # (nb,) block scales
    start = 0
    for part in parts:
        if not part.is_floating_point() or start % (2 * blocksize) or start + part.numel() > state.shape.numel():
            raise ModelDirError(f"NF4: a piece of {part.numel()} {part.dtype} values at element {start} does not "
                                f"fit a weight of {state.shape.numel()} elements in blocks of {blocksize}")
        flat = part.reshape(-1).to(device, dtype).float()  # rounded to `dtype`, as from_pretrained(dtype)
        codes, block_absmax = nf4_codes(flat, blocksize)
        packed = pack_nibbles(codes)
        state.packed[start // 2:start // 2 + packed.numel()].copy_(packed)
        absmax[start // blocksize:start // blocksize + block_absmax.numel()].copy_(block_absmax)
        start += flat.numel()
    if start != state.shape.numel():
        raise ModelDirError(f"NF4: expected {state.shape.numel()} values, found {start}")
    offset = absmax.mean()
    codes8, scale = quantize_blockwise_8bit(absmax - offset)
    state.absmax.copy_(codes8)
    state.absmax_scale.copy_(scale)
    state.absmax_offset.copy_(offset)


class _Loader:
    """The state of one streaming load: the model's tensors, allocated up front, and what has been read so far."""

    def __init__(self, model: nn.Module, linears: dict[str, nn.Linear], dtype: torch.dtype, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, device
        self.fp32 = _keep_fp32(model, dtype)
        self.groups = tied_groups(model)
        self.canonical = {alias: name for name, aliases in self.groups.items() for alias in aliases}
        self.shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
        self.weights = {f"{name}.weight": name for name in linears}  # a quantised Linear's weight -> the Linear
        self.states = {name: empty_nf4_state(linear.weight.shape, device) for name, linear in linears.items()}
        self.plain: dict[str, nn.Parameter] = {}  # canonical name -> the parameter every plain alias shares
        for canonical, aliases in self.groups.items():
            if all(alias in self.weights for alias in aliases):
                continue
            meta = model.get_parameter(canonical)
            param = nn.Parameter(torch.empty(meta.shape, dtype=self.target_dtype(canonical, meta), device=device),
                                 requires_grad=meta.requires_grad)
            for alias in aliases:
                if alias not in self.weights:
                    _set_tensor(model, alias, param)
            self.plain[canonical] = param
        self.loaded: set[str] = set()

    def target_dtype(self, name: str, tensor: torch.Tensor) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        if any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", name) for m in self.fp32):
            return torch.float32
        return self.dtype

    @torch.no_grad()
    def place(self, name: str, reader: Any, key: str, shape: tuple[int, ...]) -> None:
        """Read checkpoint tensor `key` into model key `name` (and so every name tied to it) in row ranges of about
        QUANT_CHUNK elements, quantising them for a quantised Linear's weight: no full-size temporary."""
        if name not in self.canonical:  # a persistent buffer (buffers are real already; small)
            tensor = reader.get_tensor(key)
            _set_tensor(self.model, name, tensor.to(self.device, self.target_dtype(name, tensor)))
            self.loaded.add(name)
            return
        canonical = self.canonical[name]
        plain = self.plain.get(canonical)
        quantised = [self.weights[alias] for alias in self.groups[canonical] if alias in self.weights]
        piece = reader.get_slice(key)

        def pieces() -> Iterator[torch.Tensor]:
            for lo, hi in row_ranges(shape):
                part = piece[lo:hi] if shape else reader.get_tensor(key)
                if plain is not None:
                    (plain[lo:hi] if shape else plain).copy_(part)
                yield part

        if not quantised:
            for _ in pieces():
                pass
        else:
            try:
                quantize_nf4_into(self.states[quantised[0]], pieces(), self.dtype)
            except ModelDirError as err:
                raise ModelDirError(f"checkpoint tensor {key!r}: {err}") from err
            for other in quantised[1:]:
                for dst, src in zip(self.states[other].tensors(), self.states[quantised[0]].tensors(), strict=True):
                    dst.copy_(src)
        self.loaded.add(canonical)

    def read(self, file: Path, rename: Callable[[str], str], tolerated: Callable[[str, tuple, tuple], bool],
             new: set[str]) -> None:
        """Read `file` one tensor at a time; shape checks come before a tensor's bytes are read.

        Raises:
            ModelDirError: a tensor whose shape differs from the model's (other than a new head's label count),
                or a file that cannot be read.
        """
        from safetensors import SafetensorError

        with open_safetensors(file) as reader:
            for key in reader.keys():
                name = rename(key)
                if name not in self.shapes:
                    continue  # unexpected keys are skipped, as transformers does
                canonical = self.canonical.get(name, name)
                if canonical in self.loaded and name != canonical:
                    continue  # a tied copy; the canonical key wins
                found = tuple(reader.get_slice(key).get_shape())
                if found != self.shapes[name]:
                    if tolerated(name, self.shapes[name], found):
                        new.add(canonical)
                        continue
                    raise ModelDirError(f"{file}: tensor {key!r} has shape {list(found)}, but "
                                        f"{type(self.model).__name__} expects {list(self.shapes[name])} for "
                                        f"{name!r} (from config.json)")
                try:
                    self.place(name, reader, key, found)
                except (SafetensorError, OSError) as err:
                    raise ModelDirError(f"{file}: tensor {key!r} cannot be read: {err}") from err


def _owner_init(model: nn.Module, module_name: str) -> Callable[[nn.Module], None] | None:
    """The `_init_weights` of the innermost transformers model that contains `module_name`."""
    parts = module_name.split(".") if module_name else []
    for depth in range(len(parts), -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        if callable(getattr(owner, "_init_weights", None)) and hasattr(owner, "config"):
            return owner._init_weights
    return None


@torch.no_grad()
def init_new_parameters(model: nn.Module, names: list[str], dtype: torch.dtype, device: torch.device) -> None:
    """Give parameters that the checkpoint does not have (a new head) values, in `dtype` on `device`, the way
    transformers initialises them (the owning model's `_init_weights`, else the module's reset_parameters).
    Parameters already allocated are initialised in place; others of the module are marked as loaded."""
    modules: dict[str, list[str]] = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        modules.setdefault(owner, []).append(leaf)
    for owner, leaves in modules.items():
        module = model.get_submodule(owner)
        for leaf, param in module.named_parameters(recurse=False):
            if leaf in leaves:
                if param.is_meta:  # a quantised Linear's weight: a full-precision tensor until it is quantised
                    fresh = torch.empty(param.shape, dtype=dtype if param.is_floating_point() else param.dtype,
                                        device=device)
                    module._parameters[leaf] = nn.Parameter(fresh, requires_grad=param.requires_grad)
            else:
                param._is_hf_initialized = True  # loaded: transformers' init functions leave it alone
        init = _owner_init(model, owner)
        if init is not None:
            init(module)
        elif callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()


def _saved_num_labels(directory: Path, config: Any) -> int:
    """The number of labels the checkpoint's own config.json declares (the caller's config may have changed it)."""
    try:
        saved = type(config).from_pretrained(directory, local_files_only=True)
    except Exception:  # noqa: BLE001 - unreadable: nothing to tolerate
        return getattr(config, "num_labels", 0)
    return getattr(saved, "num_labels", 0)


def _check_complete(loader: _Loader, new: set[str], files: list[Path], directory: Path) -> None:
    """Every parameter is read or new; what is neither names the key and the files searched.

    A parameter may be new only outside the base model, and only as a head of a changed label count or of
    another architecture than the checkpoint's (e.g. a causal LM loaded as a sequence classifier).
    """
    model = loader.model
    prefix = getattr(model, "base_model_prefix", "") or ""
    architectures = getattr(model.config, "architectures", None) or []
    other_arch = type(model).__name__ not in architectures
    for canonical in loader.groups:
        if canonical in loader.loaded or canonical in new:
            continue
        in_base = bool(prefix) and (canonical == prefix or canonical.startswith(prefix + "."))
        if other_arch and not in_base and prefix:
            new.add(canonical)
            continue
        names = ", ".join(f.name for f in files)
        raise ModelDirError(f"model directory {directory}: no checkpoint file has {canonical!r}, which "
                            f"{type(model).__name__} needs (searched {names})")


def load_nf4_streaming(directory: Path, auto_cls: Any, config: Any, *, dtype: torch.dtype,
                       compute_dtype: torch.dtype, device: torch.device, skip: Callable[[str], bool],
                       **model_kwargs: Any) -> nn.Module:
    """Build `auto_cls` from `config` and fill it from `directory`'s safetensors, quantising every nn.Linear whose
    qualified name `skip` rejects to NF4 as its weight is read (QLoRA's base without the full-precision peak).

    Args:
        directory: a local model directory (config.json, model.safetensors or sharded with an index).
        auto_cls: a transformers Auto class (AutoModelForCausalLM, AutoModelForSequenceClassification, ...).
        config: the loaded transformers config (num_labels already set by the caller).
        dtype: the dtype of everything that is not NF4 (embeddings, norms, skipped linears, biases before the cast
            to `compute_dtype`); NF4 codes come from the weight rounded to `dtype`, as after from_pretrained(dtype).
        compute_dtype: the dtype NF4Linear dequantises to and multiplies in.
        device: where every tensor goes (quantisation runs there too).
        skip: qualified module name -> True to keep that nn.Linear in `dtype` (the output head, a new head).
        **model_kwargs: passed to `auto_cls.from_config`.

    Returns:
        The model in eval mode, with NF4Linear layers and no tensor left on the meta device.

    Raises:
        ModelDirError: pickle-only or missing weights, a missing shard, an unreadable file, a tensor of the wrong
            shape (file and key named), a weight the model needs that no file has (new heads excepted), or a key
            transformers would have to convert.
        ConfigError: a compute dtype NF4Linear cannot use on `device`.
    """
    directory = Path(directory)
    check_compute_dtype(compute_dtype, device)
    files = checkpoint_files(directory)
    model = build_skeleton(auto_cls, config, dtype, **model_kwargs)
    linears = quantised_linears(model, skip)
    loader = _Loader(model, linears, dtype, device)
    rename = key_renamer(model, set(loader.shapes))
    labels, saved = getattr(config, "num_labels", 0), _saved_num_labels(directory, config)
    new: set[str] = set()

    def tolerated(name: str, expected: tuple, found: tuple) -> bool:
        return label_dim_mismatch(expected, found, labels, saved)

    for file in files:
        loader.read(file, rename, tolerated, new)
    _check_complete(loader, new, files, directory)
    init_new_parameters(model, sorted(new), dtype, device)
    for name in new:  # a new head that is quantised after all: its fresh weight goes to NF4 like any other
        for alias in loader.groups.get(name, []):
            if alias in loader.weights:
                weight = model.get_parameter(alias).detach()
                quantize_nf4_into(loader.states[loader.weights[alias]], [weight], dtype)
    for name in linears:
        owner, _, leaf = name.rpartition(".")
        bias = model.get_submodule(name).bias
        setattr(model.get_submodule(owner), leaf, NF4Linear(loader.states[name], bias, compute_dtype))
    _move_buffers(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelDirError(f"model directory {directory}: {', '.join(left[:5])} still have no values after loading")
    return model.eval()


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers built with the skeleton (rotary inv_freq, position ids) go to `device` unchanged in dtype."""
    for module in model.modules():
        for leaf, buf in module._buffers.items():
            if buf is not None and buf.device != device and not buf.is_meta:
                module._buffers[leaf] = buf.to(device)
