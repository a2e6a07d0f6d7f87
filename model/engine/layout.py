"""Word layout of packed arrays shared by the compiler, the kernels and the executor: rows padded
to whole 512-bit vectors, arrays starting on a cache line."""

from __future__ import annotations

import math

import numpy as np

Shape = tuple[int, ...]
# Bits of a packed word (uint64).
WORD = 64


def row_words(words: int) -> int:
    """Words per row in the kernels' layout: rows of ≥ 8 words are padded with zero words to a
    multiple of 8 (whole 512-bit vectors) when that adds at most half; zeros never count."""
    padded = -(-words // 8) * 8
    return padded if words >= 8 and 2 * (padded - words) <= words else words


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
