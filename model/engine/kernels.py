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

``popcount`` is LLVM's ``ctpop``; on AVX-512 VPOPCNTDQ machines the word loops vectorize to
``vpopcntq`` on zmm registers (``tests/model/engine/test_kernels.py`` checks the assembly).
All kernels release the GIL; the parallel ones split work with ``prange``. Each parallel kernel
has a serial twin (:data:`SERIAL`) for calls too small to pay for starting a parallel region.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import FunctionType

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from model.engine import runtime  # noqa: F401  (cache directory and threading layer first)

WORD = 64
CACHE_LINE_WORDS = 8  # 64 bytes (see model.engine.layout.CACHE_LINE)
# Rows of a batch that stream past one block of 64 weight rows (dense_threshold_pack).
ROW_CHUNK = 64
_JIT = {"nogil": True, "cache": True, "fastmath": True}
_PAR = {**_JIT, "parallel": True}
# Float kernels keep IEEE semantics: no reassociation, no contraction of float64 → float32 casts.
_JIT_EXACT = {"nogil": True, "cache": True}
_PAR_EXACT = {**_JIT_EXACT, "parallel": True}


@intrinsic
def popcount(typingctx, x):
    """Number of set bits of an integer (LLVM ``ctpop``)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])

    return x(x), codegen


@intrinsic
def trailing_zeros(typingctx, x):
    """Index of the lowest set bit (LLVM ``cttz``; x must not be 0)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return x(x), codegen


_I32, _I64 = ir.IntType(32), ir.IntType(64)
_V8 = ir.VectorType(_I64, 8)


def _shuffle_add(builder, x, y, lanes_a, lanes_b):
    """x ⧺ y picked at ``lanes_a`` plus x ⧺ y picked at ``lanes_b`` (lane-wise)."""
    pick = [
        builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, 8), lanes))
        for lanes in (lanes_a, lanes_b)
    ]
    return builder.add(*pick)


def _transpose_sum8(builder, v):
    """Eight <8 x i64> vectors → one whose lane j is the sum of v[j]'s lanes (3 shuffle-add
    levels instead of eight horizontal reductions)."""
    pairs = [
        _shuffle_add(
            builder,
            v[2 * i],
            v[2 * i + 1],
            [0, 8, 2, 10, 4, 12, 6, 14],
            [1, 9, 3, 11, 5, 13, 7, 15],
        )
        for i in range(4)
    ]
    quads = [
        _shuffle_add(
            builder,
            pairs[2 * i],
            pairs[2 * i + 1],
            [0, 1, 8, 9, 4, 5, 12, 13],
            [2, 3, 10, 11, 6, 7, 14, 15],
        )
        for i in range(2)
    ]
    return _shuffle_add(
        builder, quads[0], quads[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    )


def _is_words_2d(t) -> bool:
    return (
        isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" and t.dtype == types.uint64
    )


def _counts8(context, builder, a_type, w_type, a, w, row, col):
    """<8 x i64>: popcount(a[row] XOR w[col + j]) in lane j (see :func:`xor_popcount8`)."""
    a_arr = context.make_array(a_type)(context, builder, a)
    w_arr = context.make_array(w_type)(context, builder, w)
    length = builder.extract_value(a_arr.shape, 1)
    ctpop = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V8, [_V8]), "llvm.ctpop.v8i64"
    )
    a_row = builder.gep(a_arr.data, [builder.mul(row, length)])
    w_rows = [
        builder.gep(w_arr.data, [builder.mul(builder.add(col, ir.Constant(_I64, j)), length)])
        for j in range(8)
    ]
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8, [0] * 8)) for _ in range(8)]
    eight = ir.Constant(_I64, 8)
    with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), length, eight) as (k, _):
        av = builder.load(builder.bitcast(builder.gep(a_row, [k]), _V8.as_pointer()), align=8)
        for j in range(8):
            ptr = builder.bitcast(builder.gep(w_rows[j], [k]), _V8.as_pointer())
            counts = builder.call(ctpop, [builder.xor(av, builder.load(ptr, align=8))])
            builder.store(builder.add(builder.load(accs[j]), counts), accs[j])
    return _transpose_sum8(builder, [builder.load(acc) for acc in accs])


