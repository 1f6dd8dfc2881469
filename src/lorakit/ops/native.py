"""Compiled CPU kernels for the adapter's hot spots, built on first use: Philox4x32-10 dropout and a^T b.

PyTorch's CPU generator (mt19937) produces about one 32-bit value per 1.6 ns on one thread, and dropout on
every adapted layer's input needs N x k draws per layer and step: the largest cost of LoRA dropout on a CPU.
Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; the generator behind
PyTorch's, JAX's and TensorFlow's dropout on GPUs) maps a 128-bit counter and a 64-bit key to 128 random
bits with ten rounds of 32-bit multiplies, so a C loop over counters vectorises and splits over threads
without changing the values: per 720,896 words (2.9 M dropout elements) it takes 0.97 ms on one thread and
0.50 ms on two here (AVX-512), against 3.1 ms for PyTorch's generator.

The adapter's weight gradients, grad A = gh^T x (r x k) and grad B^T = h^T g (r x d), are reductions over the
N tokens into a rank-r result; BLAS runs that shape at a third of its GEMM speed. `at_b` streams the tall
operand once through a register-blocked kernel: on an AVX-512 CPU 2.3-2.8x faster than MKL's when the operands
are in cache and 1.2-2x when they come from memory (N = 1024, r = 16, k = 512 to 2816, 2 threads); on an AVX2-only
CPU its 64-float blocks spill out of the 16 vector registers and it ran ~10x slower than MKL. So `at_b` measures
both once per process (`atb_kernel_pays`) and uses the faster.

The C source below is compiled once with the system's C compiler into a cache directory
(`$LORAKIT_CACHE`, default `~/.cache/lorakit`) and loaded with ctypes; no PyTorch headers are needed, so the build
takes about a second. Without a compiler, when the build fails, or with `LORAKIT_NATIVE=0`, `random_words`
returns None and callers use PyTorch's generator, and `at_b` uses PyTorch's matmul. Keys come from PyTorch's
default generator, so `torch.manual_seed` makes the draws reproducible; they do not depend on the number of
threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 64  /* blocks per tile: 4 x 64 words, 1 KiB */

/* One Philox4x32-10 round (Salmon, Moraes, Dror, Shaw, SC'11; Random123's philox4x32round). */
#define ROUND(ka, kb) do {                                                         \
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2; \
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ (ka);                            \
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ (kb);                            \
        c0 = n0; c1 = (uint32_t)p1; c2 = n2; c3 = (uint32_t)p0;                    \
    } while (0)

#ifdef LORAKIT_CLONES  /* x86-64: one copy per vector ISA, picked at load time (no -march=native in a cache) */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* The stream: tile t holds blocks t*TILE .. t*TILE+TILE-1 (block i: counter = i as two 32-bit words, then 0, 0;
   key = (k0, k1)), stored planar within the tile: word w of block t*TILE+b is at tile[w * TILE + b]. Planar
   stores keep the loop over blocks vectorised. */
CLONES static void tile_words(uint32_t *restrict tile, uint64_t t, uint32_t k0, uint32_t k1) {
    uint32_t ka[10], kb[10];  /* the key bumped by the Weyl constants before rounds 2..10 */
    for (int r = 0; r < 10; r++) {
        ka[r] = k0 + (uint32_t)r * 0x9E3779B9u;
        kb[r] = k1 + (uint32_t)r * 0xBB67AE85u;
    }
    for (int b = 0; b < TILE; b++) {
        uint64_t j = t * TILE + (uint64_t)b;
        uint32_t c0 = (uint32_t)j, c1 = (uint32_t)(j >> 32), c2 = 0u, c3 = 0u;
        ROUND(ka[0], kb[0]); ROUND(ka[1], kb[1]); ROUND(ka[2], kb[2]); ROUND(ka[3], kb[3]); ROUND(ka[4], kb[4]);
        ROUND(ka[5], kb[5]); ROUND(ka[6], kb[6]); ROUND(ka[7], kb[7]); ROUND(ka[8], kb[8]); ROUND(ka[9], kb[9]);
        tile[b] = c0; tile[TILE + b] = c1; tile[2 * TILE + b] = c2; tile[3 * TILE + b] = c3;
    }
}

/* Run the statements for tiles 0..ntiles-1 over nthreads OpenMP threads (PyTorch's runtime once torch is loaded).
   The stream is counter-based, so no result depends on nthreads. */
#ifdef _OPENMP
#define FOR_TILES(ntiles, nthreads, ...) do {                                           \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")              \
        for (int64_t t = 0; t < (ntiles); t++) { __VA_ARGS__; }                         \
    } while (0)
#else
#define FOR_TILES(ntiles, nthreads, ...) do {                                           \
        (void)(nthreads); for (int64_t t = 0; t < (ntiles); t++) { __VA_ARGS__; }       \
    } while (0)
#endif

/* The first ntiles tiles of the stream: 4 * TILE * ntiles words. */
void lorakit_philox_fill(uint32_t *restrict out, int64_t ntiles, uint32_t k0, uint32_t k1, int nthreads) {
    FOR_TILES(ntiles, nthreads, tile_words(out + t * 4 * TILE, (uint64_t)t, k0, k1));
}

/* Dropout from the stream read as int16 values u_e (element e: half e % 2 of word e / 2): element e is kept iff
   u_e >= threshold, the rule of ops.lora.keep_mask. Each tile covers 8 * TILE elements. */
CLONES static void drop_tile(float *restrict out, const float *restrict x, int64_t lo, int64_t hi,
                             const int16_t *restrict u, int16_t threshold) {
    for (int64_t e = lo; e < hi; e++) out[e] = u[e - lo] >= threshold ? x[e] : 0.0f;
}

CLONES static void drop_backward_tile(float *restrict gx, float *restrict g_in, const float *restrict x,
                                      int64_t lo, int64_t hi, const int16_t *restrict u, int16_t threshold) {
    for (int64_t e = lo; e < hi; e++) {
        int keep = u[e - lo] >= threshold;
        if (gx) gx[e] += keep ? g_in[e] : 0.0f;
        if (x) g_in[e] = keep ? x[e] : 0.0f;
    }
}

/* out = x * keep (n floats). */
void lorakit_dropout(float *restrict out, const float *restrict x, int64_t n, uint32_t k0, uint32_t k1,
                     int16_t threshold, int nthreads) {
    int64_t per = 8 * TILE, ntiles = (n + per - 1) / per;
    FOR_TILES(ntiles, nthreads, {
        uint32_t tile[4 * TILE];
        tile_words(tile, (uint64_t)t, k0, k1);
        int64_t lo = t * per, hi = lo + per < n ? lo + per : n;
        drop_tile(out, x, lo, hi, (const int16_t *)tile, threshold);
    });
}

/* Backward of y = (x * keep) A^T given g_in = grad_y A (n floats, overwritten): gx += g_in * keep (if gx), then
   g_in = x * keep (if x), the input of grad_A = grad_y^T (x * keep). One pass, the mask made again from the key. */
void lorakit_dropout_backward(float *restrict gx, float *restrict g_in, const float *restrict x, int64_t n,
                              uint32_t k0, uint32_t k1, int16_t threshold, int nthreads) {
    int64_t per = 8 * TILE, ntiles = (n + per - 1) / per;
    FOR_TILES(ntiles, nthreads, {
        uint32_t tile[4 * TILE];
        tile_words(tile, (uint64_t)t, k0, k1);
        int64_t lo = t * per, hi = lo + per < n ? lo + per : n;
        drop_backward_tile(gx, g_in, x, lo, hi, (const int16_t *)tile, threshold);
    });
}

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
/* a^T b for a tall, thin a (n, r) and b (n, k): the weight gradients of a rank-r adapter (grad A = gh^T x,
   grad B^T = h^T g). BLAS libraries run this reduction over n at a fraction of their GEMM speed. Here each thread
   owns 64-column blocks of out (no reduction between threads) and keeps a 4 x 64 block of out in 16 vector
   registers while it streams 256 rows of b through them; b is read once from memory, the other row blocks of out
   re-read it from cache. */
#define CB 64   /* columns per block: 4 vectors of 16 floats */
#define RB 4    /* rows of out per register block */
#define TB 256  /* rows of a and b per pass */

/* out[i0..i0+rb, j0..j0+64] (+)= a[t0..t1, i0..]^T b[t0..t1, j0..j0+64], full 64-column block */
CLONES static void block_full(float *restrict out, const float *restrict a, const float *restrict b,
                              int64_t r, int64_t k, int64_t i0, int rb, int64_t j0, int64_t t0, int64_t t1, int first) {
    v16 acc[RB][4];
    for (int ii = 0; ii < RB; ii++)
        for (int q = 0; q < 4; q++) {
            if (ii < rb && !first) acc[ii][q] = *(const v16u *)(out + (i0 + ii) * k + j0 + 16 * q);
            else acc[ii][q] = (v16){0};
        }
    for (int64_t t = t0; t < t1; t++) {
        const float *br = b + t * k + j0;
        v16 b0 = *(const v16u *)br, b1 = *(const v16u *)(br + 16), b2 = *(const v16u *)(br + 32), b3 = *(const v16u *)(br + 48);
        const float *ar = a + t * r + i0;
        for (int ii = 0; ii < RB; ii++) {
            float s = ii < rb ? ar[ii] : 0.0f;
            acc[ii][0] += s * b0; acc[ii][1] += s * b1; acc[ii][2] += s * b2; acc[ii][3] += s * b3;
        }
    }
    for (int ii = 0; ii < rb; ii++)
        for (int q = 0; q < 4; q++) *(v16u *)(out + (i0 + ii) * k + j0 + 16 * q) = acc[ii][q];
}

/* columns j0..k-1 (fewer than 64), scalar */
static void block_tail(float *restrict out, const float *restrict a, const float *restrict b,
                       int64_t r, int64_t k, int64_t j0, int64_t t0, int64_t t1, int first) {
    for (int64_t i = 0; i < r; i++)
        for (int64_t j = j0; j < k; j++) {
            float s = first ? 0.0f : out[i * k + j];
            for (int64_t t = t0; t < t1; t++) s += a[t * r + i] * b[t * k + j];
            out[i * k + j] = s;
        }
}

/* out (r, k) = a^T b for row-major a (n, r), b (n, k), out (r, k). */
void lorakit_atb(float *restrict out, const float *restrict a, const float *restrict b, int64_t n, int64_t r,
                 int64_t k, int nthreads) {
    int64_t nfull = k / CB;
    if (n == 0) { memset(out, 0, sizeof(float) * r * k); return; }
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static)
#endif
    for (int64_t jb = 0; jb <= nfull; jb++) {
        int64_t j0 = jb * CB;
        for (int64_t t0 = 0; t0 < n; t0 += TB) {
            int64_t t1 = t0 + TB < n ? t0 + TB : n;
            if (jb < nfull) {
                for (int64_t i0 = 0; i0 < r; i0 += RB)
                    block_full(out, a, b, r, k, i0, (int)(r - i0 < RB ? r - i0 : RB), j0, t0, t1, t0 == 0);
            } else if (j0 < k) {
                block_tail(out, a, b, r, k, j0, t0, t1, t0 == 0);
            }
        }
    }
}
"""

