"""numba kernels of the CPU engine: XNOR-popcount products on packed bits.

Conventions (shared with :mod:`model.packing`): a ±1 value is one bit, 1 ⇔ −1; a {0, 1} value
(``step`` activations) is one bit, 1 ⇔ 1; bits are little-endian in uint64 words; unused high
bits of a last word are 0 in both operands, so they never count.

For rows ``a`` and ``w`` of ``L`` words the kernels compute ``P = popcount(a XOR w)`` and decide
``bit = (P ≥ cut) XOR invert`` per output channel (the folded BatchNorm + binarizer, see
:mod:`model.engine.folding`):

* ±1 inputs, K logical bits:  a·w = K − 2P
* {0, 1} inputs:              a·w = P − popcount(w)
* integer inputs as bit-planes x = Σ_b 2^b x_b:  a·w = Σ_b 2^b (P_b − popcount(w))

``popcount`` is LLVM's ``ctpop`` (the hand-written intrinsics are in
:mod:`model.engine.intrinsics`). On AVX-512 VPOPCNTDQ machines eight weight rows share each
512-bit step, ``vpopcntq`` on zmm registers (``tests/model/engine/test_kernels.py`` checks the
assembly); elsewhere four rows share each 256-bit step (:data:`~model.engine.layout.WIDE_POPCOUNT`
chooses when the kernels compile).
All kernels release the GIL; the parallel ones split work with ``prange``. Each parallel kernel
has a serial twin (:data:`SERIAL`) for calls too small to pay for starting a parallel region.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from types import FunctionType
from typing import TypedDict

import numpy as np
from numba import njit, prange

from model.engine import runtime  # the threading layer before any kernel
from model.engine.intrinsics import (
    COLUMN_BLOCK_CHANNELS,
    COLUMN_BLOCK_ROWS,
    CONV_BLOCK_CHANNELS,
    CONV_BLOCK_POSITIONS,
    SIGNS_BY_BYTE,
    at_least_bits,
    column_block_counts,
    column_counts8,
    conv_block_sums,
    conv_sums8,
    conv_window_sums,
    fma32,
    popcount,
    signed_sum1,
    signed_sums8,
    trailing_zeros,
    xor_popcount4,
    xor_popcount8,
    xor_popcount8_bits,
)
from model.engine.layout import CACHE_LINE_WORDS, WIDE_POPCOUNT, WIDE_VECTORS, WORD

# Rows of a batch that stream past one block of 64 weight rows (dense_threshold_pack).
ROW_CHUNK = 64


class JitOptions(TypedDict, total=False):
    """:func:`numba.njit` options shared by several kernels; a TypedDict (not a plain dict) so
    that ``@njit(**options)`` type-checks against numba's own signature."""

    nogil: bool
    cache: bool
    fastmath: bool
    parallel: bool


_JIT: JitOptions = {"nogil": True, "cache": True, "fastmath": True}
_PAR: JitOptions = {**_JIT, "parallel": True}
# Float kernels keep IEEE semantics: no reassociation, no contraction of float64 → float32 casts.
_JIT_EXACT: JitOptions = {"nogil": True, "cache": True}
_PAR_EXACT: JitOptions = {**_JIT_EXACT, "parallel": True}


@njit(**_JIT, inline="always")
def _xor_popcount(a, w, m, o):
    """popcount(a[m] XOR w[o]) over the row's words (one zmm accumulator chain)."""
    s = np.int64(0)
    for k in range(a.shape[1]):
        s += np.int64(popcount(a[m, k] ^ w[o, k]))
    return s


@njit(**_JIT, inline="always")
def _xor_popcount4(a, w, m, o):
    """popcount(a[m] XOR w[o + i]) for i < 4: each word of a[m] is loaded once for four
    weight rows (register blocking), 256 bits at a time (:func:`xor_popcount4`)."""
    return xor_popcount4(a, w, m, o)


@njit(**_JIT, inline="always")
def _swept(i, first, last, reverse):
    """The i-th item of the range [first, last), counted from its end when ``reverse``."""
    return last - 1 - i if reverse else first + i


@njit(**_JIT, inline="always")
def next_sweep(sweep):
    """This call's direction (sweep[0] ≠ 0: backwards), flipped in place for the next call.

    Each thread gets one contiguous range of work items and walks it forwards on one call and
    backwards on the next, so a call starts on the weight rows the previous call touched last,
    still in that core's L2 (1 MiB per core here: one core's half of a 4096² layer, 1 MiB, does
    not quite fit, and an LRU cache re-read in the same order misses on nearly every line).
    Concurrent calls may race on the flag; only the order of the work changes, not its result.
    """
    reverse = sweep[0] != 0
    sweep[0] = np.uint8(0) if reverse else np.uint8(1)
    return reverse


