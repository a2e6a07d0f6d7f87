"""Bit packing of ±1 tensors, 1 bit per value.

Convention (the artifact format and every kernel share it):

* a value v ∈ {−1, +1} is stored as the bit ``b = 1 if v < 0 else 0`` — the float sign bit,
  so sign(0) = +1 maps to 0;
* the packed axis is moved last and split into 64-bit words: element k lands in word k // 64,
  bit k % 64 (little-endian bit order); words are little-endian uint64;
* the unused high bits of the last word are 0 (they read as +1 on both operands, so they cancel
  in XOR and never count).

For two packed ±1 vectors of logical length K:  a·w = K − 2·popcount(a XOR w).
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 64


def words_for(length: int) -> int:
    """Number of 64-bit words that hold ``length`` bits: ceil(length / 64)."""
    if length < 0:
        raise ValueError(f"length must be non-negative, got {length}")
    return -(-length // WORD_BITS)


def pack_signs(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pack the signs of ``values`` along ``axis`` into uint64 words.

    Returns an array whose shape is ``values.shape`` with ``axis`` removed and
    ``words_for(values.shape[axis])`` appended last. Any value < 0 is a 1 bit; 0 and positive
    values are 0 bits (sign(0) = +1).
    """
    values = np.asarray(values)
    moved = np.moveaxis(values, axis, -1)
    length = moved.shape[-1]
    bits = np.signbit(moved) if moved.dtype.kind == "f" else moved < 0
    n_words = words_for(length)
    padded = np.zeros((*moved.shape[:-1], n_words * WORD_BITS), dtype=np.uint8)
    padded[..., :length] = bits
    as_bytes = np.packbits(padded, axis=-1, bitorder="little")  # (..., n_words * 8) uint8
    return np.ascontiguousarray(as_bytes).view("<u8").reshape(*moved.shape[:-1], n_words)


def unpack_signs(
    words: np.ndarray, length: int, axis: int = -1, dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """Inverse of :func:`pack_signs`: ±1 values of ``dtype`` with the packed axis put back at ``axis``.

    ``length`` is the logical length of the packed axis; the padding bits are dropped.
    """
    words = np.ascontiguousarray(words, dtype="<u8")
    if words.shape[-1] != words_for(length):
        raise ValueError(
            f"expected {words_for(length)} words for {length} bits, got {words.shape[-1]}"
        )
    as_bytes = words.view(np.uint8).reshape(*words.shape[:-1], words.shape[-1] * 8)
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :length]
    signs = (1 - 2 * bits.astype(np.int8)).astype(dtype)
    out_axis = axis if axis >= 0 else signs.ndim + axis
    return np.moveaxis(signs, -1, out_axis)


def packed_shape(logical_shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """Shape of the uint64 array that :func:`pack_signs` makes from ``logical_shape``."""
    dims = list(logical_shape)
    length = dims.pop(axis)
    return (*dims, words_for(length))
