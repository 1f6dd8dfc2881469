"""NF4 storage: 4-bit NormalFloat blocks with double-quantised scales (QLoRA, Dettmers et al. 2023, arXiv 2305.14314).

Pure PyTorch, bit-compatible with bitsandbytes' CPU path (`quantize_4bit(..., quant_type="nf4")`):

    w (any shape) ──flatten──► blocks of 64 ──► absmax_b = max |w_b|          (one fp32 scale per block)
                                          └──► code_i = nearest NF4 value to w_i / absmax_b   (4 bits)
    double quantisation (section 2, "Double Quantization"):
        absmax_b - mean(absmax) ──► blocks of 256 ──► 8-bit dynamic code + one fp32 absmax per 256 blocks
    dequantised  w_i = NF4[code_i] * (DYN[q_b] * absmax2_{b // 256} + mean(absmax))

Two codes share a byte, the first element of each pair in the high nibble. The tensor is flattened before
blocking, so blocks run across rows and any shape is accepted: the last block may be short (it gets its own
absmax), and an odd element count leaves the low nibble of the last byte at code 7 (the value 0.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

# The 16 NF4 values as bitsandbytes stores them (fp32). Quantiles of N(0, 1) normalised to [-1, 1], with an exact
# zero and one more positive than negative value (the paper's eq. 4, `create_normal_map(offset=0.9677083)`).
NF4_CODEBOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes accepts
ABSMAX_BLOCKSIZE = 256  # blocks of the second (8-bit) quantisation level, as in bitsandbytes
_NF4_ZERO_CODE = 7  # NF4_CODEBOOK[7] == 0.0: the padding nibble


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit dynamic code of bitsandbytes (Dettmers 2015, arXiv 1511.04561), 256 sorted fp32 values.

    For exponent e = 0 .. 6 it holds the midpoints of 2^e + 1 evenly spaced points on [0.1, 1], scaled by
    10^(e - 6), with both signs; then 0 and 1. That is 2 * 127 + 2 = 256 values, sorted ascending.
    """
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for e in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1, 2 ** (e + non_sign_bits - max_exponent_bits) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0  # in fp32, as bitsandbytes computes them
        scale = 10 ** (-(max_exponent_bits - 1) + e)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:  # only (7, 8) is used; other pairs would need the padding rule as well
        raise ConfigError(f"dynamic_map: expected {2**total_bits} values, found {len(values)} "
                          f"(max_exponent_bits={max_exponent_bits}, total_bits={total_bits})")
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()


@dataclass
class NF4State:
    """A weight in NF4: everything needed to dequantise it, and nothing full-size.

    Fields (n = weight.numel(), nb = ceil(n / blocksize) blocks):
        packed: uint8 (ceil(n / 2),), two 4-bit codes per byte, the first in the high nibble.
        absmax: per-block scales: uint8 (nb,) codes of `DYNAMIC_CODE` with double quantisation, else fp32 (nb,).
        absmax_scale: fp32 (ceil(nb / 256),), the second-level absmax (double quantisation only).
        absmax_offset: fp32 scalar, the mean of the block scales subtracted before the 8-bit step (idem).
        shape: the original weight shape.
        blocksize: elements per block (64 in QLoRA).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    shape: torch.Size
    blocksize: int = 64

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantised to 8 bits."""
        return self.absmax_scale is not None

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held (for counting bytes)."""
        return [t for t in (self.packed, self.absmax, self.absmax_scale, self.absmax_offset) if t is not None]


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ConfigError(f"NF4 blocksize: expected one of {VALID_BLOCKSIZES}, found {blocksize}")


def nf4_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes (int32, same length) and per-block absmax (fp32) of a flat fp32 tensor.

    x_i / absmax_b is clamped to [-1, 1] and rounded to the nearest NF4 value: code = #midpoints below it, so a
    value exactly on a midpoint takes the lower code. As bitsandbytes' CPU path: full blocks multiply by the fp32
    reciprocal of their absmax, the short last block divides by it, and both clamp the absmax to >= 1e-38 for
    the scaling (the short block's stored absmax is clamped too, the full blocks' are not).
    """
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)  # (nb_full, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    midpoints = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2  # 15 decision boundaries, computed in fp32
    codes = torch.bucketize(scaled, midpoints.to(flat.device), out_int32=True)
    return codes, absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: byte_j = codes[2j] << 4 | codes[2j + 1]; an odd count is padded with code 7 (0.0)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), _NF4_ZERO_CODE)])
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


# byte b -> (NF4[b >> 4], NF4[b & 15]): dequantisation looks up whole bytes, with no per-nibble index tensor
_NF4_BYTE_TABLE = torch.stack([NF4_CODEBOOK[torch.arange(256) >> 4], NF4_CODEBOOK[torch.arange(256) & 0xF]], dim=1)
_NF4_PAIR_BITS = _NF4_BYTE_TABLE.view(torch.int64).reshape(-1)  # (256,): a byte's two fp32 values in one int64


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit codes (int64) of `packed`, high nibble first."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)  # (2 * len(packed),)
    return codes[:n].long()