_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99")
_UNSET = object()
_lib: object = _UNSET
_lock = threading.Lock()


def _cache_dir() -> Path:
    root = os.environ.get("LORAKIT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"


def _build() -> ctypes.CDLL:
    """Compile the source (once per source, compiler and flags) and load it. Raises OSError on any failure."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler found (set CC)")
    digest = hashlib.sha256("\0".join((_SOURCE, compiler, *_FLAGS)).encode()).hexdigest()[:16]
    cache = _cache_dir()
    library = cache / f"kernels-{digest}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: never a half-written .so
            source, built = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            source.write_text(_SOURCE)
            errors = []
            # OpenMP and per-ISA clones where the compiler has them (GCC on x86-64), else without
            for extra in (("-fopenmp", "-DLORAKIT_CLONES"), ("-fopenmp",), ("-DLORAKIT_CLONES",), ()):
                try:
                    subprocess.run([compiler, *_FLAGS, *extra, str(source), "-o", str(built)], check=True,
                                   capture_output=True, timeout=120)
                    break
                except (subprocess.SubprocessError, OSError) as exc:
                    detail = getattr(exc, "stderr", b"") or b""
                    errors.append(f"{exc} {detail.decode(errors='replace')[-300:]}")
            else:
                raise OSError(f"{compiler} failed: {' | '.join(errors)}")
            os.replace(built, library)
    lib = ctypes.CDLL(str(library))
    u32, i64, ptr = ctypes.c_uint32, ctypes.c_int64, ctypes.c_void_p
    lib.lorakit_philox_fill.argtypes = [ptr, i64, u32, u32, ctypes.c_int]
    lib.lorakit_dropout.argtypes = [ptr, ptr, i64, u32, u32, ctypes.c_int16, ctypes.c_int]
    lib.lorakit_dropout_backward.argtypes = [ptr, ptr, ptr, i64, u32, u32, ctypes.c_int16, ctypes.c_int]
    lib.lorakit_atb.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    for fn in (lib.lorakit_philox_fill, lib.lorakit_dropout, lib.lorakit_dropout_backward, lib.lorakit_atb):
        fn.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled generator, or None (disabled by LORAKIT_NATIVE=0, or it could not be built: warned once)."""
    global _lib
    if _lib is _UNSET:
        with _lock:
            if _lib is _UNSET:
                if os.environ.get("LORAKIT_NATIVE", "1") == "0":
                    _lib = None
                else:
                    try:
                        _lib = _build()
                    except OSError as exc:
                        warnings.warn(f"lorakit: the native dropout generator is unavailable ({exc}); "
                                      "using PyTorch's generator instead (slower)", RuntimeWarning, stacklevel=2)
                        _lib = None
    return _lib  # type: ignore[return-value]


TILE = 64  # blocks per tile of the stream (see the C source)


def _key_halves(key: int) -> tuple[int, int]:
    return key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF


def draw_key() -> int:
    """A 64-bit Philox key from PyTorch's default generator (so torch.manual_seed fixes every draw)."""
    return int(torch.empty((), dtype=torch.int64).random_(-(2**63), None)) & 0xFFFFFFFFFFFFFFFF


def stream(n_words: int, key: int, threads: int | None = None) -> torch.Tensor | None:
    """The first n_words 64-bit words of the Philox4x32-10 stream under `key` (int64; tiles of TILE blocks, each
    stored planar: see the C source), or None without the compiled generator. `threads` (default
    torch.get_num_threads()) changes only the speed, never the values."""
    lib = library()
    if lib is None:
        return None
    per_tile = 2 * TILE  # 64-bit words per tile
    ntiles = (n_words + per_tile - 1) // per_tile
    out = torch.empty(ntiles * per_tile, dtype=torch.int64)
    if ntiles:
        lib.lorakit_philox_fill(out.data_ptr(), ntiles, *_key_halves(key), threads or torch.get_num_threads())
    return out[:n_words]


def random_words(n: int) -> torch.Tensor | None:
    """n uniform int64 values (every bit uniform) from Philox4x32-10 under a fresh key from PyTorch's default
    generator, or None without the compiled generator."""
    if library() is None:
        return None
    return stream(n, draw_key())


def fused_dropout_applies(x: torch.Tensor) -> bool:
    """Whether `dropout_mul` / `dropout_backward` take x: a contiguous fp32 CPU tensor, and the library loaded."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and library() is not None


def dropout_mul(x: torch.Tensor, key: int, threshold: int) -> torch.Tensor:
    """x ⊙ keep (a new tensor) in one pass, keep_e = (int16 value e of `stream(.., key)`) >= threshold: the mask
    keep_mask would make from those words. x: see `fused_dropout_applies`."""
    out = torch.empty_like(x)
    library().lorakit_dropout(out.data_ptr(), x.data_ptr(), x.numel(), *_key_halves(key), threshold,
                              torch.get_num_threads())
    return out


def dropout_backward(grad_x: torch.Tensor | None, g_in: torch.Tensor, x: torch.Tensor | None, key: int,
                     threshold: int) -> None:
    """In one pass, with the mask of `dropout_mul(x, key, threshold)` made again: grad_x += g_in ⊙ keep (if
    grad_x is given), then g_in = x ⊙ keep (if x is given). All contiguous fp32 CPU tensors of one size."""
    for t in (grad_x, x):
        if t is not None and t.numel() != g_in.numel():
            raise ValueError(f"dropout_backward: sizes differ ({t.numel()} vs {g_in.numel()})")
    library().lorakit_dropout_backward(0 if grad_x is None else grad_x.data_ptr(), g_in.data_ptr(),
                                       0 if x is None else x.data_ptr(), g_in.numel(), *_key_halves(key),
                                       threshold, torch.get_num_threads())


def _fits(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 and t.is_contiguous()


def atb_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b (r, k) by the compiled kernel, for contiguous fp32 CPU matrices a (n, r), b (n, k), the library loaded
    (`at_b` checks that, and whether the kernel is the faster one here)."""
    n, r = a.shape
    out = torch.empty(r, b.shape[1], dtype=torch.float32)
    library().lorakit_atb(out.data_ptr(), a.data_ptr(), b.data_ptr(), n, r, b.shape[1], torch.get_num_threads())
    return out


_atb_pays: bool | None = None


def atb_kernel_pays() -> bool:
    """Whether the compiled a^T b beats PyTorch's matmul on this machine: measured once per process, on an
    adapter-sized product (n = 1024, r = 16, k = 512; best of 5 each). The kernel's 64-float register blocks suit
    AVX-512 (2.3-2.8x MKL's speed); on an AVX2-only CPU it measured ~10x slower than MKL, so the choice is made by
    measuring, not by the compiler's target. `LORAKIT_ATB=kernel` / `blas` fixes it (tests, reproducible runs)."""
    global _atb_pays
    forced = os.environ.get("LORAKIT_ATB", "")
    if forced in ("kernel", "blas"):
        return forced == "kernel" and library() is not None
    if _atb_pays is None:
        if library() is None:
            _atb_pays = False
        else:
            gen = torch.Generator().manual_seed(0)
            a, b = torch.randn(1024, 16, generator=gen), torch.randn(1024, 512, generator=gen)
            _atb_pays = _best_of(lambda: atb_kernel(a, b)) < _best_of(lambda: a.t() @ b)
    return _atb_pays


def _best_of(fn: Callable[[], object], times: int = 5) -> float:
    fn()  # warm-up (first touch, thread pools)
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def at_b(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b (r, k) for a tall, thin a (n, r) and b (n, k): the weight gradients of an adapter.

    The compiled kernel where both are contiguous fp32 CPU matrices, the library is loaded and it is the faster
    one on this machine (`atb_kernel_pays`); `a.t() @ b` otherwise. The kernel sums over n in another order than
    BLAS: results agree to fp32 rounding, not bit for bit.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"at_b: a (n, r) and b (n, k) with the same n, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (_fits(a) and _fits(b)) or a.requires_grad or b.requires_grad or not atb_kernel_pays():
        return a.t() @ b
    return atb_kernel(a, b)
