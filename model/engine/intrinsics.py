"""llvmlite intrinsics of the CPU engine: instructions numba does not emit by itself.

Hand-written LLVM IR for the inner loops of :mod:`model.engine.kernels`: ``ctpop``/``cttz`` on
words, eight XOR-popcount rows at once on <8 x i64> vectors (``vpopcntq`` on AVX-512 VPOPCNTDQ)
or four on <4 x i64>, float32 sums of ±x over packed bits in a fixed order (the same on every
CPU), the fused multiply-adds of the float convolutions with accumulators kept in registers,
and 64 float comparisons packed into one word. Each intrinsic
checks its argument types and declines (returns None) for any it was not written for.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from model.engine.layout import WIDE_VECTORS, WORD


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


def _vector_counts(context, builder, a_type, w_type, a, w, row, col, lanes):
    """The shared vector loop of the XOR-popcount intrinsics, for ``lanes`` weight rows with
    <lanes x i64> vectors: per ``lanes``-word step of a[row] one vector load, then per weight
    row a load, XOR, ``llvm.ctpop`` and add into that row's own accumulator. Returns the row
    pointers, the accumulators (allocas) and ``whole``, the words the loop covered (the row
    length rounded down to a multiple of ``lanes``)."""
    vector = ir.VectorType(_I64, lanes)
    a_arr = context.make_array(a_type)(context, builder, a)
    w_arr = context.make_array(w_type)(context, builder, w)
    length = builder.extract_value(a_arr.shape, 1)
    ctpop = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector, [vector]), f"llvm.ctpop.v{lanes}i64"
    )
    a_row = builder.gep(a_arr.data, [builder.mul(row, length)])
    w_rows = [
        builder.gep(w_arr.data, [builder.mul(builder.add(col, ir.Constant(_I64, j)), length)])
        for j in range(lanes)
    ]
    accs = [cgutils.alloca_once_value(builder, ir.Constant(vector, [0] * lanes)) for _ in w_rows]
    step = ir.Constant(_I64, lanes)
    whole = builder.sub(length, builder.urem(length, step))
    with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), whole, step) as (k, _):
        av = builder.load(builder.bitcast(builder.gep(a_row, [k]), vector.as_pointer()), align=8)
        for w_row, acc in zip(w_rows, accs, strict=True):
            ptr = builder.bitcast(builder.gep(w_row, [k]), vector.as_pointer())
            counts = builder.call(ctpop, [builder.xor(av, builder.load(ptr, align=8))])
            builder.store(builder.add(builder.load(acc), counts), acc)
    return length, a_row, w_rows, accs, whole


def _counts8(context, builder, a_type, w_type, a, w, row, col):
    """<8 x i64>: popcount(a[row] XOR w[col + j]) in lane j (see :func:`xor_popcount8`; rows
    are a multiple of 8 words, so the vector loop covers them)."""
    accs = _vector_counts(context, builder, a_type, w_type, a, w, row, col, 8)[3]
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


_V4 = ir.VectorType(_I64, 4)


@intrinsic
def xor_popcount4(typingctx, a, w, m, o):
    """popcount(a[m] XOR w[o + j]) for j < 4, as a tuple of 4 int64, for rows of any length.

    Hand-written vector IR for CPUs with 256-bit vectors: per 4-word step one <4 x i64> load of
    a[m], then for each weight row a load, XOR, ``llvm.ctpop.v4i64`` (on AVX2 a nibble lookup
    with VPSHUFB) and add into its own accumulator (4 accumulators: AVX2's 16 registers hold
    them with room to spare), then the row's last ``length mod 4`` words one at a time.
    LLVM's own vectorization of the plain loop handles only rows of 16 words or more, so a
    3×3 conv over 64 channels (9 words a row) ran entirely on scalar POPCNT."""
    if not (_is_words_2d(a) and _is_words_2d(w)):
        return None
    if not (isinstance(m, types.Integer) and isinstance(o, types.Integer)):
        return None
    sig = types.UniTuple(types.int64, 4)(a, w, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        a_val, w_val, row, col = args
        length, a_row, w_rows, accs, whole = _vector_counts(
            context, builder, sig.args[0], sig.args[1], a_val, w_val, row, col, 4
        )
        reduce4 = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I64, [_V4]), "llvm.vector.reduce.add.v4i64"
        )
        totals = [
            cgutils.alloca_once_value(builder, builder.call(reduce4, [builder.load(acc)]))
            for acc in accs
        ]
        with cgutils.for_range_slice(builder, whole, length, ir.Constant(_I64, 1)) as (k, _):
            x = builder.load(builder.gep(a_row, [k]))
            for j in range(4):
                count = builder.ctpop(builder.xor(x, builder.load(builder.gep(w_rows[j], [k]))))
                builder.store(builder.add(builder.load(totals[j]), count), totals[j])
        items = [builder.load(total) for total in totals]
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


def _is_patch_source(src, starts, patch, rows) -> bool:
    """The argument types of a patch source: src a C-contiguous uint64 array, starts a tuple
    of ``rows`` integers, patch a tuple of 3 integers (see :func:`_column_counts`)."""
    return (
        isinstance(src, types.Array) and src.layout == "C" and src.dtype == types.uint64
        and isinstance(starts, types.UniTuple) and starts.count == rows
        and isinstance(starts.dtype, types.Integer)
        and isinstance(patch, types.UniTuple) and patch.count == 3
        and isinstance(patch.dtype, types.Integer)
    )  # fmt: skip


def _column_counts(context, builder, sig, args, rows, vectors):
    """popcount(patch row r XOR column o + 8v + j of wᵀ) for r < ``rows``, v < ``vectors``,
    j < 8 as ``rows`` lists of ``vectors`` <8 x i64> values.

    The patch rows are read in place from ``src`` (an im2col with no copy): row r is
    ``patch = (segments, length, stride)``'s segments of ``length`` consecutive words of src's
    flat data, segment s starting at ``starts[r] + s·stride`` — a convolution's kh image rows of
    kw·Wc words each (one segment of L words for rows already laid out, see
    :func:`~model.engine.kernels.patch_geometry`); patch word k = s·length + i meets weight
    row k. Per word, ``vectors`` loads of wᵀ[k, o:], and per row one broadcast of its word, then
    XOR, ``llvm.ctpop.v8i64`` and add into that (row, vector)'s own accumulator, all
    ``rows``·``vectors`` of them in registers. args start (src, starts, patch, wt, o)."""
    src_val, starts_val, patch_val, wt_val, col = args[:5]
    src = context.make_array(sig.args[0])(context, builder, src_val).data
    wt_arr = context.make_array(sig.args[3])(context, builder, wt_val)
    o_rows = builder.extract_value(wt_arr.shape, 1)
    segments, length, stride = (
        builder.sext(builder.extract_value(patch_val, i), _I64)
        if sig.args[2].dtype.bitwidth < 64
        else builder.extract_value(patch_val, i)
        for i in range(3)
    )
    starts = [builder.extract_value(starts_val, r) for r in range(rows)]
    ctpop = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V8, [_V8]), "llvm.ctpop.v8i64"
    )
    accs = [
        [cgutils.alloca_once_value(builder, ir.Constant(_V8, [0] * 8)) for _ in range(vectors)]
        for _ in range(rows)
    ]
    lane0 = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)
    with cgutils.for_range(builder, segments) as segment:
        offset = builder.mul(segment.index, stride)
        rows_at = [builder.gep(src, [builder.add(start, offset)]) for start in starts]
        wt_segment = builder.gep(
            wt_arr.data, [builder.add(builder.mul(builder.mul(segment.index, length), o_rows), col)]
        )
        with cgutils.for_range(builder, length) as loop:
            i = loop.index
            wt_row = builder.gep(wt_segment, [builder.mul(i, o_rows)])
            columns = [
                builder.load(_vector_at(builder, wt_row, ir.Constant(_I64, 8 * v), _V8), align=8)
                for v in range(vectors)
            ]
            for row_at, row_accs in zip(rows_at, accs, strict=True):
                word = builder.insert_element(
                    ir.Constant(_V8, None), builder.load(builder.gep(row_at, [i])),
                    ir.Constant(_I32, 0),
                )  # fmt: skip
                word = builder.shuffle_vector(word, ir.Constant(_V8, None), lane0)
                for column, acc in zip(columns, row_accs, strict=True):
                    counts = builder.call(ctpop, [builder.xor(word, column)])
                    builder.store(builder.add(builder.load(acc), counts), acc)
    return [[builder.load(acc) for acc in row_accs] for row_accs in accs]


def _vector_at(builder, data, index, vector):
    return builder.bitcast(builder.gep(data, [index]), vector.as_pointer())


# The argument types of a patch source's place (starts, patch) in a column intrinsic's signature.
_PATCH = types.UniTuple(types.int64, 3)


def _column_counts_codegen(context, builder, sig, args, rows, vectors):
    """out[out_m + r, out_o + 8v + j] = the counts of :func:`_column_counts`, as int32; args
    (src, starts, patch, wt, o, out, out_m, out_o)."""
    counts = _column_counts(context, builder, sig, args, rows, vectors)
    out_arr = context.make_array(sig.args[5])(context, builder, args[5])
    width = builder.extract_value(out_arr.shape, 1)
    i32x8 = ir.VectorType(_I32, 8)
    for r, row_counts in enumerate(counts):
        out_row = builder.mul(builder.add(args[6], ir.Constant(_I64, r)), width)
        for v, value in enumerate(row_counts):
            at = builder.add(builder.add(out_row, args[7]), ir.Constant(_I64, 8 * v))
            target = _vector_at(builder, out_arr.data, at, i32x8)
            builder.store(builder.trunc(value, i32x8), target, align=4)


def _column_real_codegen(context, builder, sig, args, rows, vectors):
    """out[m + r, o + c] = the binary layer's real value of channel o + c from the counts of
    :func:`_column_counts` (float32, bit for bit
    :func:`~model.engine.real_kernels.accumulator_rows`): acc = K − 2P (sign input) or
    P − pcw (step input), converted exactly (|acc| < 2²⁴), then ·scale, +bias and
    fma(·, alpha, beta), then + shortcut[m + r, o + c] (a residual add), each rounded as the
    scalar code does (no fast-math flag); a None argument leaves its step out. args (src,
    starts, patch, wt, o, out, m, k, pcw, sign_input, scale, bias, alpha, beta, shortcut)."""
    counts = _column_counts(context, builder, sig, args, rows, vectors)
    out_arr = context.make_array(sig.args[5])(context, builder, args[5])
    width = builder.extract_value(out_arr.shape, 1)
    col, row, k, pcw_val, sign_input = args[4], args[6], args[7], args[8], args[9]
    f8 = ir.VectorType(ir.FloatType(), 8)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(f8, [f8] * 3), "llvm.fma.v8f32"
    )
    pcw = context.make_array(sig.args[8])(context, builder, pcw_val).data
    present = {
        name: context.make_array(sig.args[index])(context, builder, args[index]).data
        for index, name in ((10, "scale"), (11, "bias"), (12, "alpha"), (13, "beta"))
        if not isinstance(sig.args[index], types.NoneType)
    }
    shortcut = None
    if not isinstance(sig.args[14], types.NoneType):
        shortcut = context.make_array(sig.args[14])(context, builder, args[14]).data
    k_vector = builder.shuffle_vector(
        builder.insert_element(ir.Constant(_V8, None), k, ir.Constant(_I32, 0)),
        ir.Constant(_V8, None),
        ir.Constant(ir.VectorType(_I32, 8), [0] * 8),
    )
    for v in range(vectors):
        at = builder.add(col, ir.Constant(_I64, 8 * v))
        per_channel = {
            name: builder.load(_vector_at(builder, data, at, f8), align=4)
            for name, data in present.items()
        }
        pcw_v = builder.load(_vector_at(builder, pcw, at, _V8), align=8)
        for r, row_counts in enumerate(counts):
            p = row_counts[v]
            from_signs = builder.sub(k_vector, builder.add(p, p))
            acc = builder.select(sign_input, from_signs, builder.sub(p, pcw_v))
            y = builder.sitofp(acc, f8)
            if "scale" in per_channel:
                y = builder.fmul(y, per_channel["scale"])
            if "bias" in per_channel:
                y = builder.fadd(y, per_channel["bias"])
            if "alpha" in per_channel:
                y = builder.call(fma, [y, per_channel["alpha"], per_channel["beta"]])
            out_at = builder.add(builder.mul(builder.add(row, ir.Constant(_I64, r)), width), at)
            if shortcut is not None:
                y = builder.fadd(
                    y, builder.load(_vector_at(builder, shortcut, out_at, f8), align=4)
                )
            builder.store(y, _vector_at(builder, out_arr.data, out_at, f8), align=4)


def _column_counts_intrinsic(rows, vectors):
    """The intrinsic of ``rows`` rows × 8·``vectors`` columns, arguments
    (src, starts, patch, wt, o, out, out_m, out_o)."""

    def codegen(context, builder, sig, args):
        _column_counts_codegen(context, builder, sig, args, rows, vectors)
        return context.get_dummy_value()

    def typer(typingctx, src, starts, patch, wt, o, out, out_m, out_o):
        if not (_is_patch_source(src, starts, patch, rows) and _is_words_2d(wt)):
            return None
        if not _is_array_2d(out, types.int32):
            return None
        if not all(isinstance(t, types.Integer) for t in (o, out_m, out_o)):
            return None
        starts_type = types.UniTuple(types.int64, rows)
        return (
            types.none(src, starts_type, _PATCH, wt, types.int64, out, types.int64, types.int64),
            codegen,
        )

    return typer


def _is_vector_or_none(t, dtype) -> bool:
    return isinstance(t, types.NoneType) or (
        isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" and t.dtype == dtype
    )


@intrinsic
def column_block_real(
    typingctx, src, starts, patch, wt, o, out, m, k, pcw, sign_input, scale, bias, alpha, beta,
    shortcut,
):  # fmt: skip
    """out[m + r, o + j] for r < COLUMN_BLOCK_ROWS, j < COLUMN_BLOCK_CHANNELS: a binary layer's
    real outputs straight from the popcounts of :func:`column_block_counts` of the patch rows
    at ``starts`` (m's row first), still in registers (:func:`_column_real_codegen`).
    out (M, O) float32; pcw (O,) int64; scale, bias, alpha, beta (O,) float32 or None (alpha
    and beta together); shortcut (M, O) float32 or None."""
    ok = (
        _is_patch_source(src, starts, patch, COLUMN_BLOCK_ROWS) and _is_words_2d(wt)
        and _is_array_2d(out, types.float32)
        and _is_vector_or_none(pcw, types.int64) and not isinstance(pcw, types.NoneType)
        and isinstance(sign_input, types.Boolean)
        and all(_is_vector_or_none(t, types.float32) for t in (scale, bias, alpha, beta))
        and isinstance(alpha, types.NoneType) == isinstance(beta, types.NoneType)
        and (isinstance(shortcut, types.NoneType) or _is_array_2d(shortcut, types.float32))
    )  # fmt: skip
    if not ok:
        return None
    sig = types.none(
        src, types.UniTuple(types.int64, COLUMN_BLOCK_ROWS), _PATCH, wt, types.int64, out,
        types.int64, types.int64, pcw, types.boolean, scale, bias, alpha, beta, shortcut,
    )  # fmt: skip

    def codegen(context, builder, sig, args):
        _column_real_codegen(context, builder, sig, args, COLUMN_BLOCK_ROWS, 4)
        return context.get_dummy_value()

    return sig, codegen


def _column_counts_doc(rows, lanes):
    return (
        f"out[out_m + r, out_o + j] = popcount(patch row r XOR wt[:, o + j]) for r < {rows}, "
        f"j < {lanes}: the patch rows read in place from src at ``starts`` with ``patch`` = "
        "(segments, length, stride) (:func:`_column_counts`), wt (L, O) uint64 (the weight "
        "rows transposed: column o is weight row o), out int32, all C-contiguous; o + j ≤ O. "
        "Vectorized across output channels rather than along the row, so rows of any length "
        "(a 3×3 conv over 64 channels has 9 words) run at full width with no horizontal sums."
    )


# AVX-512 has 32 vector registers: 4 rows × 32 columns keep 16 accumulators, 4 weight vectors
# and a broadcast in registers (docs/benchmarks.md, "Engine design figures").
COLUMN_BLOCK_ROWS = 4
COLUMN_BLOCK_CHANNELS = 32
column_block_counts = intrinsic(_column_counts_intrinsic(COLUMN_BLOCK_ROWS, 4))
column_block_counts.__doc__ = _column_counts_doc(COLUMN_BLOCK_ROWS, COLUMN_BLOCK_CHANNELS)
column_counts8 = intrinsic(_column_counts_intrinsic(1, 1))
column_counts8.__doc__ = _column_counts_doc(1, 8)


# Row b: the 8 values ±1.0 of the bits of byte b (bit set ⇔ −1), for :func:`signed_sums8`.
SIGNS_BY_BYTE = np.where(
    (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1, np.float32(-1.0), np.float32(1.0)
).astype(np.float32)
_F8 = ir.VectorType(ir.FloatType(), 8)


def _is_array_2d(t, dtype) -> bool:
    return isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" and t.dtype == dtype


_F32X64 = ir.VectorType(ir.FloatType(), WORD)


@intrinsic
def at_least_bits(typingctx, y, cut, m, o):
    """The packed word of y[m, o + i] ≥ cut[o + i] for i < 64 (bit i; False where either is
    NaN): one ``fcmp oge`` of <64 x float> vectors, its <64 x i1> result bitcast to an i64
    (VCMPPS and VMOVMSKPS, eight or sixteen lanes at a time). y (M, O) and cut (O,) float32,
    C-contiguous; o + 64 ≤ O."""
    if not (_is_array_2d(y, types.float32) and isinstance(cut, types.Array)):
        return None
    if not (cut.ndim == 1 and cut.layout == "C" and cut.dtype == types.float32):
        return None
    sig = types.uint64(y, cut, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        y_val, cut_val, row, col = args
        y_arr = context.make_array(sig.args[0])(context, builder, y_val)
        cut_arr = context.make_array(sig.args[1])(context, builder, cut_val)
        length = builder.extract_value(y_arr.shape, 1)
        at = builder.add(builder.mul(row, length), col)
        vectors = [
            builder.load(builder.bitcast(builder.gep(data, [index]), _F32X64.as_pointer()), align=4)
            for data, index in ((y_arr.data, at), (cut_arr.data, col))
        ]
        return builder.bitcast(builder.fcmp_ordered(">=", *vectors), _I64)

    return sig, codegen


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


def _conv_sums_codegen(context, builder, sig, args, vectors, positions=1, lanes=8):
    """``lanes``·``vectors`` float32 sums acc ← fma(x, w[·, o + j], acc) from acc = bias[o + j]
    over one window, in (dy, dx, c) order; each of the ``vectors`` <lanes x float> accumulators
    stays in a register. ``positions`` > 1: the same for the windows at x0 + p·step (args then
    carry ``step`` after x0), each weight vector loaded once for all;
    sums[lanes·vectors·p + j]. Each channel's sum is one lane's chain of fused multiply-adds,
    so the result does not depend on ``lanes``, ``vectors`` or ``positions``."""
    vector = ir.VectorType(ir.FloatType(), lanes)
    x_type, w_type, b_type = sig.args[:3]
    if positions == 1:
        x_val, w_val, b_val, i, y0, x0, kh, kw, o, _ = args
        step = ir.Constant(_I64, 0)
    else:
        x_val, w_val, b_val, i, y0, x0, step, kh, kw, o, _ = args
    x_arr = context.make_array(x_type)(context, builder, x_val)
    w_arr = context.make_array(w_type)(context, builder, w_val)
    b_arr = context.make_array(b_type)(context, builder, b_val)
    hp, wp, c = (builder.extract_value(x_arr.shape, d) for d in (1, 2, 3))
    o_rows = builder.extract_value(w_arr.shape, 1)

    def vector_at(base, index):
        return builder.load(
            builder.bitcast(builder.gep(base, [index]), vector.as_pointer()), align=4
        )

    # one rounding per term, as oneDNN's convolution (a library call where the CPU has no FMA)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{lanes}f32"
    )
    offsets = [builder.add(o, ir.Constant(_I64, lanes * v)) for v in range(vectors)]
    accs = [
        [cgutils.alloca_once(builder, vector) for _ in range(vectors)] for _ in range(positions)
    ]
    for row_accs in accs:
        for acc, at in zip(row_accs, offsets, strict=True):
            builder.store(vector_at(b_arr.data, at), acc)
    lane0 = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
    shifts = [builder.mul(step, ir.Constant(_I64, p)) for p in range(positions)]
    # A window row's kw·C values are contiguous in x (channels last), as are their weight
    # rows in w: one loop over j < kw·C per dy, in (dx, c) order.
    span = builder.mul(kw, c)
    with cgutils.for_range(builder, kh) as dy_loop:
        y = builder.add(y0, dy_loop.index)
        pixel = builder.add(builder.mul(builder.add(builder.mul(i, hp), y), wp), x0)
        x_bases = [builder.mul(builder.add(pixel, s), c) for s in shifts]
        row = builder.mul(dy_loop.index, span)
        with cgutils.for_range(builder, span) as j_loop:
            j = j_loop.index
            broadcasts = []
            for x_base in x_bases:
                v = builder.load(builder.gep(x_arr.data, [builder.add(x_base, j)]))
                broadcasts.append(
                    builder.shuffle_vector(
                        builder.insert_element(ir.Constant(vector, None), v, ir.Constant(_I32, 0)),
                        ir.Constant(vector, None),
                        lane0,
                    )
                )
            w_row = builder.mul(builder.add(row, j), o_rows)
            for v_index, at in enumerate(offsets):
                wv = vector_at(w_arr.data, builder.add(w_row, at))
                for vb, row_accs in zip(broadcasts, accs, strict=True):
                    acc = row_accs[v_index]
                    builder.store(builder.call(fma, [vb, wv, builder.load(acc)]), acc)
    d_arr = context.make_array(sig.args[-1])(context, builder, args[-1])
    for p_index, row_accs in enumerate(accs):
        for v, acc in enumerate(row_accs):
            target = builder.gep(d_arr.data, [ir.Constant(_I64, lanes * (vectors * p_index + v))])
            builder.store(builder.load(acc), builder.bitcast(target, vector.as_pointer()), align=4)


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


def _conv_sums_arrays_ok(x, w, bias, sums) -> bool:
    return (
        isinstance(x, types.Array) and x.ndim == 4 and x.layout == "C"
        and x.dtype == types.float32 and _is_array_2d(w, types.float32)
        and all(
            isinstance(v, types.Array) and v.ndim == 1 and v.layout == "C"
            and v.dtype == types.float32
            for v in (bias, sums)
        )
    )  # fmt: skip


def _conv_sums_intrinsic(vectors, positions=1, lanes=8):
    """The intrinsic of ``positions`` windows × ``lanes``·``vectors`` channels, with arguments
    (x, w, bias, i, y0, x0, kh, kw, o, sums), and ``step`` after x0 for several windows."""

    def codegen(context, builder, sig, args):
        _conv_sums_codegen(context, builder, sig, args, vectors, positions, lanes)
        return context.get_dummy_value()

    def one_window(typingctx, x, w, bias, i, y0, x0, kh, kw, o, sums):
        if not _conv_sums_arrays_ok(x, w, bias, sums):
            return None
        return types.none(x, w, bias, *(types.int64,) * 6, sums), codegen

    def windows(typingctx, x, w, bias, i, y0, x0, step, kh, kw, o, sums):
        if not _conv_sums_arrays_ok(x, w, bias, sums):
            return None
        return types.none(x, w, bias, *(types.int64,) * 7, sums), codegen

    return one_window if positions == 1 else windows


def _conv_sums_doc(lanes, positions=1):
    where = (
        "the window at (y0, x0)"
        if positions == 1
        else f"the {positions} windows at (y0, x0 + p·step), p < {positions}, into "
        f"sums[{lanes}·p + j]"
    )
    return (
        f"sums[j] = bias[o + j] + Σ x·w[·, o + j] (fused multiply-adds) for j < {lanes} over "
        f"{where} of image i: x (N, Hp, Wp, C), w (kh·kw·C, O), bias (O,), sums float32. Per "
        "input value one broadcast per window, and per vector of channels one weight load shared by the "
        "windows and a fused multiply-add into an accumulator that stays in a register."
    )


# The float conv's register blocking, by vector registers: AVX2 has 16, so 3 windows × 32
# channels (12 <8 x float> accumulators, 4 weight vectors and a broadcast; 64 channels × 2
# windows spilled and ran 2× slower). AVX-512 has 32: 4 windows × 64 channels (16 <16 x float>
# accumulators), 1.4× the AVX2 blocking on a 7×7 stem (docs/benchmarks.md, "Engine design
# figures"). The sums are the same bits either way: each channel is one lane's chain of FMAs.
CONV_BLOCK_POSITIONS, _CONV_LANES = (4, 16) if WIDE_VECTORS else (3, 8)
CONV_BLOCK_CHANNELS = 4 * _CONV_LANES
conv_block_sums = intrinsic(_conv_sums_intrinsic(4, CONV_BLOCK_POSITIONS, _CONV_LANES))
conv_block_sums.__doc__ = _conv_sums_doc(CONV_BLOCK_CHANNELS, CONV_BLOCK_POSITIONS)
conv_window_sums = intrinsic(_conv_sums_intrinsic(4, 1, _CONV_LANES))
conv_window_sums.__doc__ = _conv_sums_doc(CONV_BLOCK_CHANNELS)
conv_sums8 = intrinsic(_conv_sums_intrinsic(1))
conv_sums8.__doc__ = _conv_sums_doc(8)
