"""Word layout of packed arrays shared by the compiler, the kernels and the executor: rows padded
to whole 512-bit vectors, arrays starting on a cache line."""

from __future__ import annotations

import math

import numpy as np

Shape = tuple[int, ...]
# Bits of a packed word (uint64).
WORD = 64


def _compiles_for(feature: str) -> bool:
    """Whether the CPU numba compiles the kernels for has the LLVM ``feature`` (e.g.
    ``avx512vpopcntdq``: it counts the bits of 512-bit vectors): the one
    ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` name when set, else this one."""
    from llvmlite import binding
    from numba.core import config

    cpu_name = getattr(config, "CPU_NAME", None)
    if cpu_name and cpu_name != "host":
        features = getattr(config, "CPU_FEATURES", None) or ""
    else:
        features = binding.get_host_cpu_features().flatten()
    return f"+{feature}" in features.split(",")


# Eight weight rows per 512-bit step (intrinsics.xor_popcount8) where the CPU has VPOPCNTQ;
# elsewhere four rows per 256-bit step (intrinsics.xor_popcount4) beat it on AVX2 at every row
# length measured (docs/benchmarks.md, "Engine design figures"), and rows stay unpadded.
WIDE_POPCOUNT = _compiles_for("avx512vpopcntdq")
# 32 vector registers of 512 bits (AVX-512F): the float conv's wider register blocking
# (intrinsics.CONV_BLOCK_CHANNELS).
WIDE_VECTORS = _compiles_for("avx512f")


def row_words(words: int) -> int:
    """Words per row in the kernels' layout: with :data:`WIDE_POPCOUNT`, rows of ≥ 8 words are
    padded with zero words to a multiple of 8 (whole 512-bit vectors) when that adds at most
    half; zeros never count. Otherwise rows are not padded."""
    padded = -(-words // 8) * 8
    wide = WIDE_POPCOUNT and words >= 8 and 2 * (padded - words) <= words
    return padded if wide else words


# Bytes of a cache line: kernel arrays start on one, so that with rows of a multiple of 8 words
# no 512-bit load straddles two lines (measured: docs/benchmarks.md, "Engine design figures").
CACHE_LINE = 64
CACHE_LINE_WORDS = CACHE_LINE // 8


def aligned_empty(shape: Shape, dtype: np.dtype | type = np.uint64) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a CACHE_LINE boundary (numpy
    itself only guarantees 16 bytes)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + CACHE_LINE, np.uint8)
    start = -buffer.__array_interface__["data"][0] % CACHE_LINE  # (cheaper than .ctypes)
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def aligned_copy(array: np.ndarray, dtype: np.dtype | type = np.uint64) -> np.ndarray:
    """A writable, cache-line-aligned C-contiguous copy of ``array`` as ``dtype``."""
    out = aligned_empty(array.shape, dtype)
    out[...] = array
    return out


def pad_rows(words: np.ndarray) -> np.ndarray:
    """(O, L) uint64 → (O, row_words(L)) with zero words appended, cache-line aligned."""
    width = row_words(words.shape[1])
    out = aligned_empty((words.shape[0], width))
    out[:, : words.shape[1]] = words
    out[:, words.shape[1] :] = 0
    return out
