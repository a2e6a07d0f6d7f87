"""The numba CPU backend: runs a :class:`~model.engine.ops.Program` on numpy arrays.

Binary layers go through the packed kernels of :mod:`model.engine.kernels`. Real-valued
layers run in float32, as eager torch does, in numba kernels whose float32 sums are the same on
every CPU: full-precision convolutions and dense layers (a dense layer is a 1×1 convolution of
one position), and a real input to packed ±1 weights (a float model input). No layer calls
numpy's BLAS: OpenBLAS's workers busy-wait for about 0.1 s after each call, and on cores that
numba's threads need that made a Bi-Real-Net-18 at batch 1 on two threads 2.2× slower (44 ms
against 20 ms with one BLAS thread; docs/benchmarks.md). The full-precision output layer on
packed bits sums in float64 (an integer input keeps its logits within rounding of eager's).
Every call allocates its own buffers, so concurrent calls share nothing mutable; packed buffers
start on a cache line (see :func:`~model.engine.kernels.aligned_words`).

Which kernels a call runs (serial or parallel), and whether a small call
takes a fused path instead, is the dispatch policy's choice (:mod:`model.engine.dispatch`,
:mod:`model.engine.fused`); this module only executes the program's operations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from model.engine import kernels, real_kernels, runtime
from model.engine.dispatch import Dispatch, ranges
from model.engine.floatmath import F32, F64, affine_f32, fma_f32
from model.engine.folding import AffineStep
from model.engine.fused import mlp_plan
from model.engine.graph import run_wired
from model.engine.kernels import PARALLEL, ROW_CHUNK, KernelSet
from model.engine.ops import (
    MAX_PLANE_VALUE,
    BinaryConv,
    BinaryDense,
    Bits,
    Decide,
    FloatConv,
    FloatDense,
    Op,
    PlanesDense,
    Program,
    Quantize,
    RealAdd,
    RealAvgPool,
    RealBatchNorm,
    RealConcat,
    RealFlatten,
    RealGlobalAvgPool,
    RealMaxPool,
    RealPReLU,
    RealShift,
    SignedDense,
    ToReal,
    Unpack,
)
from model.engine.runtime import kernel_guard
from model.packing import unpack_signs, words_for

# An executor method: (op, value, kernel set) → value.
Handler = Callable[..., np.ndarray]
# A binary layer's epilogue as the real-output kernels take it: K, pcw, whether the input is
# ±1, scale, bias, BatchNorm alpha and beta (None: the step is absent).
MaybeArray = np.ndarray | None
RealArgs = tuple[int, np.ndarray, bool, MaybeArray, MaybeArray, MaybeArray, MaybeArray]


class NumbaExecutor:
    """Executes a program with numba kernels; ``run`` is safe to call from several threads.

    One ``_<op>(op, value, kset)`` method per kind of operation, found through the explicit
    ``{op class: method}`` map built in ``__init__``; ``kset`` is the kernel set the call runs
    (serial or parallel), the same for all its operations."""

    name = "numba"

    def __init__(self, program: Program, threads: int | None = None) -> None:
        self.program = program
        # threads of a parallel call (runtime.apply resolves EngineOptions.threads)
        self.threads = threads or runtime.engine_threads()
        self._handlers: dict[type, Handler] = {
            BinaryDense: self._binary_dense,
            BinaryConv: self._binary_conv,
            PlanesDense: self._planes_dense,
            FloatDense: self._float_dense,
            SignedDense: self._signed_dense,
            FloatConv: self._float_conv,
            Quantize: self._quantize,
            Unpack: self._unpack,
            RealBatchNorm: self._real_batch_norm,
            RealMaxPool: self._real_max_pool,
            RealFlatten: self._real_flatten,
            RealAdd: self._real_add,
            RealConcat: self._real_concat,
            RealAvgPool: self._real_avg_pool,
            RealGlobalAvgPool: self._real_global_avg_pool,
            RealShift: self._real_shift,
            RealPReLU: self._real_prelu,
        }
        self._dispatch = Dispatch.for_program(program)
        # Per binary layer, the direction flag its kernel flips on each call (kernels.next_sweep).
        self._sweeps = {id(op): np.zeros(1, np.uint8) for op in program.ops}
        self._mlp = mlp_plan(program, self._sweeps)

    @property
    def memory_bytes(self) -> int:
        return self.program.arrays_bytes

    def run(self, x: np.ndarray, kset: KernelSet | None = None) -> np.ndarray:
        """x: float32 (batch, *input_shape) → logits float32 (batch, classes). ``kset``: the
        kernels to run, by default the dispatch policy's choice for the batch
        (:class:`~model.engine.dispatch.Dispatch`)."""
        if kset is not None:
            return self._run_ops(x, kset)
        batch = x.shape[0]
        if self._mlp is not None and self._dispatch.fused(batch):
            logits = self._mlp.run(x)
            if logits is not None:
                return logits
        return self._dispatch.run(batch, lambda chosen: self._run_ops(x, chosen))

    def _run_ops(self, x: np.ndarray, kset: KernelSet) -> np.ndarray:
        if kset is PARALLEL:
            runtime.use_threads(self.threads)
        value = x
        with kernel_guard():
            if self.program.wiring is not None:
                value = run_wired(self.program, x, lambda op, v: self.execute(op, v, kset))
            else:
                for op in self.program.ops:
                    value = self.execute(op, value, kset)
        return np.ascontiguousarray(value, dtype=F32)

    def execute(self, op: Op, value: np.ndarray, kset: KernelSet = PARALLEL) -> np.ndarray:
        """One operation of the program on its input (a tuple of inputs for add and concat),
        with ``kset``'s kernels; ``run`` calls it for each operation in turn (and
        ``bench/graph.py`` to time each kind)."""
        return self._handlers[type(op)](op, value, kset)

    # --- binary layers ----------------------------------------------------------------------------
    def _binary_dense(
        self, op: BinaryDense, words: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        a = np.ascontiguousarray(words.reshape(words.shape[0], -1))
        return self._binary_rows(op, a, kset)

    def _binary_conv(
        self,
        op: BinaryConv,
        value: np.ndarray | tuple[np.ndarray, np.ndarray],
        kset: KernelSet = PARALLEL,
    ) -> np.ndarray:
        words, shortcut = value if isinstance(value, tuple) else (value, None)
        n = words.shape[0]
        (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
        oh, ow = op.out_hw
        if shortcut is not None:  # its rows, channels last like every real value here
            shortcut = np.ascontiguousarray(shortcut.transpose(0, 2, 3, 1), F32)
            shortcut = shortcut.reshape(n * oh * ow, -1)
        if op.columns is not None:  # the column kernels read the patches in place
            out = self._column_rows(op, _padded_bits(words, op), kset, shortcut)
        else:
            patches = kernels.aligned_words((n * oh * ow, op.weight.shape[1]))
            kset.im2col_bits(words, kh, kw, sh, sw, ph, pw, op.pad_words, patches)
            out = self._binary_rows(op, patches, kset, shortcut)
        if isinstance(op.epilogue, ToReal):
            return out.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)
        return self._pools(op.epilogue, out.reshape(n, oh, ow, -1), kset)

    def _column_rows(
        self, op: BinaryConv, x: np.ndarray, kset: KernelSet, shortcut: np.ndarray | None
    ) -> np.ndarray:
        """A binary conv's real output rows (plus ``shortcut``'s, a fused residual add) by the
        column kernels, from its padded input bits x (N, Hp, Wp, Wc)."""
        assert op.columns is not None and isinstance(op.epilogue, ToReal)
        (kh, kw), (sh, sw) = op.kernel, op.stride
        # the kernels read patch words at offsets computed from x's shape, unchecked: it must
        # give the op's output size and the weights' row length
        grid = ((x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1)
        if grid != op.out_hw or kh * kw * x.shape[3] != op.columns.shape[0]:
            raise AssertionError(f"{op.name}: input bits {x.shape} do not fit the conv")
        m_rows = x.shape[0] * op.out_hw[0] * op.out_hw[1]
        geometry = (x, kh, kw, sh, sw, op.columns)
        real_args = _float32_real_args(op, op.epilogue)
        if real_args is not None:  # counts, epilogue and add in one pass
            out = np.empty((m_rows, op.columns.shape[1]), F32)
            real_kernels.binary_columns_real(*geometry, *real_args, shortcut, out, ranges(kset))
            return out
        p = np.empty((m_rows, op.columns.shape[1]), np.int32)
        kset.xor_popcount_columns(*geometry, p, ranges(kset))
        out = _counts_to_real(op, p)
        return out if shortcut is None else out + shortcut

    def _binary_rows(
        self,
        op: BinaryDense | BinaryConv,
        a: np.ndarray,
        kset: KernelSet,
        shortcut: np.ndarray | None = None,
    ) -> np.ndarray:
        """The layer's rows from its patch (or input) rows ``a``: packed decisions, or real
        values plus ``shortcut``'s rows (a fused residual add) when given."""
        ep = op.epilogue
        if isinstance(ep, Decide):
            out = kernels.aligned_words((a.shape[0], words_for(op.weight.shape[0])))
            kset.dense_threshold_pack(
                a, op.weight, ep.cut, ep.invert, out, ROW_CHUNK, ranges(kset), self._sweeps[id(op)]
            )
            return out
        p = np.empty((a.shape[0], op.weight.shape[0]), np.int32)
        kset.xor_popcount_gemm(a, op.weight, p, ranges(kset), self._sweeps[id(op)])
        out = _counts_to_real(op, p)
        return out if shortcut is None else out + shortcut

    def _planes_dense(
        self, op: PlanesDense, x: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        x = x.reshape(x.shape[0], -1)
        planes = integer_bit_planes(x, op.weight.shape[1])
        ep = op.epilogue
        if planes is None:  # not integers in range: float32 sums over the packed bits
            return _decide_or_real(ep, packed_dense(x, op.weight, op.features, kset), kset)
        if isinstance(ep, Decide):
            out = kernels.aligned_words((x.shape[0], words_for(op.weight.shape[0])))
            # rows of one word: vectorized across outputs rather than along the row
            pack = (
                kset.planes_word_threshold_pack
                if op.weight.shape[1] == 1
                else kset.planes_dense_threshold_pack
            )
            pack(planes, op.weight, op.pcw, ep.cut, ep.invert, out)
            return out
        acc = np.empty((x.shape[0], op.weight.shape[0]), np.int64)
        kset.planes_dense_acc(planes, op.weight, op.pcw, acc)
        return _to_real(ep, acc.astype(F32))

    # --- real-valued layers -----------------------------------------------------------------------
    def _float_dense(self, op: FloatDense, x: np.ndarray, kset: KernelSet = PARALLEL) -> np.ndarray:
        x = x.reshape(x.shape[0], -1)
        if op.weight.dtype == np.uint64:
            raw = packed_dense(x, op.weight, op.features, kset)
            if op.bias_in_raw is not None:
                raw += op.bias_in_raw
        else:  # a 1×1 convolution of (M, F) rows: fixed-order sums on numba's threads
            raw = np.empty((x.shape[0], op.outputs), F32)
            bias = np.zeros(op.outputs, F32) if op.bias_in_raw is None else op.bias_in_raw
            rows = np.ascontiguousarray(x, dtype=F32)
            real_kernels.real_dense_rows(rows, op.weight, bias, None, None, raw, ranges(kset))
        return _decide_or_real(op.epilogue, raw, kset)

    def _signed_dense(
        self, op: SignedDense, words: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        bits = np.ascontiguousarray(words.reshape(words.shape[0], -1))
        raw64 = np.empty((bits.shape[0], op.weight_t.shape[1]), F64)
        kset.signed_dense(bits, op.weight_t, op.base, op.coef, raw64)
        return _decide_or_real(op.epilogue, raw64.astype(F32), kset)

    def _float_conv(self, op: FloatConv, x: np.ndarray, kset: KernelSet = PARALLEL) -> np.ndarray:
        """Fixed-order float32 sums on numba's threads (:mod:`model.engine.real_kernels`):
        packed into the next layer's bits when thresholds follow, else rows of real values."""
        n = x.shape[0]
        oh, ow = op.out_hw
        (kh, kw), (sh, sw) = op.kernel, op.stride
        ep = op.epilogue
        w = op.weight if op.weight.dtype != np.uint64 else _conv_signs(op)
        bias = (
            np.zeros(w.shape[1], F32) if op.bias_in_raw is None else np.asarray(op.bias_in_raw, F32)
        )
        padded = pad_nhwc(x, op.padding, op.pad_value)
        if isinstance(ep, Decide):
            out = kernels.aligned_words((n, oh, ow, words_for(w.shape[1])))
            kset.real_conv_threshold_pack(padded, w, bias, kh, kw, sh, sw, ep.cut, ep.invert, out)
            return self._pools(ep, out, kset)
        # the epilogue's BatchNorm runs inside the kernel unless an affine part comes first
        bn = ep.batchnorm if ep.affine is None else None
        alpha, beta = (None, None) if bn is None else (bn.alpha, bn.beta)
        raw = np.empty((n * oh * ow, w.shape[1]), F32)
        if (kh, kw, sh, sw) == (1, 1, 1, 1) and padded.flags.c_contiguous:  # rows of windows
            rows = padded.reshape(n * oh * ow, -1)
            real_kernels.real_dense_rows(rows, w, bias, alpha, beta, raw, ranges(kset))
        else:
            real_kernels.real_conv_rows(padded, w, bias, kh, kw, sh, sw, alpha, beta, raw)
        y = raw if ep.affine is None else _to_real(ep, raw)
        return y.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)

    def _quantize(self, op: Quantize, x: np.ndarray, kset: KernelSet = PARALLEL) -> np.ndarray:
        if x.ndim == 4:
            n, c, h, w = x.shape
            rows = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(n * h * w, c)
            return _threshold_rows(op.decide, rows, kset).reshape(n, h, w, -1)
        return _threshold_rows(op.decide, x.reshape(x.shape[0], -1), kset)

    def _unpack(self, op: Unpack, words: np.ndarray, kset: KernelSet = PARALLEL) -> np.ndarray:
        return unpack_bits(words, op.input)

    def _real_batch_norm(
        self, op: RealBatchNorm, x: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return fma_f32(x, op.alpha.reshape(shape), op.beta.reshape(shape))

    def _real_max_pool(
        self, op: RealMaxPool, x: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        return real_maxpool(x, op.kernel, op.stride)

    def _real_flatten(
        self, op: RealFlatten, x: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        return x.reshape(x.shape[0], -1)

    # --- v2 graph operations ----------------------------------------------------------------------
    def _real_add(
        self, op: RealAdd, xs: tuple[np.ndarray, ...], kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        total = xs[0] + xs[1]
        for x in xs[2:]:
            total += x
        return total

    def _real_concat(
        self, op: RealConcat, xs: tuple[np.ndarray, ...], kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        return np.concatenate(xs, axis=1)

    def _real_avg_pool(
        self, op: RealAvgPool, x: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        return real_avgpool(x, op.kernel, op.stride)

    def _real_global_avg_pool(
        self, op: RealGlobalAvgPool, x: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        return (x.sum(axis=(2, 3), dtype=F64) / (x.shape[2] * x.shape[3])).astype(F32)

    def _real_shift(self, op: RealShift, x: np.ndarray, kset: KernelSet = PARALLEL) -> np.ndarray:
        return x + op.shift.reshape((1, -1) + (1,) * (x.ndim - 2))

    def _real_prelu(self, op: RealPReLU, x: np.ndarray, kset: KernelSet = PARALLEL) -> np.ndarray:
        slope = op.weight.reshape((1, -1) + (1,) * (x.ndim - 2))
        return np.where(x > 0, x, x * slope)

    def _pools(self, ep: Decide, bits: np.ndarray, kset: KernelSet) -> np.ndarray:
        for pool in ep.pools:
            n, h, w, wc = bits.shape
            (kh, kw), (sh, sw) = pool.kernel, pool.stride
            out = kernels.aligned_words((n, (h - kh) // sh + 1, (w - kw) // sw + 1, wc))
            kset.pool_bits(bits, kh, kw, sh, sw, pool.and_words, out)
            bits = out
        return bits


# --- shared helpers (also used by tests as references) --------------------------------------------
def integer_bit_planes(x: np.ndarray, words: int | None = None) -> np.ndarray | None:
    """(M, F) values → (B, M, words) uint64 bit-planes (zero words after ⌈F/64⌉), or None
    unless every value is an integer in [0, MAX_PLANE_VALUE]. B = bit length of the largest
    value (at least 1). One kernel call checks, counts and packs."""
    words = words_for(x.shape[1]) if words is None else words
    planes = kernels.integer_bit_planes(np.ascontiguousarray(x, dtype=F32), MAX_PLANE_VALUE, words)
    return planes if planes.shape[0] else None


def unpack_bits(words: np.ndarray, bits: Bits) -> np.ndarray:
    """Packed decisions → float32 values (±1 for sign, {0, 1} for step) in the spec's layout."""
    n = words.shape[0]
    if bits.layout == "flat":
        as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(n, -1)
        b = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, : bits.features]
    else:
        c, h, w = bits.shape
        grid = np.ascontiguousarray(words).reshape(n, h, w, -1).view(np.uint8)
        b = np.unpackbits(grid, axis=-1, bitorder="little")[..., :c].transpose(0, 3, 1, 2)
        if bits.layout == "hwc":
            b = b.reshape(n, -1)
    values = b.astype(F32)
    return 1 - 2 * values if bits.binarizer.kind == "sign" else values


def pad_nhwc(x: np.ndarray, padding: tuple[int, int], pad_value: float) -> np.ndarray:
    """(N, C, H, W) → (N, H + 2·ph, W + 2·pw, C) float32 filled with ``pad_value`` around (a
    view of x itself where there is no padding and x is float32 channels-last already).

    Values already channels-last in memory (a conv's or an add's output) are copied in one
    assignment, rows of C contiguous values; channels-first ones (a model's input) one channel
    at a time, contiguous image rows, which is 4× faster for an RGB image at 224² than the one
    transposing assignment (docs/benchmarks.md, "Engine design figures")."""
    n, c, h, w = x.shape
    ph, pw = padding
    if ph == pw == 0 and x.dtype == F32 and _channels_last(x):
        return x.transpose(0, 2, 3, 1)  # already the layout: a view, no copy
    padded = np.full((n, h + 2 * ph, w + 2 * pw, c), pad_value, F32)
    inner = padded[:, ph : ph + h, pw : pw + w, :]
    if _channels_last(x):
        inner[...] = x.transpose(0, 2, 3, 1)
    else:
        for ch in range(c):
            inner[..., ch] = x[:, ch]
    return padded


def _channels_last(x: np.ndarray) -> bool:
    """Whether the (N, C, H, W) array x has channels-last strides, as this engine keeps real
    values between operations (see :mod:`model.engine.real_kernels`)."""
    return x.transpose(0, 2, 3, 1).flags.c_contiguous


def real_maxpool(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """Max over each window of (N, C, H, W) values, NaN-propagating as ``F.max_pool2d``. Values
    kept channels-last between operations (float32) take one pass of
    :func:`~model.engine.real_kernels.pool_nhwc`; any other input the element-wise maximum
    of the kh·kw strided window slices, each a run of contiguous channels (3× faster than
    reducing a sliding-window view over its two small window axes). The result is channels-last
    in memory (see :mod:`model.engine.real_kernels`), which is how a binary layer reads it."""
    (kh, kw), (sh, sw) = kernel, stride
    channels_last = x.transpose(0, 2, 3, 1)
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    if x.dtype == F32 and channels_last.flags.c_contiguous:  # values between operations
        pooled = np.empty((x.shape[0], oh, ow, x.shape[1]), F32)
        real_kernels.pool_nhwc(channels_last, kh, kw, sh, sw, False, pooled)
        return pooled.transpose(0, 3, 1, 2)
    out = None
    for dy in range(kh):
        for dx in range(kw):
            window = channels_last[
                :, dy : dy + sh * (oh - 1) + 1 : sh, dx : dx + sw * (ow - 1) + 1 : sw
            ]
            out = window.astype(F32) if out is None else np.maximum(out, window, out=out)
    assert out is not None, f"pool kernel {kernel}: expected at least one position"
    return out.transpose(0, 3, 1, 2)


def real_avgpool(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """``F.avg_pool2d`` without padding, bit for bit: each window summed in float32 in (dy, dx)
    order, then divided by kh·kw."""
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    if x.dtype == F32 and _channels_last(x):  # values between operations: one numba pass
        pooled = np.empty((x.shape[0], oh, ow, x.shape[1]), F32)
        real_kernels.pool_nhwc(x.transpose(0, 2, 3, 1), kh, kw, sh, sw, True, pooled)
        return pooled.transpose(0, 3, 1, 2)
    total = None
    for dy in range(kh):
        for dx in range(kw):
            window = x[:, :, dy : dy + sh * (oh - 1) + 1 : sh, dx : dx + sw * (ow - 1) + 1 : sw]
            total = window.astype(F32) if total is None else total + window
    assert total is not None, f"pool kernel {kernel}: expected at least one position"
    return total / F32(kh * kw)


def packed_dense(x: np.ndarray, weight: np.ndarray, features: int, kset: KernelSet) -> np.ndarray:
    """x (M, F) real · unpack(weight)ᵀ → (M, O) float32, summed over the packed bits in float32
    (:func:`~model.engine.kernels.real_packed_dense`); x is copied into rows of whole words,
    zero past F."""
    rows = np.zeros((x.shape[0], 64 * words_for(features)), F32)
    rows[:, :features] = x
    out = np.empty((x.shape[0], weight.shape[0]), F32)
    kset.real_packed_dense(rows, weight, out)
    return out


def _padded_bits(words: np.ndarray, op: BinaryConv) -> np.ndarray:
    """A binary conv's input bits (N, H, W, Wc) with its padding around them, as the column
    kernels read them (the input itself where there is none)."""
    n, h, w, wc = words.shape
    ph, pw = op.padding
    if ph == pw == 0:
        return np.ascontiguousarray(words)
    out = np.empty((n, h + 2 * ph, w + 2 * pw, wc), np.uint64)
    kernels.padded_bits(words, ph, pw, op.pad_words, out)
    return out


def _float32_real_args(op: BinaryDense | BinaryConv, ep: ToReal) -> RealArgs | None:
    """The epilogue arguments of the real-output kernels (K, pcw, sign input, scale, bias,
    BatchNorm alpha and beta; see :func:`~model.engine.real_kernels.accumulator_rows`), or
    None where the layer's affine part is not float32 (those take :func:`_counts_to_real`)."""
    affine, bn = ep.affine or AffineStep(None, None), ep.batchnorm
    if any(v is not None and v.dtype != F32 for v in (affine.scale, affine.bias)):
        return None
    return (
        op.features, op.pcw, op.input.binarizer.kind == "sign", affine.scale, affine.bias,
        None if bn is None else bn.alpha, None if bn is None else bn.beta,
    )  # fmt: skip


def _counts_to_real(op: BinaryDense | BinaryConv, p: np.ndarray) -> np.ndarray:
    """A binary layer's real output rows from its popcounts p (M, O) int32: the integer
    accumulator (K − 2P for ±1 inputs, P − popcount(w) for {0, 1}) through its epilogue."""
    ep = op.epilogue
    assert isinstance(ep, ToReal)
    real_args = _float32_real_args(op, ep)
    if real_args is None:
        sign_input = op.input.binarizer.kind == "sign"
        acc = op.features - 2 * p.astype(np.int64) if sign_input else p - op.pcw
        return _to_real(ep, acc.astype(F32))
    out = np.empty(p.shape, F32)
    real_kernels.accumulator_rows(p, *real_args, out)
    return out


def _conv_signs(op: FloatConv) -> np.ndarray:
    """A conv's packed ±1 weights (O, kh, kw, ⌈C/64⌉ words) as float32 (kh·kw·C, O) rows in
    (dy, dx, c) order, the layout of :func:`~model.engine.real_kernels.real_conv_rows`
    (transient: unpacked per call)."""
    signs = unpack_signs(op.weight, op.in_shape[0], axis=1, dtype=F32)  # (O, C, kh, kw)
    return np.ascontiguousarray(signs.transpose(2, 3, 1, 0).reshape(-1, signs.shape[0]))


def _threshold_rows(ep: Decide, rows: np.ndarray, kset: KernelSet) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=F32)
    out = kernels.aligned_words((rows.shape[0], words_for(rows.shape[1])))
    kset.threshold_pack_rows(rows, ep.cut, ep.invert, out)
    return out


def _decide_or_real(ep: Decide | ToReal, raw: np.ndarray, kset: KernelSet) -> np.ndarray:
    return _threshold_rows(ep, raw, kset) if isinstance(ep, Decide) else _to_real(ep, raw)


def _to_real(ep: ToReal, raw: np.ndarray) -> np.ndarray:
    """raw rows (M, O) → the layer's affine part, then the epilogue's BatchNorm (if any)."""
    y = raw
    if ep.affine is not None:
        y = _affine(ep.affine, raw)
    if ep.batchnorm is not None:
        out = np.empty(y.shape, F32)
        real_kernels.batchnorm_rows(
            np.ascontiguousarray(y, F32), ep.batchnorm.alpha, ep.batchnorm.beta, out
        )
        y = out
    return y


def _affine(affine: AffineStep, raw: np.ndarray) -> np.ndarray:
    scale, bias = affine.scale, affine.bias
    if (
        raw.ndim != 2
        or raw.dtype != F32
        or any(v is not None and v.dtype != F32 for v in (scale, bias))
    ):
        return affine_f32(raw, scale, bias)
    out = np.empty(raw.shape, F32)
    kernels.affine_rows(raw, scale, bias, out)
    return out


__all__ = ["NumbaExecutor", "Op"]
