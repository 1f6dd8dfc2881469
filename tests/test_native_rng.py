"""The compiled Philox4x32-10 generator behind CPU dropout draws (ops.native), and its fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorakit.ops import native
from lorakit.ops.lora import draw_dropout_bits, keep_mask

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox_reference(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 in plain Python integers (Random123's philox4x32round and bumpkey)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: the fallback is tested below")


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [  # Random123's known-answer vectors for philox4x32_10 (kat_vectors)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_reference_matches_random123_known_answers(counter, key, expected):
    assert philox_reference(counter, key) == expected


def _reference_word(key: int, index: int) -> int:
    """uint32 word `index` of the stream: tile t = index // 256 holds blocks 64 t .. 64 t + 63, planar."""
    tile, rest = divmod(index, 4 * native.TILE)
    plane, block = divmod(rest, native.TILE)
    j = tile * native.TILE + block
    return philox_reference((j & MASK32, j >> 32, 0, 0), (key & MASK32, key >> 32))[plane]


@needs_native
@pytest.mark.parametrize("key", [0, 1, 0x0123456789ABCDEF, 2**64 - 1])
def test_compiled_stream_equals_the_reference(key):
    words = native.stream(300, key)  # 600 uint32 words: two whole tiles and part of a third
    assert words is not None and words.shape == (300,) and words.dtype == torch.int64
    got = [v & MASK32 for v in words.view(torch.int32).tolist()]
    for index in [*range(0, 600, 7), 255, 256, 599]:
        assert got[index] == _reference_word(key, index), index


@needs_native
def test_values_do_not_depend_on_the_number_of_threads():
    one = native.stream(100_003, 42, threads=1)
    assert torch.equal(one, native.stream(100_003, 42, threads=2))
    assert torch.equal(one, native.stream(100_003, 42, threads=3))
    assert torch.equal(one[:1000], native.stream(1000, 42))  # a prefix of the stream


@needs_native
@pytest.mark.parametrize("n", [1, 511, 512, 513, 100_000])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_dropout_kernels_equal_the_mask_from_the_same_stream(n, p):
    """dropout_mul and dropout_backward make the mask keep_mask makes from the same words, in one pass."""
    torch.manual_seed(n)
    x, g_in, grad_x = torch.randn(n), torch.randn(n), torch.randn(n)
    key, level = 987654321, round(p * 65536)
    bits = native.stream((n + 3) // 4, key).view(torch.int16)[:n]
    mask = keep_mask(bits, 1 - level / 65536, torch.float32)
    assert torch.equal(native.dropout_mul(x, key, level - 32768), x * mask)
    expected_gx, expected_in = grad_x + g_in * mask, x * mask
    native.dropout_backward(grad_x, g_in, x, key, level - 32768)
    assert torch.equal(grad_x, expected_gx) and torch.equal(g_in, expected_in)
    g2, gx2 = torch.randn(n), torch.randn(n)
    expected = gx2 + g2 * mask
    native.dropout_backward(gx2, g2, None, key, level - 32768)  # LoRA-FA: no x, g_in left as it was
    assert torch.equal(gx2, expected)


@needs_native
def test_words_are_reproducible_under_manual_seed_and_every_bit_is_balanced():
    torch.manual_seed(3)
    a = native.random_words(1 << 18)
    torch.manual_seed(3)
    b = native.random_words(1 << 18)
    c = native.random_words(1 << 18)
    assert a is not None and a.dtype == torch.int64 and a.shape == (1 << 18,)
    assert torch.equal(a, b) and not torch.equal(b, c)
    bits = torch.stack([(a >> i) & 1 for i in range(64)]).double().mean(1)  # each bit position: P(1) = 1/2
    assert (bits - 0.5).abs().max() < 0.005  # 6 sigma at n = 2^18 is 0.0059


def test_draws_fall_back_to_pytorch_without_the_native_generator():
    """LORAKIT_NATIVE=0, and a compiler that fails (a warning, then PyTorch's generator): dropout still works."""
    code = (
        "import warnings, torch\n"
        "from lorakit.ops import native\n"
        "from lorakit.ops.lora import draw_dropout_bits, keep_mask\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert native.library() is None and native.random_words(8) is None\n"
        "bits, keep = draw_dropout_bits(torch.zeros(512, 512), 0.25)\n"
        "rate = keep_mask(bits, keep, torch.float32).mean().item()\n"
        "assert abs(rate - 0.75) < 0.01, rate\n"
        "print(len(caught))\n"
    )
    env = {**os.environ, "LORAKIT_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"  # disabled on purpose: no warning
    env = {**os.environ, "CC": "false", "LORAKIT_CACHE": os.environ.get("TMPDIR", "/tmp") + "/lorakit-no-cc"}
    env.pop("LORAKIT_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"  # the failed build is reported once


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_draw_keeps_each_element_with_probability_1_minus_p(p):
    torch.manual_seed(0)
    bits, keep = draw_dropout_bits(torch.zeros(1024, 1024), p)
    mask = keep_mask(bits, keep, torch.float32)
    assert abs(mask.mean().item() - (1 - p)) < 5 * (p * (1 - p) / mask.numel()) ** 0.5
    rows, cols = mask.mean(1), mask.mean(0)  # no row or column structure (a counter-based generator could show one)
    assert (rows - (1 - p)).abs().max() < 6 * (p * (1 - p) / 1024) ** 0.5
    assert (cols - (1 - p)).abs().max() < 6 * (p * (1 - p) / 1024) ** 0.5