@intrinsic
def xor_popcount8(typingctx, a, w, m, o):
    """popcount(a[m] XOR w[o + j]) for j < 8, as a tuple of 8 int64.

    Hand-written vector IR: per 8-word step one <8 x i64> load of a[m], then for each weight row
    a load, XOR, ``llvm.ctpop.v8i64`` (VPOPCNTQ zmm) and add into its own accumulator; the eight
    accumulators are summed across lanes together by :func:`_transpose_sum8`. a and w must be
    C-contiguous 2-D uint64 arrays of the same row length, a multiple of 8 words.
    """
    if not (_is_words_2d(a) and _is_words_2d(w)):
        return None
    if not (isinstance(m, types.Integer) and isinstance(o, types.Integer)):
        return None
    sig = types.UniTuple(types.int64, 8)(a, w, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        total = _counts8(context, builder, sig.args[0], sig.args[1], *args)
        items = [builder.extract_element(total, ir.Constant(_I32, j)) for j in range(8)]
        return context.make_tuple(builder, sig.return_type, items)

    return sig, codegen


@intrinsic
def xor_popcount8_bits(typingctx, a, w, m, o, cut, invert):
    """The 8 packed decisions ``(popcount(a[m] XOR w[o + j]) ≥ cut[o + j]) XOR invert[o + j]``
    as bits 0..7 of a uint64: one vector compare, XOR and mask move instead of eight scalar
    ones. cut: C-contiguous int64 (O,), invert: C-contiguous uint8 (O,)."""
    vectors_ok = (
        isinstance(cut, types.Array) and cut.dtype == types.int64 and cut.layout == "C"
        and isinstance(invert, types.Array) and invert.dtype == types.uint8
        and invert.layout == "C"
    )  # fmt: skip
    if not (_is_words_2d(a) and _is_words_2d(w) and vectors_ok):
        return None
    sig = types.uint64(a, w, types.int64, types.int64, cut, invert)

    def codegen(context, builder, sig, args):
        a_val, w_val, row, col, cut_val, invert_val = args
        total = _counts8(context, builder, sig.args[0], sig.args[1], a_val, w_val, row, col)
        cut_ptr = context.make_array(sig.args[4])(context, builder, cut_val).data
        inv_ptr = context.make_array(sig.args[5])(context, builder, invert_val).data
        i8x8 = ir.VectorType(ir.IntType(8), 8)
        cuts = builder.load(builder.bitcast(builder.gep(cut_ptr, [col]), _V8.as_pointer()), align=8)
        inverts = builder.load(
            builder.bitcast(builder.gep(inv_ptr, [col]), i8x8.as_pointer()), align=1
        )
        fires = builder.icmp_signed(">=", total, cuts)
        flip = builder.icmp_unsigned("!=", inverts, ir.Constant(i8x8, [0] * 8))
        bits = builder.bitcast(builder.xor(fires, flip), ir.IntType(8))
        return builder.zext(bits, _I64)

    return sig, codegen


# Row b: the 8 values ±1.0 of the bits of byte b (bit set ⇔ −1), for :func:`signed_sums8`.
SIGNS_BY_BYTE = np.where(
    (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1, np.float32(-1.0), np.float32(1.0)
).astype(np.float32)
_F8 = ir.VectorType(ir.FloatType(), 8)


def _is_array_2d(t, dtype) -> bool:
    return isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" and t.dtype == dtype


def _lane_sum(builder, v):
    """The 8 lanes of a <8 x float> summed in a fixed tree: ((0+4)+(2+6)) + ((1+5)+(3+7))."""
    for half in (4, 2, 1):
        low = builder.shuffle_vector(
            v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half)))
        )
        high = builder.shuffle_vector(
            v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, 2 * half)))
        )
        v = builder.fadd(low, high)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _signed_sums(context, builder, sig, args, rows):
    """[Σ_i x[m, i]·s_i(w[o + j]) for j < rows] as float32 values, s_i = −1 where bit i is set.

    Per word k of the weight rows and byte b of the word: one <8 x float> load of
    x[m, 64k + 8b : 64k + 8b + 8], and per weight row the ±1 pattern of its byte from
    SIGNS_BY_BYTE, a multiply (exact: x·±1) and an add into that row's own 8-lane accumulator.
    Each lane adds its inputs in index order and the lanes are summed in a fixed tree, with no
    fast-math flag, so the result is the same on every CPU and vector width."""
    x_type, w_type, s_type = sig.args[:3]
    x_val, w_val, s_val, row, col = args
    x_arr = context.make_array(x_type)(context, builder, x_val)
    w_arr = context.make_array(w_type)(context, builder, w_val)
    s_arr = context.make_array(s_type)(context, builder, s_val)
    stride = builder.extract_value(w_arr.shape, 1)
    features = builder.extract_value(x_arr.shape, 1)
    words = builder.udiv(features, ir.Constant(_I64, WORD))  # the weights' padding words skipped
    x_row = builder.gep(x_arr.data, [builder.mul(row, features)])
    w_rows = [
        builder.gep(w_arr.data, [builder.mul(builder.add(col, ir.Constant(_I64, j)), stride)])
        for j in range(rows)
    ]
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_F8, [0.0] * 8)) for _ in range(rows)]
    byte_mask = ir.Constant(_I64, 255)
    with cgutils.for_range(builder, words) as loop:
        k = loop.index
        w_words = [builder.load(builder.gep(w_row, [k])) for w_row in w_rows]
        for b in range(8):
            at = builder.add(builder.mul(k, ir.Constant(_I64, WORD)), ir.Constant(_I64, 8 * b))
            xv = builder.load(builder.bitcast(builder.gep(x_row, [at]), _F8.as_pointer()), align=4)
            for j in range(rows):
                byte = builder.and_(builder.lshr(w_words[j], ir.Constant(_I64, 8 * b)), byte_mask)
                s_ptr = builder.gep(s_arr.data, [builder.mul(byte, ir.Constant(_I64, 8))])
                sv = builder.load(builder.bitcast(s_ptr, _F8.as_pointer()), align=4)
                acc = builder.fadd(builder.load(accs[j]), builder.fmul(xv, sv))
                builder.store(acc, accs[j])
    return [_lane_sum(builder, builder.load(acc)) for acc in accs]