@njit(**_JIT)
def gemm_parts(a, w, ranges):
    """How many contiguous ranges :func:`xor_popcount_gemm` splits its work into: ``ranges``, at
    most one per work item (a row × a block of 64 weight rows)."""
    return max(1, min(ranges, a.shape[0] * ((w.shape[0] + WORD - 1) // WORD)))


@njit(**_PAR)
def xor_popcount_gemm(a, w, out, ranges, sweep):
    """out[m, o] = popcount(a[m] XOR w[o]) for a (M, L), w (O, L) uint64; out (M, O) int32.
    The work is split into ``ranges`` contiguous ranges (one per thread), each walked in the
    direction the (1,) uint8 flag ``sweep`` gives (see :func:`next_sweep`)."""
    reverse = next_sweep(sweep)
    parts = gemm_parts(a, w, ranges)
    for t in prange(parts):
        gemm_part(a, w, out, parts, t, reverse)


@njit(**_JIT)
def gemm_part(a, w, out, parts, t, reverse):
    """Range t of ``parts`` of :func:`xor_popcount_gemm`'s work items, walked backwards when
    ``reverse``."""
    m_rows, o_rows = a.shape[0], w.shape[0]
    items = m_rows * ((o_rows + WORD - 1) // WORD)
    first, last = t * items // parts, (t + 1) * items // parts
    for i in range(last - first):
        item = _swept(i, first, last, reverse)
        b, m = item // m_rows, item % m_rows
        o, o1 = b * WORD, min(o_rows, (b + 1) * WORD)
        if WIDE_POPCOUNT and a.shape[1] % 8 == 0:
            while o + 8 <= o1:
                s = xor_popcount8(a, w, m, o)
                for i8 in range(8):
                    out[m, o + i8] = s[i8]
                o += 8
        while o + 4 <= o1:
            s0, s1, s2, s3 = _xor_popcount4(a, w, m, o)
            out[m, o] = s0
            out[m, o + 1] = s1
            out[m, o + 2] = s2
            out[m, o + 3] = s3
            o += 4
        while o < o1:
            out[m, o] = _xor_popcount(a, w, m, o)
            o += 1


@njit(**_JIT)
def patch_rows(x, kh, kw, sh, sw):
    """Where the patch rows of a kh×kw convolution with stride (sh, sw) over ``x`` lie, for the
    column kernels to read them in place (no im2col copy). x (N, Hp, Wp, Wc) uint64,
    C-contiguous, already padded (:func:`padded_bits`); patch row m = (n, oy, ox) is the words
    of positions (oy·sh + dy, ox·sw + dx) for dy < kh, dx < kw in (dy, dx, word) order — kh
    segments of kw·Wc consecutive words, one image row (Wp·Wc words) apart.

    Returns ``(patch, grid)``: patch = (segments, length, stride) = (kh, kw·Wc, Wp·Wc), as the
    intrinsics take it, and grid = (OH, OW, sh, sw) for :func:`patch_start`. Rows already laid
    out, a (M, L), are the patch rows of a 1×1 convolution over a.reshape(1, M, 1, L)."""
    _, hp, wp, wc = x.shape
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    patch = (np.int64(kh), np.int64(kw * wc), np.int64(wp * wc))
    return patch, (np.int64(oh), np.int64(ow), np.int64(sh), np.int64(sw))


@njit(**_JIT, inline="always")
def patch_start(x, grid, m):
    """Flat index in x of patch row m's first word (see :func:`patch_rows`)."""
    _, hp, wp, wc = x.shape
    oh, ow, sh, sw = grid
    n, r = m // (oh * ow), m % (oh * ow)
    return ((n * hp + (r // ow) * sh) * wp + (r % ow) * sw) * wc


@njit(**_JIT, inline="always")
def block_starts(x, grid, m):
    """:func:`patch_start` of rows m … m + COLUMN_BLOCK_ROWS − 1 (four), as a tuple: steps of
    sw positions when the four lie in one output row, as they mostly do (no divisions)."""
    ow, sw, wc = grid[1], grid[3], x.shape[3]
    first = patch_start(x, grid, m)
    if m % ow + 3 < ow:
        step = sw * wc
        return (first, first + step, first + 2 * step, first + 3 * step)
    return (
        first,
        patch_start(x, grid, m + 1),
        patch_start(x, grid, m + 2),
        patch_start(x, grid, m + 3),
    )


@njit(**_JIT)
def column_parts(m_rows, ranges):
    """How many ranges of rows :func:`xor_popcount_columns` splits its work into: ``ranges``,
    at most one per block of COLUMN_BLOCK_ROWS rows."""
    return max(1, min(ranges, -(-m_rows // COLUMN_BLOCK_ROWS)))


@njit(**_PAR)
def xor_popcount_columns(x, kh, kw, sh, sw, wt, out, ranges):
    """out[m, o] = popcount(patch row m XOR wt[:, o]) for the patch rows of a kh×kw / (sh, sw)
    convolution read in place from the padded bits x (N, Hp, Wp, Wc) (:func:`patch_rows`), wt
    (L, O) uint64 — the weight rows transposed, L = kh·kw·Wc, any L — and out (N·OH·OW, O)
    int32: :func:`xor_popcount_gemm` of im2col's rows, vectorized across output channels
    (:func:`~model.engine.intrinsics.column_block_counts`) and with no patches array.

    Work items are blocks of COLUMN_BLOCK_ROWS rows × COLUMN_BLOCK_CHANNELS channels. The rows
    are split into ``ranges`` contiguous ranges, one per thread, as every real-valued kernel
    splits them, so the next operation finds its rows in the cache of the core that wrote them;
    a thread walks its range channel block major (the block's weight columns stay in L1 while
    its rows stream past). :func:`~model.engine.real_kernels.binary_columns_real` is the same
    loop with the binary layer's real epilogue."""
    patch, grid = patch_rows(x, kh, kw, sh, sw)
    m_rows = out.shape[0]
    parts = column_parts(m_rows, ranges)
    for t in prange(parts):
        first, last = column_row_blocks(m_rows, parts, t)
        for b in range(-(-wt.shape[1] // COLUMN_BLOCK_CHANNELS)):
            for r in range(first, last):
                m0, m1, o0, o1 = column_block(m_rows, wt, r, b)
                if m1 - m0 == COLUMN_BLOCK_ROWS and o1 - o0 == COLUMN_BLOCK_CHANNELS:
                    starts = block_starts(x, grid, m0)
                    column_block_counts(x, starts, patch, wt, o0, out, m0, o0)
                else:
                    column_edge(x, patch, grid, wt, m0, m1, o0, o1, out, m0, o0)


@njit(**_JIT, inline="always")
def column_row_blocks(m_rows, parts, t):
    """The blocks of COLUMN_BLOCK_ROWS rows [first, last) of range t of ``parts`` of a column
    kernel."""
    blocks = -(-m_rows // COLUMN_BLOCK_ROWS)
    return t * blocks // parts, (t + 1) * blocks // parts


@njit(**_JIT, inline="always")
def column_block(m_rows, wt, r, b):
    """Rows [m0, m1) and channels [o0, o1) of a column kernel's work item (row block r,
    channel block b): a whole block, or a smaller one at the edges."""
    m0, m1 = r * COLUMN_BLOCK_ROWS, min(m_rows, (r + 1) * COLUMN_BLOCK_ROWS)
    o0, o1 = b * COLUMN_BLOCK_CHANNELS, min(wt.shape[1], (b + 1) * COLUMN_BLOCK_CHANNELS)
    return m0, m1, o0, o1


@njit(**_JIT)
def column_edge(x, patch, grid, wt, m0, m1, o0, o1, out, out_m, out_o):
    """out[out_m + m − m0, out_o + o − o0] = popcount(patch row m XOR wt[:, o]) for rows
    [m0, m1) and channels [o0, o1) of a block smaller than a whole one: 8 channels at a time
    (:func:`~model.engine.intrinsics.column_counts8`), then one."""
    flat = x.reshape(x.size)
    segments, length, stride = patch
    for m in range(m0, m1):
        start = patch_start(x, grid, m)
        o = o0
        while o + 8 <= o1:
            column_counts8(x, (start,), patch, wt, o, out, out_m + m - m0, out_o + o - o0)
            o += 8
        for oo in range(o, o1):
            s = np.int64(0)
            for segment in range(segments):
                for i in range(length):
                    word = flat[start + segment * stride + i]
                    s += np.int64(popcount(word ^ wt[segment * length + i, oo]))
            out[out_m + m - m0, out_o + oo - o0] = s


@njit(**_JIT)
def padded_bits(x, ph, pw, pad, out):
    """out (N, H + 2·ph, W + 2·pw, Wc) = x (N, H, W, Wc) uint64 with ``pad`` (Wc,) — the words
    of one padded position — around it: the source the column kernels read patches from."""
    n, h, w, wc = x.shape
    for i in range(n):
        for y in range(out.shape[1]):
            inside_y = ph <= y < ph + h
            for xx in range(out.shape[2]):
                if inside_y and pw <= xx < pw + w:
                    for k in range(wc):
                        out[i, y, xx, k] = x[i, y - ph, xx - pw, k]
                else:
                    for k in range(wc):
                        out[i, y, xx, k] = pad[k]


@njit(**_JIT, inline="always")
def _decide(p, cut, invert, o, o0):
    """The packed bit of channel o: (p ≥ cut[o]) XOR invert[o], at its place in the word."""
    return np.uint64((p >= cut[o]) ^ np.bool_(invert[o])) << np.uint64(o - o0)


@njit(**_JIT)
def dense_parts(a, out, row_chunk, ranges):
    """How many contiguous ranges :func:`dense_threshold_pack` splits its work into: ``ranges``,
    at most one per work item (64 output channels × a chunk of ``row_chunk`` rows)."""
    return max(1, min(ranges, -(-a.shape[0] // row_chunk) * out.shape[1]))


@njit(**_PAR)
def dense_threshold_pack(a, w, cut, invert, out, row_chunk, ranges, sweep):
    """Binary layer with folded thresholds, output packed.

    a (M, L) uint64, w (O, L) uint64, cut (O,) int64 on P = popcount(a XOR w), invert (O,)
    uint8; out (M, ⌈O/64⌉) uint64 gets bit o of row m = (P ≥ cut[o]) XOR invert[o].
    Work items are (64 output channels) × (chunk of ``row_chunk`` rows): the 64 weight rows
    stay in cache while the chunk's rows stream past them. The items are split into ``ranges``
    contiguous ranges (one per thread), each walked in the direction the (1,) uint8 flag
    ``sweep`` gives (see :func:`next_sweep`).
    """
    reverse = next_sweep(sweep)
    parts = dense_parts(a, out, row_chunk, ranges)
    for t in prange(parts):
        dense_part(a, w, cut, invert, out, row_chunk, parts, t, reverse)


@njit(**_JIT)
def dense_part(a, w, cut, invert, out, row_chunk, parts, t, reverse):
    """Range t of ``parts`` of :func:`dense_threshold_pack`'s work items, walked backwards when
    ``reverse``."""
    m_rows, o_rows = a.shape[0], w.shape[0]
    words = out.shape[1]
    chunks = (m_rows + row_chunk - 1) // row_chunk
    items = chunks * words
    first, last = t * items // parts, (t + 1) * items // parts
    for i in range(last - first):
        item = _swept(i, first, last, reverse)
        j, c = item // chunks, item % chunks
        o0, o1 = j * WORD, min(o_rows, (j + 1) * WORD)
        for m in range(c * row_chunk, min(m_rows, (c + 1) * row_chunk)):
            word = np.uint64(0)
            o = o0
            if WIDE_POPCOUNT and a.shape[1] % 8 == 0:
                while o + 8 <= o1:
                    bits = xor_popcount8_bits(a, w, m, o, cut, invert)
                    word |= bits << np.uint64(o - o0)
                    o += 8
            while o + 4 <= o1:
                s0, s1, s2, s3 = _xor_popcount4(a, w, m, o)
                word |= _decide(s0, cut, invert, o, o0) | _decide(s1, cut, invert, o + 1, o0)
                word |= _decide(s2, cut, invert, o + 2, o0) | _decide(s3, cut, invert, o + 3, o0)
                o += 4
            while o < o1:
                word |= _decide(_xor_popcount(a, w, m, o), cut, invert, o, o0)
                o += 1
            out[m, j] = word


@njit(**_JIT)
def plane_count(x, max_value):
    """Bit-planes needed to hold x (M, F) float32 as integers: the bit length of its largest value
    (at least 1), or −1 unless every value is an integer in [0, max_value] (NaN included)."""
    high = 0.0
    for m in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[m, j]
            if not (v >= 0.0 and v <= max_value and v == np.floor(v)):
                return -1
            high = max(high, v)
    count, h = 1, np.int64(high) >> 1
    while h > 0:
        count += 1
        h >>= 1
    return count


@njit(**_JIT)
def pack_bit_planes(x, planes):
    """planes (B, M, W) uint64, zero on entry: bit j mod 64 of planes[b, m, j // 64] = bit b of
    the integer x[m, j] — x = Σ_b 2^b x_b, each plane packed like activations."""
    for m in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = np.uint64(x[m, j])
            word, bit = j >> 6, np.uint64(j & 63)
            for b in range(planes.shape[0]):
                planes[b, m, word] |= ((v >> np.uint64(b)) & np.uint64(1)) << bit


@njit(**_JIT)
def aligned_words(shape):
    """An uninitialized uint64 array of ``shape`` (a tuple) whose data starts on a cache line, like
    :func:`model.engine.layout.aligned_empty` at a fraction of its cost per call: numba allocates on
    32 bytes, so one cache line more is allocated and the start moved up to the next line."""
    size = 1
    for n in shape:
        size *= n
    buffer = np.empty(size + CACHE_LINE_WORDS, np.uint64)
    start = (-np.int64(buffer.ctypes.data) % (8 * CACHE_LINE_WORDS)) // 8
    return buffer[start : start + size].reshape(shape)


@njit(**_JIT)
def integer_bit_planes(x, max_value, words):
    """x (M, F) float32 → (B, M, words) uint64 bit-planes, zero after ⌈F/64⌉ words, cache-line
    aligned; B = :func:`plane_count`. A (0, M, words) array when plane_count is −1 (x not all
    integers in [0, max_value])."""
    n_planes = plane_count(x, max_value)
    planes = aligned_words((max(n_planes, 0), x.shape[0], words))
    planes.fill(0)
    if n_planes > 0:
        pack_bit_planes(x, planes)
    return planes


@njit(**_JIT, inline="always")
def _planes_acc4(planes, w, pcw, m, o):
    """x·w for four weight rows, x = Σ_b 2^b x_b given as bit-planes: Σ_b 2^b (P_b − pcw)."""
    n_planes = planes.shape[0]
    a0 = np.int64(0)
    a1 = np.int64(0)
    a2 = np.int64(0)
    a3 = np.int64(0)
    for b in range(n_planes):
        s0, s1, s2, s3 = _xor_popcount4(planes[b], w, m, o)
        a0 += (s0 - pcw[o]) << np.int64(b)
        a1 += (s1 - pcw[o + 1]) << np.int64(b)
        a2 += (s2 - pcw[o + 2]) << np.int64(b)
        a3 += (s3 - pcw[o + 3]) << np.int64(b)
    return a0, a1, a2, a3


@njit(**_JIT, inline="always")
def _planes_acc8(planes, w, pcw, m, o):
    """Like :func:`_planes_acc4` for eight weight rows (rows a multiple of 8 words)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.int64(0)
    for b in range(planes.shape[0]):
        s = xor_popcount8(planes[b], w, m, o)
        a0 += (s[0] - pcw[o]) << np.int64(b)
        a1 += (s[1] - pcw[o + 1]) << np.int64(b)
        a2 += (s[2] - pcw[o + 2]) << np.int64(b)
        a3 += (s[3] - pcw[o + 3]) << np.int64(b)
        a4 += (s[4] - pcw[o + 4]) << np.int64(b)
        a5 += (s[5] - pcw[o + 5]) << np.int64(b)
        a6 += (s[6] - pcw[o + 6]) << np.int64(b)
        a7 += (s[7] - pcw[o + 7]) << np.int64(b)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(**_JIT, inline="always")
def _planes_acc(planes, w, pcw, m, o):
    acc = np.int64(0)
    for b in range(planes.shape[0]):
        acc += (_xor_popcount(planes[b], w, m, o) - pcw[o]) << np.int64(b)
    return acc


@njit(**_PAR)
def planes_dense_acc(planes, w, pcw, out):
    """Integer input × ±1 weights, exactly: planes (B, M, L) uint64 bit-planes of the input
    (bit b of every value), w (O, L), pcw (O,) int64 = popcount(w); out (M, O) int64 = x·w."""
    m_rows, o_rows = planes.shape[1], w.shape[0]
    blocks = (o_rows + WORD - 1) // WORD
    for t in prange(m_rows * blocks):
        b, m = t // m_rows, t % m_rows
        o, o1 = b * WORD, min(o_rows, (b + 1) * WORD)
        if WIDE_POPCOUNT and planes.shape[2] % 8 == 0:
            while o + 8 <= o1:
                acc = _planes_acc8(planes, w, pcw, m, o)
                for i in range(8):
                    out[m, o + i] = acc[i]
                o += 8
        while o + 4 <= o1:
            s0, s1, s2, s3 = _planes_acc4(planes, w, pcw, m, o)
            out[m, o] = s0
            out[m, o + 1] = s1
            out[m, o + 2] = s2
            out[m, o + 3] = s3
            o += 4
        while o < o1:
            out[m, o] = _planes_acc(planes, w, pcw, m, o)
            o += 1


@njit(**_PAR)
def planes_dense_threshold_pack(planes, w, pcw, cut, invert, out):
    """:func:`planes_dense_acc` then bit o = (float(acc) ≥ cut[o]) XOR invert[o], packed;
    cut (O,) float64 (a float32 threshold: exact for integer accumulators). One work item per
    (64 output channels, row)."""
    items = out.shape[1] * planes.shape[1]
    for t in prange(items):
        planes_part(planes, w, pcw, cut, invert, out, items, t)


@njit(**_JIT)
def planes_part(planes, w, pcw, cut, invert, out, parts, t):
    """Range t of ``parts`` of :func:`planes_dense_threshold_pack`'s work items."""
    m_rows, o_rows = planes.shape[1], w.shape[0]
    items = out.shape[1] * m_rows
    for item in range(t * items // parts, (t + 1) * items // parts):
        j, m = item // m_rows, item % m_rows
        o0, o1 = j * WORD, min(o_rows, (j + 1) * WORD)
        word = np.uint64(0)
        o = o0
        if WIDE_POPCOUNT and planes.shape[2] % 8 == 0:
            while o + 8 <= o1:
                acc = _planes_acc8(planes, w, pcw, m, o)
                for i in range(8):
                    word |= _decide(np.float64(acc[i]), cut, invert, o + i, o0)
                o += 8
        while o + 4 <= o1:
            s0, s1, s2, s3 = _planes_acc4(planes, w, pcw, m, o)
            word |= _decide(np.float64(s0), cut, invert, o, o0)
            word |= _decide(np.float64(s1), cut, invert, o + 1, o0)
            word |= _decide(np.float64(s2), cut, invert, o + 2, o0)
            word |= _decide(np.float64(s3), cut, invert, o + 3, o0)
            o += 4
        while o < o1:
            word |= _decide(np.float64(_planes_acc(planes, w, pcw, m, o)), cut, invert, o, o0)
            o += 1
        out[m, j] = word


@njit(**_PAR)
def planes_word_threshold_pack(planes, w, pcw, cut, invert, out):
    """:func:`planes_dense_threshold_pack` for inputs of at most 64 features (weight rows of
    one word), vectorized across outputs instead of along the row: for each plane word p_b,
    acc[o] += (popcount(p_b XOR w[o]) − pcw[o]) << b runs over the contiguous column of weight
    words (VPOPCNTQ on eight outputs at a time), and so do the decisions before they are
    packed. planes (B, M, 1), w (O, 1) C-contiguous. Several times faster than along the rows
    on the digits mlp's first layer (64 → 1024): docs/benchmarks.md, "Engine design figures"."""
    n_planes, m_rows = planes.shape[0], planes.shape[1]
    o_rows, words = w.shape[0], out.shape[1]
    column = w.reshape(o_rows)  # contiguous: the loops below vectorize
    for m in prange(m_rows):
        acc = np.zeros(o_rows, np.int64)
        for b in range(n_planes):
            p = planes[b, m, 0]
            for o in range(o_rows):
                acc[o] += (np.int64(popcount(p ^ column[o])) - pcw[o]) << np.int64(b)
        fires = np.empty(o_rows, np.uint8)
        for o in range(o_rows):
            fires[o] = (np.float64(acc[o]) >= cut[o]) ^ (invert[o] != 0)
        for j in range(words):
            word = np.uint64(0)
            for i in range(min(WORD, o_rows - j * WORD)):
                word |= np.uint64(fires[j * WORD + i]) << np.uint64(i)
            out[m, j] = word


@njit(**_PAR_EXACT)  # fast-math would let the backend reorder the sums on some CPUs
def real_packed_dense(x, w, out):
    """Real input × packed ±1 weights in float32, without unpacking: out[m, o] = Σ_i x[m, i]·s_oi
    (s = −1 where bit i of w[o] is set), summed as :func:`signed_sums8` does, so each value is
    the same whatever the batch, the thread count or the CPU. x (M, 64·⌈F/64⌉) float32 with
    zeros past the F features, w (O, L ≥ ⌈F/64⌉) uint64, out (M, O) float32. One work item per (row, 64 output
    channels)."""
    m_rows, o_rows = x.shape[0], w.shape[0]
    blocks = (o_rows + WORD - 1) // WORD
    for t in prange(m_rows * blocks):
        b, m = t // m_rows, t % m_rows
        o, o1 = b * WORD, min(o_rows, (b + 1) * WORD)
        while o + 8 <= o1:
            s = signed_sums8(x, w, SIGNS_BY_BYTE, m, o)
            for i in range(8):
                out[m, o + i] = s[i]
            o += 8
        while o < o1:
            out[m, o] = signed_sum1(x, w, SIGNS_BY_BYTE, m, o)
            o += 1


@njit(nogil=True, cache=True)
def affine_rows(raw, scale, bias, out):
    """out[m, o] = fl(fl(raw[m, o]·scale[o]) + bias[o]) in float32, each operation rounded as
    eager torch rounds it (no fastmath: no fused multiply-add); a step whose array is None is
    skipped (numba compiles the branch away). raw (M, O) float32, scale and bias (O,) float32
    or None. Cheaper than the numpy expression's error-state handling alone (docs/benchmarks.md, "Engine design figures")."""
    for m in range(raw.shape[0]):
        for o in range(raw.shape[1]):
            y = raw[m, o]
            if scale is not None:
                y = np.float32(y * scale[o])
            if bias is not None:
                y = np.float32(y + bias[o])
            out[m, o] = y


@njit(**_JIT_EXACT, inline="always")
def float32_at_least(c):
    """The smallest float32 ≥ the float64 c (NaN stays NaN): for float32 y,
    y ≥ c ⇔ y ≥ float32_at_least(c), so a float32 comparison decides exactly."""
    f = np.float32(c)
    if np.float64(f) < c:
        f = np.nextafter(f, np.float32(np.inf))
    return f


@njit(**_PAR_EXACT)
def threshold_pack_rows(y, cut, invert, out):
    """Real values to packed bits: y (M, O) float32, cut (O,) float64, invert (O,) uint8;
    out (M, ⌈O/64⌉) uint64, bit o = (y[m, o] ≥ cut[o]) XOR invert[o] (≥ is False where either is
    NaN). The cuts are rounded up to float32 once (:func:`float32_at_least`), the inverts
    packed into words, so each whole word of 64 channels is one vector comparison
    (:func:`~model.engine.intrinsics.at_least_bits`) XOR its invert word; the last word's
    channels past a multiple of 64 one at a time. No fast-math: NaN compares False."""
    m_rows, o_rows = y.shape
    words, whole = out.shape[1], o_rows // WORD
    cut32 = np.empty(o_rows, np.float32)
    flips = np.zeros(words, np.uint64)
    for o in range(o_rows):
        cut32[o] = float32_at_least(cut[o])
        flips[o // WORD] |= np.uint64(invert[o] != 0) << np.uint64(o % WORD)
    for m in prange(m_rows):
        for j in range(whole):
            out[m, j] = at_least_bits(y, cut32, m, j * WORD) ^ flips[j]
        if whole < words:
            word = np.uint64(0)
            for o in range(whole * WORD, o_rows):
                word |= np.uint64(y[m, o] >= cut32[o]) << np.uint64(o - whole * WORD)
            out[m, whole] = word ^ flips[whole]


@njit(**_PAR_EXACT)
def signed_dense(bits, w_t, base, coef, out):
    """Full-precision weights on packed binary input: out[m, o] = base[o] + coef ·
    Σ_{bit i of bits[m] set} w_t[i, o], in float64. bits (M, L) uint64, w_t (64·L, O)."""
    m_rows, words = bits.shape
    o_rows = w_t.shape[1]
    for m in prange(m_rows):
        for o in range(o_rows):
            out[m, o] = 0.0
        for k in range(words):
            word = bits[m, k]
            while word != 0:
                i = k * WORD + trailing_zeros(word)
                for o in range(o_rows):
                    out[m, o] += np.float64(w_t[i, o])
                word &= word - np.uint64(1)
        for o in range(o_rows):
            out[m, o] = base[o] + coef * out[m, o]


# Where a float convolution's bias enters its sum, as in the oneDNN convolution eager torch
# runs on this CPU: its AVX2 kernels start each sum at the bias, its AVX-512 kernels add the
# bias to the finished sum. Measured against F.conv2d bit for bit (7×7/2 stem over 3 channels,
# 1×1 over 64 at batch 1): on an AVX-512 Xeon bias-last matches 100% of outputs, bias-first
# 42–49%; on the AVX2 EPYC the engine's bias-first sums gave no ties. test_real_kernels checks
# the 7×7 case against this machine's torch.
BIAS_AFTER_SUM = WIDE_VECTORS


@njit(**_JIT_EXACT, inline="always")
def _conv_sum(x, w, start, i, y0, x0, kh, kw, o):
    """One channel of :func:`conv_sums8`, the same operations in the same order."""
    c = x.shape[3]
    a = start[o]
    for dy in range(kh):
        for dx in range(kw):
            row = (dy * kw + dx) * c
            for ch in range(c):
                a = fma32(x[i, y0 + dy, x0 + dx, ch], w[row + ch, o], a)
    return a


@njit(**_JIT_EXACT, inline="always")
def _store_sums(sums, at, count, bias, alpha, beta, out, row, o):
    """out[row, o + k] = sums[at + k] for k < count, plus bias[o + k] where the bias comes after
    the sum (:data:`BIAS_AFTER_SUM`), then through fma(·, alpha, beta) unless alpha is None (a
    BatchNorm after the conv, rounded as eager torch rounds it)."""
    for k in range(count):
        y = sums[at + k]
        if BIAS_AFTER_SUM:
            y = np.float32(y + bias[o + k])
        if alpha is not None:
            y = fma32(y, alpha[o + k], beta[o + k])
        out[row, o + k] = y


@njit(**_JIT_EXACT, inline="always")
def _narrow_channels(x, w, start, bias, i, y0, x0, kh, kw, o, sums, alpha, beta, out, row):
    """Channels o … O − 1 of one window (fewer than a block): 8, then 1 at a time."""
    o_rows = w.shape[1]
    while o + 8 <= o_rows:
        conv_sums8(x, w, start, i, y0, x0, kh, kw, o, sums)
        _store_sums(sums, 0, 8, bias, alpha, beta, out, row, o)
        o += 8
    while o < o_rows:
        sums[0] = _conv_sum(x, w, start, i, y0, x0, kh, kw, o)
        _store_sums(sums, 0, 1, bias, alpha, beta, out, row, o)
        o += 1


@njit(**_JIT_EXACT)
def conv_output_row(x, w, bias, i, oy, sh, sw, kh, kw, alpha, beta, out, row0):
    """Output row ``oy`` of image ``i`` of a full-precision convolution, in float32:
    out[row0 + ox, o] = fma(raw, alpha[o], beta[o]) (just raw when alpha is None) for every
    ox < OW, o < O, with raw = bias[o] + Σ x·w[·, o]: one fused multiply-add per term in
    (dy, dx, c) order, starting from bias[o], or from 0 with bias[o] added to the finished sum
    where :data:`BIAS_AFTER_SUM`. x (N, Hp, Wp, C) float32, already padded; w (kh·kw·C, O)
    float32, rows in (dy, dx, c) order.

    Blocks of CONV_BLOCK_POSITIONS windows × CONV_BLOCK_CHANNELS channels
    (:func:`~model.engine.intrinsics.conv_block_sums`: 3 × 32 on AVX2, 4 × 64 on AVX-512), then
    single windows; channels past the last block 8, then 1 at a time. Every block sums each
    channel in the same order, so raw is the same whichever block computes it, on every CPU."""
    ow = (x.shape[2] - kw) // sw + 1
    y0 = oy * sh
    wide = w.shape[1] - w.shape[1] % CONV_BLOCK_CHANNELS
    sums = np.empty(CONV_BLOCK_POSITIONS * CONV_BLOCK_CHANNELS, np.float32)
    start = np.zeros_like(bias) if BIAS_AFTER_SUM else bias
    ox = 0
    while ox + CONV_BLOCK_POSITIONS <= ow:
        for o in range(0, wide, CONV_BLOCK_CHANNELS):
            conv_block_sums(x, w, start, i, y0, ox * sw, sw, kh, kw, o, sums)
            for p in range(CONV_BLOCK_POSITIONS):
                at = p * CONV_BLOCK_CHANNELS
                _store_sums(sums, at, CONV_BLOCK_CHANNELS, bias, alpha, beta, out, row0 + ox + p, o)
        for p in range(CONV_BLOCK_POSITIONS):
            x0 = (ox + p) * sw
            _narrow_channels(
                x, w, start, bias, i, y0, x0, kh, kw, wide, sums, alpha, beta, out, row0 + ox + p
            )
        ox += CONV_BLOCK_POSITIONS
    while ox < ow:
        for o in range(0, wide, CONV_BLOCK_CHANNELS):
            conv_window_sums(x, w, start, i, y0, ox * sw, kh, kw, o, sums)
            _store_sums(sums, 0, CONV_BLOCK_CHANNELS, bias, alpha, beta, out, row0 + ox, o)
        _narrow_channels(
            x, w, start, bias, i, y0, ox * sw, kh, kw, wide, sums, alpha, beta, out, row0 + ox
        )
        ox += 1


@njit(**_PAR_EXACT)
def real_conv_threshold_pack(x, w, bias, kh, kw, sh, sw, cut, invert, out):
    """Full-precision conv with folded thresholds, output packed (the stem conv), in float32.

    x (N, Hp, Wp, C) float32, already padded; w (kh·kw·C, O) float32, rows in (dy, dx, c)
    order; bias (O,) float32, the sum's first term or added to it (:data:`BIAS_AFTER_SUM`,
    as F.conv2d does on this CPU); out (N, OH, OW, ⌈O/64⌉) gets bit o = (raw ≥ cut[o]) XOR
    invert[o] with raw = bias + Σ x·w in float32, one fused multiply-add per term in
    (dy, dx, c) order (:func:`conv_output_row`, one output row at a time). No reduction is
    vectorized and no fast-math flag is set, so raw is the same on every CPU of one bias
    order.
    """
    n = x.shape[0]
    oh, ow, words = out.shape[1], out.shape[2], out.shape[3]
    o_rows = w.shape[1]
    for r in prange(n * oh):
        i, oy = r // oh, r % oh
        raw = np.empty((ow, o_rows), np.float32)
        conv_output_row(x, w, bias, i, oy, sh, sw, kh, kw, None, None, raw, 0)
        for ox in range(ow):
            for j in range(words):
                word = np.uint64(0)
                for o in range(j * WORD, min(o_rows, (j + 1) * WORD)):
                    word |= _decide(np.float64(raw[ox, o]), cut, invert, o, j * WORD)
                out[i, oy, ox, j] = word


@njit(**_PAR)
def im2col_bits(x, kh, kw, sh, sw, ph, pw, pad, out):
    """Patches of channel-packed NHWC bits: x (N, H, W, Wc) uint64, pad (Wc,) the words of one
    padded position; out (N·OH·OW, ≥ kh·kw·Wc) with row (n, y, x) = the words of positions
    (y·sh + dy − ph, x·sw + dx − pw) for dy < kh, dx < kw, in (dy, dx, word) order, then zero
    words up to the row's width (the weights carry the same zero padding)."""
    n, h, w, wc = x.shape
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    for r in prange(n * oh):
        i, oy = r // oh, r % oh
        for ox in range(ow):
            row = (i * oh + oy) * ow + ox
            col = 0
            for dy in range(kh):
                yy = oy * sh + dy - ph
                for dx in range(kw):
                    xx = ox * sw + dx - pw
                    if 0 <= yy < h and 0 <= xx < w:
                        for k in range(wc):
                            out[row, col + k] = x[i, yy, xx, k]
                    else:
                        for k in range(wc):
                            out[row, col + k] = pad[k]
                    col += wc
            for k in range(col, out.shape[1]):  # word padding up to a multiple of 8 (zeros)
                out[row, k] = np.uint64(0)


@njit(**_PAR)
def pool_bits(x, kh, kw, sh, sw, and_mask, out):
    """Max-pool of packed decisions: x (N, H, W, Wc), out (N, OH, OW, Wc); per bit, the AND of
    the window where ``and_mask`` is set, else the OR (see :func:`folding.pool_and_mask`)."""
    n, _, _, wc = x.shape
    oh, ow = out.shape[1], out.shape[2]
    for r in prange(n * oh):
        i, oy = r // oh, r % oh
        for ox in range(ow):
            for k in range(wc):
                all_set = ~np.uint64(0)
                any_set = np.uint64(0)
                for dy in range(kh):
                    for dx in range(kw):
                        v = x[i, oy * sh + dy, ox * sw + dx, k]
                        all_set &= v
                        any_set |= v
                out[i, oy, ox, k] = (all_set & and_mask[k]) | (any_set & ~and_mask[k])


# --- serial twins ---------------------------------------------------------------------------------
def serial_twin(kernel):
    """``kernel`` compiled without ``parallel``: its ``prange`` loops run as plain loops on the
    calling thread, skipping the parallel region's start and numba's per-call thread-count
    switch (cost: docs/benchmarks.md, "Engine design figures"). The Python function is copied
    under a new name because numba's on-disk cache keys a function by name and types, not by
    compile flags."""
    fn = kernel.py_func
    twin = FunctionType(fn.__code__, fn.__globals__, f"{fn.__name__}_serial", fn.__defaults__)
    twin.__qualname__ = f"{fn.__qualname__}_serial"
    twin.__doc__ = fn.__doc__
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("parallel", "nopython")}
    return njit(cache=True, **options)(twin)


# A compiled kernel: writes its result into its last array argument(s), returns nothing.
Kernel = Callable[..., None]


@dataclass(frozen=True)
class KernelSet:
    """The parallel kernels the CPU executor calls, or their serial twins (same arguments)."""

    xor_popcount_gemm: Kernel
    xor_popcount_columns: Kernel
    dense_threshold_pack: Kernel
    planes_dense_acc: Kernel
    planes_dense_threshold_pack: Kernel
    planes_word_threshold_pack: Kernel
    threshold_pack_rows: Kernel
    signed_dense: Kernel
    real_packed_dense: Kernel
    real_conv_threshold_pack: Kernel
    im2col_bits: Kernel
    pool_bits: Kernel

    def serial(self) -> KernelSet:
        return KernelSet(*(serial_twin(getattr(self, f.name)) for f in fields(self)))


PARALLEL = KernelSet(
    xor_popcount_gemm,
    xor_popcount_columns,
    dense_threshold_pack,
    planes_dense_acc,
    planes_dense_threshold_pack,
    planes_word_threshold_pack,
    threshold_pack_rows,
    signed_dense,
    real_packed_dense,
    real_conv_threshold_pack,
    im2col_bits,
    pool_bits,
)
SERIAL = PARALLEL.serial()


# numba stamps a cached kernel with this file only; add the digest of all the engine sources
runtime.stamp_kernel_caches()