_LUT_SIZE = 65536  # bins of [-1, 1] in bitsandbytes' CPU 8-bit quantiser


def nearest_code_lut(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry table (uint8) bitsandbytes' CPU kernel uses instead of a search of the 8-bit code.

    Bin i stands for v_i = -1 + 2i / 65535 (fp32) and holds the index of the code value nearest to v_i:
    the number of midpoints (c_j + c_{j+1}) / 2 strictly below v_i.
    """
    midpoints = (code[:-1] + code[1:]) / 2  # fp32
    bins = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, bins).to(torch.uint8)


_DYNAMIC_LUT = nearest_code_lut(DYNAMIC_CODE)


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE,
                            code: torch.Tensor = DYNAMIC_CODE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantisation of a flat fp32 tensor: (uint8 indices into `code`, fp32 absmax per block).

    As bitsandbytes' CPU kernel (0.50): u = clamp(v * (1 / absmax_b), -1, 1) is binned to
    t = trunc(((u + 1) * 0.5) * 65535 + 0.5), every step in fp32, and the bin's entry of `nearest_code_lut`
    is the code. So the code is the nearest to the bin centre, not always to u itself (off by one index for
    about 1 value in 800 near a midpoint). A block of zeros gets absmax 0 and codes 0.
    """
    n = values.numel()
    nb = -(-n // blocksize)
    blocks = torch.nn.functional.pad(values.float(), (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    inv = 1.0 / torch.where(absmax > 0, absmax, 1.0)
    unit = torch.clamp(blocks * inv.unsqueeze(1), -1.0, 1.0)
    bins = ((unit + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)  # (nb, blocksize), trunc == floor (>= 0)
    lut = _DYNAMIC_LUT if code is DYNAMIC_CODE else nearest_code_lut(code)
    indices = torch.where((absmax > 0).unsqueeze(1), lut.to(values.device)[bins], 0)
    return indices.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise_8bit(indices: torch.Tensor, absmax: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE,
                              code: torch.Tensor = DYNAMIC_CODE) -> torch.Tensor:
    """v_i = code[q_i] * absmax_{i // blocksize}, in fp32 (a new tensor; full blocks scaled as one 2-D view)."""
    n = indices.numel()
    full = n - n % blocksize
    values = torch.index_select(code.to(indices.device), 0, indices.int())
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """Quantise a float tensor of any shape to NF4 (QLoRA section 2; bitsandbytes' `quantize_4bit`, nf4).

    With `double_quant`, the fp32 block scales become c2 = mean(absmax) and 8-bit codes of absmax - c2 in blocks
    of 256 with their own fp32 absmax: 8 + 32/256 bits per block instead of 32.

    Raises:
        ConfigError: a blocksize bitsandbytes does not accept, a non-float or empty weight.
    """
    _check_blocksize(blocksize)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"quantize_nf4: expected a float32/float16/bfloat16 weight, found {weight.dtype}")
    if weight.numel() == 0:
        raise ConfigError(f"quantize_nf4: expected a non-empty weight, found shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1).float()
    codes, absmax = nf4_codes(flat, blocksize)
    scale = offset = None
    if double_quant:
        offset = absmax.mean()
        absmax, scale = quantize_blockwise_8bit(absmax - offset)
    return NF4State(pack_nibbles(codes), absmax, scale, offset, weight.shape, blocksize)


def block_absmax(state: NF4State) -> torch.Tensor:
    """The fp32 scale of every block: absmax itself, or DYN[q] * absmax2 + mean with double quantisation."""
    if not state.double_quant:
        return state.absmax.float()
    return dequantize_blockwise_8bit(state.absmax, state.absmax_scale) + state.absmax_offset


def dequantize_nf4(state: NF4State, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_i = NF4[code_i] * absmax_{i // blocksize}, computed in fp32 and rounded once to `dtype`.

    Allocates a tensor of the full shape (the only full-size tensor NF4 ever makes). Each byte's two fp32 values
    come from one 8-byte index_select (the byte table seen as int64) and are scaled in place: about 10x faster
    on the CPU than a (bytes, 2) fancy-index gather followed by a scaled copy, and bit for bit the same.
    """
    n = state.shape.numel()
    table = _NF4_PAIR_BITS.to(state.packed.device)
    values = torch.index_select(table, 0, state.packed.int()).view(torch.float32)[:n]  # (n,) fp32
    scales = block_absmax(state)
    full = n - n % state.blocksize
    values[:full].view(-1, state.blocksize).mul_(scales[: full // state.blocksize, None])
    if full < n:
        values[full:].mul_(scales[-1])
    return values.view(state.shape).to(dtype)