def _signed_sums_typing(x, w, signs, m, o, rows):
    if not (
        _is_array_2d(x, types.float32)
        and _is_words_2d(w)
        and _is_array_2d(signs, types.float32)
        and isinstance(m, types.Integer)
        and isinstance(o, types.Integer)
    ):
        return None
    result = types.UniTuple(types.float32, rows) if rows > 1 else types.float32
    return result(x, w, signs, types.int64, types.int64)


@intrinsic
def signed_sums8(typingctx, x, w, signs, m, o):
    """x[m] · s(w[o + j]) for j < 8 as a tuple of float32 (see :func:`_signed_sums`): x (M,
    64·W) float32, zero past the features, W ≤ L; w (O, L) uint64 packed ±1 rows (words past
    W are not read); signs = SIGNS_BY_BYTE."""
    sig = _signed_sums_typing(x, w, signs, m, o, 8)
    if sig is None:
        return None

    def codegen(context, builder, sig, args):
        sums = _signed_sums(context, builder, sig, args, 8)
        return context.make_tuple(builder, sig.return_type, sums)

    return sig, codegen


@intrinsic
def signed_sum1(typingctx, x, w, signs, m, o):
    """x[m] · s(w[o]) as float32, bit for bit what :func:`signed_sums8` gives for that row."""
    sig = _signed_sums_typing(x, w, signs, m, o, 1)
    if sig is None:
        return None

    def codegen(context, builder, sig, args):
        return _signed_sums(context, builder, sig, args, 1)[0]

    return sig, codegen


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
    weight rows (register blocking; ~1.3× the single-row loop at batch ≥ 4 on Zen 4)."""
    s0 = np.int64(0)
    s1 = np.int64(0)
    s2 = np.int64(0)
    s3 = np.int64(0)
    for k in range(a.shape[1]):
        x = a[m, k]
        s0 += np.int64(popcount(x ^ w[o, k]))
        s1 += np.int64(popcount(x ^ w[o + 1, k]))
        s2 += np.int64(popcount(x ^ w[o + 2, k]))
        s3 += np.int64(popcount(x ^ w[o + 3, k]))
    return s0, s1, s2, s3


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
        if a.shape[1] % 8 == 0:
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
            if a.shape[1] % 8 == 0:
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
    :func:`model.engine.layout.aligned_empty` at a third of its cost per call: numba allocates on
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
        if planes.shape[2] % 8 == 0:
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
        if planes.shape[2] % 8 == 0:
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
    packed. planes (B, M, 1), w (O, 1) C-contiguous. The digits mlp's first layer (64 → 1024)
    takes 2.6 µs a row, against 13.6 µs along the rows."""
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
    or None. The numpy expression costs ~6 µs a call in error-state handling alone."""
    for m in range(raw.shape[0]):
        for o in range(raw.shape[1]):
            y = raw[m, o]
            if scale is not None:
                y = np.float32(y * scale[o])
            if bias is not None:
                y = np.float32(y + bias[o])
            out[m, o] = y


@njit(**_PAR)
def threshold_pack_rows(y, cut, invert, out):
    """Real values to packed bits: y (M, O) float, cut (O,) float64, invert (O,) uint8;
    out (M, ⌈O/64⌉) uint64, bit o = (y[m, o] ≥ cut[o]) XOR invert[o]."""
    m_rows, o_rows = y.shape
    words = out.shape[1]
    for m in prange(m_rows):
        for j in range(words):
            word = np.uint64(0)
            for o in range(j * WORD, min(o_rows, (j + 1) * WORD)):
                bit = np.uint64((np.float64(y[m, o]) >= cut[o]) ^ np.bool_(invert[o]))
                word |= bit << np.uint64(o - j * WORD)
            out[m, j] = word


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


def _conv_sums_codegen(context, builder, sig, args, vectors):
    """8·``vectors`` float32 sums acc ← fma(x, w[·, o + j], acc) from acc = bias[o + j] over one
    window, in (dy, dx, c) order; each of the ``vectors`` <8 x float> accumulators stays in a
    register."""
    x_type, w_type, b_type = sig.args[:3]
    x_val, w_val, b_val, i, y0, x0, kh, kw, o, _ = args
    x_arr = context.make_array(x_type)(context, builder, x_val)
    w_arr = context.make_array(w_type)(context, builder, w_val)
    b_arr = context.make_array(b_type)(context, builder, b_val)
    hp, wp, c = (builder.extract_value(x_arr.shape, d) for d in (1, 2, 3))
    o_rows = builder.extract_value(w_arr.shape, 1)

    def vector_at(base, index):
        return builder.load(builder.bitcast(builder.gep(base, [index]), _F8.as_pointer()), align=4)

    # one rounding per term, as oneDNN's convolution (a library call where the CPU has no FMA)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_F8, [_F8, _F8, _F8]), "llvm.fma.v8f32"
    )
    offsets = [builder.add(o, ir.Constant(_I64, 8 * v)) for v in range(vectors)]
    accs = [cgutils.alloca_once(builder, _F8) for _ in range(vectors)]
    for acc, at in zip(accs, offsets, strict=True):
        builder.store(vector_at(b_arr.data, at), acc)
    zero8 = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)
    with cgutils.for_range(builder, kh) as dy_loop:
        y = builder.add(y0, dy_loop.index)
        with cgutils.for_range(builder, kw) as dx_loop:
            dx = dx_loop.index
            pixel = builder.add(builder.mul(builder.add(builder.mul(i, hp), y), wp), x0)
            x_base = builder.mul(builder.add(pixel, dx), c)
            row = builder.mul(builder.add(builder.mul(dy_loop.index, kw), dx), c)
            with cgutils.for_range(builder, c) as ch_loop:
                ch = ch_loop.index
                v = builder.load(builder.gep(x_arr.data, [builder.add(x_base, ch)]))
                vb = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(_F8, None), v, ir.Constant(_I32, 0)),
                    ir.Constant(_F8, None),
                    zero8,
                )
                w_row = builder.mul(builder.add(row, ch), o_rows)
                for acc, at in zip(accs, offsets, strict=True):
                    wv = vector_at(w_arr.data, builder.add(w_row, at))
                    builder.store(builder.call(fma, [vb, wv, builder.load(acc)]), acc)
    d_arr = context.make_array(sig.args[9])(context, builder, args[9])
    for v, acc in enumerate(accs):
        target = builder.gep(d_arr.data, [ir.Constant(_I64, 8 * v)])
        builder.store(builder.load(acc), builder.bitcast(target, _F8.as_pointer()), align=4)


@intrinsic
def fma32(typingctx, a, b, c):
    """fma(a, b, c) in float32: a·b + c rounded once (LLVM ``llvm.fma.f32``)."""
    if not all(isinstance(t, types.Float) and t.bitwidth == 32 for t in (a, b, c)):
        return None

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32"
        )
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


def _conv_sums_intrinsic(vectors):
    def typer(typingctx, x, w, bias, i, y0, x0, kh, kw, o, sums):
        arrays_ok = (
            isinstance(x, types.Array) and x.ndim == 4 and x.layout == "C"
            and x.dtype == types.float32 and _is_array_2d(w, types.float32)
            and all(
                isinstance(v, types.Array) and v.ndim == 1 and v.layout == "C"
                and v.dtype == types.float32
                for v in (bias, sums)
            )
        )  # fmt: skip
        if not arrays_ok:
            return None
        sig = types.none(x, w, bias, *(types.int64,) * 6, sums)

        def codegen(context, builder, sig, args):
            _conv_sums_codegen(context, builder, sig, args, vectors)
            return context.get_dummy_value()

        return sig, codegen

    return typer


def _conv_sums_doc(lanes):
    return (
        f"sums[j] = bias[o + j] + Σ x·w[·, o + j] (fused multiply-adds) for j < {lanes} over the "
        "window at (y0, x0) "
        "of image i: x (N, Hp, Wp, C), w (kh·kw·C, O), bias (O,), sums (≥ lanes,) float32, "
        "C-contiguous. Per input value one broadcast, and per 8 channels a multiply and an add "
        "into an accumulator that stays in a register (a loop over an accumulator array loads "
        "and stores it for every product)."
    )


conv_sums64 = intrinsic(_conv_sums_intrinsic(8))
conv_sums64.__doc__ = _conv_sums_doc(64)
conv_sums8 = intrinsic(_conv_sums_intrinsic(1))
conv_sums8.__doc__ = _conv_sums_doc(8)


@njit(**_JIT_EXACT, inline="always")
def _conv_sum(x, w, bias, i, y0, x0, kh, kw, o):
    """One channel of :func:`conv_sums8`, the same operations in the same order."""
    c = x.shape[3]
    a = bias[o]
    for dy in range(kh):
        for dx in range(kw):
            row = (dy * kw + dx) * c
            for ch in range(c):
                a = fma32(x[i, y0 + dy, x0 + dx, ch], w[row + ch, o], a)
    return a


@njit(**_JIT_EXACT, inline="always")
def _or_decisions(sums, count, cut, invert, out, i, oy, ox, o):
    """Set the decision bits of channels o … o + count − 1 (one word) from their float32 sums."""
    j = o // WORD
    word = np.uint64(0)
    for k in range(count):
        word |= _decide(np.float64(sums[k]), cut, invert, o + k, j * WORD)
    out[i, oy, ox, j] |= word


@njit(**_PAR_EXACT)
def real_conv_threshold_pack(x, w, bias, kh, kw, sh, sw, cut, invert, out):
    """Full-precision conv with folded thresholds, output packed (the stem conv), in float32.

    x (N, Hp, Wp, C) float32, already padded; w (kh·kw·C, O) float32, rows in (dy, dx, c)
    order; bias (O,) float32, the sum's first term (F.conv2d adds it too); out (N, OH, OW,
    ⌈O/64⌉) gets bit o = (raw ≥ cut[o]) XOR invert[o] with raw = bias + Σ x·w in float32, one
    fused multiply-add per term in (dy, dx, c) order (:func:`conv_sums64`). No reduction is
    vectorized and no fast-math flag is set, so raw is the same on every CPU.
    """
    n = x.shape[0]
    oh, ow, words = out.shape[1], out.shape[2], out.shape[3]
    o_rows = w.shape[1]
    for r in prange(n * oh):
        i, oy = r // oh, r % oh
        sums = np.empty(WORD, np.float32)
        for ox in range(ow):
            for j in range(words):
                out[i, oy, ox, j] = 0
            o = 0
            while o + 64 <= o_rows:  # a word at a time: eight independent chains of adds
                conv_sums64(x, w, bias, i, oy * sh, ox * sw, kh, kw, o, sums)
                _or_decisions(sums, 64, cut, invert, out, i, oy, ox, o)
                o += 64
            while o + 8 <= o_rows:
                conv_sums8(x, w, bias, i, oy * sh, ox * sw, kh, kw, o, sums)
                _or_decisions(sums, 8, cut, invert, out, i, oy, ox, o)
                o += 8
            while o < o_rows:
                raw = _conv_sum(x, w, bias, i, oy * sh, ox * sw, kh, kw, o)
                j = o // WORD
                out[i, oy, ox, j] |= _decide(np.float64(raw), cut, invert, o, j * WORD)
                o += 1


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
    calling thread, skipping the parallel region's start (~1 µs a call, more with cold caches)
    and numba's per-call thread-count switch. The Python function is copied under a new name
    because numba's on-disk cache keys a function by name and types, not by compile flags."""
    fn = kernel.py_func
    twin = FunctionType(fn.__code__, fn.__globals__, f"{fn.__name__}_serial", fn.__defaults__)
    twin.__qualname__ = f"{fn.__qualname__}_serial"
    twin.__doc__ = fn.__doc__
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("parallel", "nopython")}
    return njit(cache=True, **options)(twin)


