"""numba kernels for the float32 values of a layer graph: the BatchNorm after a binary conv,
exactly as eager torch rounds it.

Real values between graph operations are kept *channels-last in memory* — arrays of logical
shape (N, C, H, W) whose strides are those of an (N, H, W, C) array — because that is how a
convolution's output rows come out ((N·OH·OW, O) rows) and how the quantizer packs them
(channels into words per position): no transposing copy anywhere along a residual stream.
The kernels therefore take rows (M, C), one row per position.

Rounding (see :mod:`model.engine.floatmath`): torch's CPU BatchNorm in eval mode computes
``y = fma(x, alpha, beta)`` in float32 with one rounding; :func:`~model.engine.intrinsics.fma32`
is LLVM's correctly rounded ``llvm.fma.f32``, so the kernels here give eager's bits. A binary
layer's integer accumulator (K − 2P or P − popcount(w)) is exact in float32 below 2²⁴, and its
optional α and bias are applied as the eager layer does, ``fl(fl(acc·scale) + bias)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from model.engine import runtime  # cache directory and threading layer first
from model.engine.intrinsics import (
    COLUMN_BLOCK_CHANNELS,
    COLUMN_BLOCK_ROWS,
    CONV_BLOCK_POSITIONS,
    column_block_real,
    fma32,
)
from model.engine.kernels import (
    JitOptions,
    block_starts,
    column_block,
    column_edge,
    column_parts,
    column_row_blocks,
    conv_output_row,
    patch_rows,
)

# no fastmath: IEEE float32, every rounding eager's
_EXACT: JitOptions = {"nogil": True, "cache": True}
_EXACT_PAR: JitOptions = {**_EXACT, "parallel": True}


@njit(**_EXACT_PAR)
def batchnorm_rows(x, alpha, beta, out):
    """out[m, c] = fma(x[m, c], alpha[c], beta[c]) in float32; x, out (M, C) float32."""
    for m in prange(x.shape[0]):
        for c in range(x.shape[1]):
            out[m, c] = fma32(x[m, c], alpha[c], beta[c])


@njit(**_EXACT, inline="always")
def _real_accumulator(p, o, k, pcw, sign_input, scale, bias, alpha, beta):
    """Channel o's real value from its popcount p: acc = K − 2P (``sign_input``) or
    P − pcw[o] (step input); y = fl(fl(acc·scale[o]) + bias[o]); fma(y, alpha[o], beta[o])
    (float32; a None array compiles its step away)."""
    acc = k - 2 * p if sign_input else p - pcw[o]
    y = np.float32(acc)
    if scale is not None:
        y = np.float32(y * scale[o])
    if bias is not None:
        y = np.float32(y + bias[o])
    if alpha is not None:
        y = fma32(y, alpha[o], beta[o])
    return y


@njit(**_EXACT_PAR)
def accumulator_rows(p, k, pcw, sign_input, scale, bias, alpha, beta, out):
    """A binary layer's output rows from its popcounts, through its affine part and a
    BatchNorm (either may be absent: None compiles the step away).

    p (M, O) int32 popcounts; out[m, o] = :func:`_real_accumulator` of p[m, o] (float32)."""
    for m in prange(p.shape[0]):
        for o in range(p.shape[1]):
            out[m, o] = _real_accumulator(p[m, o], o, k, pcw, sign_input, scale, bias, alpha, beta)


@njit(**_EXACT_PAR)
def binary_columns_real(
    x, kh, kw, sh, sw, wt, k, pcw, sign_input, scale, bias, alpha, beta, shortcut, out, ranges
):
    """:func:`accumulator_rows` of :func:`~model.engine.kernels.xor_popcount_columns`'s counts
    in one pass: each whole block's counts go from registers straight to real values
    (:func:`~model.engine.intrinsics.column_block_real`), with no (M, O) array of counts
    written and read back; the edges count into a small tile first. x (N, Hp, Wp, Wc) the
    padded bits whose kh×kw / (sh, sw) patches are read in place, wt (L, O) uint64, out
    (N·OH·OW, O) float32; shortcut (N·OH·OW, O) float32 added to each value (in float32, as
    RealAdd rounds it), or None."""
    patch, grid = patch_rows(x, kh, kw, sh, sw)
    m_rows = out.shape[0]
    parts = column_parts(m_rows, ranges)
    for t in prange(parts):
        tile = np.empty((COLUMN_BLOCK_ROWS, COLUMN_BLOCK_CHANNELS), np.int32)
        first, last = column_row_blocks(m_rows, parts, t)
        for b in range(-(-wt.shape[1] // COLUMN_BLOCK_CHANNELS)):
            for r in range(first, last):
                m0, m1, o0, o1 = column_block(m_rows, wt, r, b)
                if m1 - m0 == COLUMN_BLOCK_ROWS and o1 - o0 == COLUMN_BLOCK_CHANNELS:
                    starts = block_starts(x, grid, m0)
                    column_block_real(
                        x, starts, patch, wt, o0, out, m0,
                        k, pcw, sign_input, scale, bias, alpha, beta, shortcut,
                    )  # fmt: skip
                    continue
                column_edge(x, patch, grid, wt, m0, m1, o0, o1, tile, 0, 0)
                for m in range(m0, m1):
                    for o in range(o0, o1):
                        p = tile[m - m0, o - o0]
                        y = _real_accumulator(p, o, k, pcw, sign_input, scale, bias, alpha, beta)
                        if shortcut is not None:
                            y = np.float32(y + shortcut[m, o])
                        out[m, o] = y


@njit(**_EXACT_PAR)
def real_conv_rows(x, w, bias, kh, kw, sh, sw, alpha, beta, out):
    """A full-precision convolution's output rows, then its BatchNorm (None: none).

    x (N, Hp, Wp, C) float32, already padded; w (kh·kw·C, O) float32, rows in (dy, dx, c)
    order; bias (O,) float32, the sum's first term or added to it
    (:data:`~model.engine.kernels.BIAS_AFTER_SUM`); out (N·OH·OW, O) float32 rows, row
    (n, y, x) = fma(raw, alpha, beta) with raw = bias + Σ x·w in float32, one fused
    multiply-add per term in (dy, dx, c) order (:func:`~model.engine.kernels.conv_output_row`)
    — the same sums as the packed stem kernel
    :func:`~model.engine.kernels.real_conv_threshold_pack`."""
    n = x.shape[0]
    oh = (x.shape[1] - kh) // sh + 1
    ow = (x.shape[2] - kw) // sw + 1
    for r in prange(n * oh):
        conv_output_row(x, w, bias, r // oh, r % oh, sh, sw, kh, kw, alpha, beta, out, r * ow)


@njit(**_EXACT_PAR)
def real_dense_rows(x, w, bias, alpha, beta, out, ranges):
    """:func:`real_conv_rows` of a 1×1 convolution with stride 1 (or a dense layer): x (M, C)
    float32 rows, out (M, O), each out row the same bits as there. The rows are blocked across
    image rows, as one long row of windows split into ``ranges`` contiguous ranges (a multiple
    of the block each, but the last), so a 7×7 map's 49 rows take 12 blocks of 4 and one single
    window instead of 7 blocks and 21 single windows (each single window reads all the
    weights)."""
    m, c = x.shape
    blocks = -(-m // CONV_BLOCK_POSITIONS)
    parts = max(1, min(ranges, blocks))
    for t in prange(parts):
        first = min(m, t * blocks // parts * CONV_BLOCK_POSITIONS)
        last = min(m, (t + 1) * blocks // parts * CONV_BLOCK_POSITIONS)
        rows = x[first:last].reshape(1, 1, last - first, c)
        conv_output_row(rows, w, bias, 0, 0, 1, 1, 1, 1, alpha, beta, out, first)


@njit(**_EXACT_PAR)
def pool_nhwc(x, kh, kw, sh, sw, average, out):
    """Max or average pooling of channels-last values in one pass, vectorized along the
    contiguous channels: x (N, H, W, C), out (N, OH, OW, C) float32, C-contiguous. Each window
    is folded in (dy, dx) order from its first value. ``average``: the sum divided by kh·kw in
    float32, as ``F.avg_pool2d`` (no padding) rounds it; else the maximum, NaN if any value of
    the window is NaN, as ``F.max_pool2d``."""
    n, oh, ow, c = out.shape
    count = np.float32(kh * kw)
    for r in prange(n * oh):
        i, oy = r // oh, r % oh
        for ox in range(ow):
            for ch in range(c):
                out[i, oy, ox, ch] = x[i, oy * sh, ox * sw, ch]
            for dy in range(kh):
                for dx in range(kw):
                    if dy == 0 and dx == 0:
                        continue
                    for ch in range(c):
                        m = out[i, oy, ox, ch]
                        v = x[i, oy * sh + dy, ox * sw + dx, ch]
                        if average:
                            out[i, oy, ox, ch] = m + v
                        else:  # a NaN m stays
                            out[i, oy, ox, ch] = v if v > m or v != v else m
            if average:
                for ch in range(c):
                    out[i, oy, ox, ch] /= count


# numba stamps a cached kernel with this file only; add the digest of all the engine sources
runtime.stamp_kernel_caches()
