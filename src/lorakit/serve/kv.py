"""Per-sequence KV caches batched for one decode forward: sequences of different lengths share a left-padded
cache, with an attention mask that is 0 on the pads and each row's own positions.

    row 0:  [pad pad  k0  k1  k2 ]  + new token at position 3      pads[0] = 2
    row 1:  [ k0  k1  k2  k3  k4 ]  + new token at position 5      pads[1] = 0
            attention_mask = [[0 0 1 1 1 1], [1 1 1 1 1 1]]        position_ids = [[3], [5]]

A sequence joins with the cache of its own prefill (batch of one); whichever side is shorter is padded on the
left. Rows that leave are dropped, and pad columns every row shares are trimmed. Between those changes the batch
stays one DynamicCache that each decode forward grows by a column, so a step with no join or leave re-pads
nothing. The cache tensors are (batch, kv_heads, length, head_dim) per layer, as transformers' DynamicLayer keeps
them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (batch, kv_heads, length, head_dim)


def takes_argument(model: nn.Module, name: str) -> bool:
    """Whether the model's forward has a parameter `name`."""
    return name in inspect.signature(model.forward).parameters


def cache_argument(model: nn.Module) -> str:
    """The name a model's forward takes its KV cache under: "cache" (newer transformers), else the older
    "past_key_values"."""
    return "cache" if takes_argument(model, "cache") else "past_key_values"


def empty_cache() -> Any:
    """A fresh transformers DynamicCache (its layers are created as the model fills them)."""
    from transformers import DynamicCache

    return DynamicCache()


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (`cache` in transformers >= 5.x, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_layers(cache: Any) -> list[LayerKV]:
    """The (keys, values) of every layer of a returned cache: a DynamicCache of full-attention layers, or the
    legacy tuple of (key, value) pairs.

    Raises:
        ConfigError: no cache came back (the model does not cache), or layers the engine cannot pad and split
            (sliding-window, quantized or recurrent caches).
    """
    if cache is None:
        raise ConfigError("the model returned no KV cache (use_cache=True): it cannot be served by the engine")
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v, *_ in cache]
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ConfigError(f"unsupported KV cache {type(cache).__name__}: the engine needs per-layer keys and values")
    found: list[LayerKV] = []
    for i, layer in enumerate(layers):
        if type(layer) is not DynamicLayer:
            raise ConfigError(
                f"KV cache layer {i} is a {type(layer).__name__}: the engine batches full-attention caches only "
                f"(DynamicLayer); sliding-window, quantized and recurrent caches are not supported"
            )
        if layer.keys is None or layer.values is None:
            raise ConfigError(f"KV cache layer {i} is empty after a forward: the model did not fill its cache")
        found.append((layer.keys, layer.values))
    return found


def make_cache(layers: Sequence[LayerKV]) -> Any:
    """A DynamicCache holding `layers` (the tensors are used as they are, not copied)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])


def left_pad(tensor: torch.Tensor, pad: int) -> torch.Tensor:
    """`tensor` (batch, heads, length, dim) with `pad` zero columns before the first position."""
    if pad == 0:
        return tensor
    zeros = tensor.new_zeros(tensor.shape[0], tensor.shape[1], pad, tensor.shape[3])
    return torch.cat([zeros, tensor], dim=2)


def attention_mask(pads: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """(batch, width + 1) int64: 0 on each row's pad columns, 1 on its cached positions and the new token."""
    columns = torch.arange(width + 1, device=device)  # (width + 1,)
    starts = torch.tensor(list(pads), dtype=torch.int64, device=device)  # (batch,)
    return (columns[None, :] >= starts[:, None]).to(torch.int64)


def next_positions(pads: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """(batch, 1) int64: each row's position for its new token (its own number of cached tokens)."""
    return torch.tensor([[width - pad] for pad in pads], dtype=torch.int64, device=device)


class BatchCache:
    """The running sequences' KV caches as one left-padded batch (row i = the i-th running sequence)."""

    def __init__(self) -> None:
        self.layers: list[LayerKV] = []  # per layer: keys, values (rows, kv_heads, width, head_dim)
        self.pads: list[int] = []  # per row: how many leading columns are padding
        self._cache: Any = None  # the DynamicCache over `layers` (built when the rows change, grown by forwards)

    def __len__(self) -> int:
        return len(self.pads)

    @property
    def width(self) -> int:
        """The cached length of the batch (the longest row; the others are padded up to it)."""
        return self.layers[0][0].shape[2] if self.layers else 0

    def lengths(self) -> list[int]:
        """Each row's own number of cached tokens."""
        return [self.width - pad for pad in self.pads]

    def add(self, layers: Sequence[LayerKV]) -> None:
        """Append one sequence's cache (batch of one, as its prefill returned it) as the last row.

        Raises:
            ConfigError: a cache whose layer count or shapes do not match the batch's.
        """
        length = layers[0][0].shape[2]
        self._cache = None
        if not self.layers:
            self.layers = [(k, v) for k, v in layers]
            self.pads = [0]
            return
        if len(layers) != len(self.layers):
            raise ConfigError(f"a cache of {len(layers)} layers cannot join a batch of {len(self.layers)}")
        width = max(self.width, length)
        grow, pad = width - self.width, width - length
        self.layers = [
            (torch.cat([left_pad(bk, grow), left_pad(k, pad)]), torch.cat([left_pad(bv, grow), left_pad(v, pad)]))
            for (bk, bv), (k, v) in zip(self.layers, layers)
        ]
        self.pads = [p + grow for p in self.pads] + [pad]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order); trim the pad columns every remaining row has."""
        if len(rows) == len(self.pads) and list(rows) == list(range(len(self.pads))):
            return
        self._cache = None
        if not rows:
            self.layers, self.pads = [], []
            return
        pads = [self.pads[r] for r in rows]
        trim = min(pads)
        index = torch.tensor(list(rows), dtype=torch.int64, device=self.layers[0][0].device)
        self.layers = [(k.index_select(0, index)[:, :, trim:], v.index_select(0, index)[:, :, trim:])
                       for k, v in self.layers]
        self.pads = [p - trim for p in pads]

    def decode_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention_mask (rows, width + 1) and position_ids (rows, 1) of the next decode forward."""
        return attention_mask(self.pads, self.width, device), next_positions(self.pads, self.width, device)

    def cache(self) -> Any:
        """The DynamicCache to pass to the next decode forward (the same object while the rows do not change)."""
        if self._cache is None:
            self._cache = make_cache(self.layers)
        return self._cache

    def update(self, cache: Any) -> None:
        """Take the cache a decode forward returned (one column longer, same rows).

        Raises:
            ConfigError: a returned cache that is not the batch's rows one column longer, or of a kind the
                engine cannot batch (see cache_layers).
        """
        layers = cache_layers(cache)
        rows, width = len(self.pads), self.width
        if len(layers) != len(self.layers) or any(k.shape[0] != rows or k.shape[2] != width + 1 for k, _ in layers):
            self.clear()
            raise ConfigError(f"the decode forward returned a cache that is not {rows} rows x {width + 1} positions")
        self.layers = layers
        self._cache = cache

    def clear(self) -> None:
        """Drop every row."""
        self.layers, self.pads, self._cache = [], [], None