@dataclass(frozen=True)
class KernelSet:
    """The parallel kernels the CPU executor calls, or their serial twins (same arguments)."""

    xor_popcount_gemm: object
    dense_threshold_pack: object
    planes_dense_acc: object
    planes_dense_threshold_pack: object
    planes_word_threshold_pack: object
    threshold_pack_rows: object
    signed_dense: object
    real_packed_dense: object
    real_conv_threshold_pack: object
    im2col_bits: object
    pool_bits: object

    def serial(self) -> KernelSet:
        return KernelSet(*(serial_twin(getattr(self, f.name)) for f in fields(self)))


PARALLEL = KernelSet(
    xor_popcount_gemm,
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


# --- whole binary mlp in one call ------------------------------------------------------------------
_planes_word_serial = SERIAL.planes_word_threshold_pack
_planes_dense_serial = SERIAL.planes_dense_threshold_pack
_dense_serial = SERIAL.dense_threshold_pack
_signed_dense_serial = SERIAL.signed_dense


@njit(**_JIT)
def mlp_rows(x, max_value, first, hidden_w, hidden_cut, hidden_invert, sweeps, last, logits):
    """A binary mlp on a few rows in one call, on the calling thread: the serial kernels of its
    layers run back to back, so the per-call costs (dispatch, argument checks, buffers) are paid
    once instead of once per layer — most of a small model's time at batch 1.

    x (M, F) float32 integer-valued input; first = (w, pcw, cut, invert) of the bit-plane input
    layer (:func:`planes_dense_threshold_pack`); hidden_* the binary layers' weights, cuts and
    inverts (:func:`dense_threshold_pack`) and their direction flags, as non-empty tuples; last = (weight_t, base,
    coef, scale, bias) of the full-precision output layer (:func:`signed_dense`, then
    :func:`affine_rows`; scale and bias may be None); logits (M, O) float32 receives the result.
    Returns False, with logits untouched, unless every input is an integer in [0, max_value]
    (the caller then runs the layers one by one, through the float path).
    """
    w, pcw, cut, invert = first
    planes = integer_bit_planes(x, max_value, w.shape[1])
    if planes.shape[0] == 0:
        return False
    m_rows = x.shape[0]
    a = aligned_words((m_rows, (w.shape[0] + WORD - 1) // WORD))
    if w.shape[1] == 1:
        _planes_word_serial(planes, w, pcw, cut, invert, a)
    else:
        _planes_dense_serial(planes, w, pcw, cut, invert, a)
    for i in range(len(hidden_w)):
        hw = hidden_w[i]
        out = aligned_words((m_rows, (hw.shape[0] + WORD - 1) // WORD))
        _dense_serial(a, hw, hidden_cut[i], hidden_invert[i], out, ROW_CHUNK, 1, sweeps[i])
        a = out
    weight_t, base, coef, scale, bias = last
    raw = np.empty((m_rows, weight_t.shape[1]), np.float64)
    _signed_dense_serial(a, weight_t, base, coef, raw)
    affine_rows(raw.astype(np.float32), scale, bias, logits)
    return True
