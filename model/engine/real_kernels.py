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

from model.engine import runtime  # noqa: F401  (cache directory and threading layer first)
from model.engine.intrinsics import conv_pair_sums64, conv_sums8, conv_sums64, fma32
from model.engine.kernels import JitOptions, _conv_sum

# no fastmath: IEEE float32, every rounding eager's
_EXACT: JitOptions = {"nogil": True, "cache": True}
_EXACT_PAR: JitOptions = {**_EXACT, "parallel": True}


@njit(**_EXACT_PAR)
def batchnorm_rows(x, alpha, beta, out):
    """out[m, c] = fma(x[m, c], alpha[c], beta[c]) in float32; x, out (M, C) float32."""
    for m in prange(x.shape[0]):
        for c in range(x.shape[1]):
            out[m, c] = fma32(x[m, c], alpha[c], beta[c])


@njit(**_EXACT_PAR)
def accumulator_rows(p, k, pcw, sign_input, scale, bias, alpha, beta, out):
    """A binary layer's output rows from its popcounts, through its affine part and a
    BatchNorm (either may be absent: None compiles the step away).

    p (M, O) int32 popcounts; acc = K − 2P (``sign_input``) or P − pcw[o] (step input);
    y = fl(fl(acc·scale[o]) + bias[o]); out[m, o] = fma(y, alpha[o], beta[o]) (float32)."""
    for m in prange(p.shape[0]):
        for o in range(p.shape[1]):
            acc = k - 2 * p[m, o] if sign_input else p[m, o] - pcw[o]
            y = np.float32(acc)
            if scale is not None:
                y = np.float32(y * scale[o])
            if bias is not None:
                y = np.float32(y + bias[o])
            if alpha is not None:
                y = fma32(y, alpha[o], beta[o])
            out[m, o] = y


@njit(**_EXACT_PAR)
def real_conv_rows(x, w, bias, kh, kw, sh, sw, alpha, beta, out):
    """A full-precision convolution's output rows, then its BatchNorm (None: none).

    x (N, Hp, Wp, C) float32, already padded; w (kh·kw·C, O) float32, rows in (dy, dx, c)
    order; bias (O,) float32, the sum's first term; out (N·OH·OW, O) float32 rows, row
    (n, y, x) = fma(raw, alpha, beta) with raw = bias + Σ x·w in float32, one fused
    multiply-add per term in (dy, dx, c) order, 64 (then 8, then 1) channels at a time in
    registers (:func:`~model.engine.intrinsics.conv_sums64`) — the same sums as the packed
    stem kernel :func:`~model.engine.kernels.real_conv_threshold_pack`."""
    n = x.shape[0]
    oh = (x.shape[1] - kh) // sh + 1
    ow = (x.shape[2] - kw) // sw + 1
    o_rows = w.shape[1]
    pairs = ow // 2 if o_rows % 64 == 0 else 0  # two positions per weight load, 64 channels
    for r in prange(n * oh):
        i, oy = r // oh, r % oh
        sums = np.empty(128, np.float32)
        for q in range(pairs):
            ox = 2 * q
            row = r * ow + ox
            for o in range(0, o_rows, 64):
                conv_pair_sums64(x, w, bias, i, oy * sh, ox * sw, sw, kh, kw, o, sums)
                _store(sums, 64, alpha, beta, out, row, o)
                _store(sums[64:], 64, alpha, beta, out, row + 1, o)
        for ox in range(2 * pairs, ow):
            row = r * ow + ox
            o = 0
            while o + 64 <= o_rows:
                conv_sums64(x, w, bias, i, oy * sh, ox * sw, kh, kw, o, sums)
                _store(sums, 64, alpha, beta, out, row, o)
                o += 64
            while o + 8 <= o_rows:
                conv_sums8(x, w, bias, i, oy * sh, ox * sw, kh, kw, o, sums)
                _store(sums, 8, alpha, beta, out, row, o)
                o += 8
            while o < o_rows:
                sums[0] = _conv_sum(x, w, bias, i, oy * sh, ox * sw, kh, kw, o)
                _store(sums, 1, alpha, beta, out, row, o)
                o += 1


@njit(**_EXACT, inline="always")
def _store(sums, count, alpha, beta, out, row, o):
    for k in range(count):
        y = sums[k]
        if alpha is not None:
            y = fma32(y, alpha[o + k], beta[o + k])
        out[row, o + k] = y
