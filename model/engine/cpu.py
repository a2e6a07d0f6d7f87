"""The numba CPU backend: runs a :class:`~model.engine.program.Program` on numpy arrays.

Binary layers go through the packed kernels of :mod:`model.engine.kernels`. Real-valued
layers run in float32, as eager torch does: the full-precision stem convolution (followed by its
folded thresholds) and a real input to packed ±1 weights (a float model input) have numba
kernels whose float32 sums are the same on every CPU (at these sizes a BLAS call costs more in
im2col copies and thread wake-ups than in arithmetic); any other real-valued layer uses numpy's
float32 BLAS. The full-precision output layer on packed bits sums in float64 (an integer input
keeps its logits within rounding of eager's). Every call allocates its own buffers, so concurrent
calls share nothing mutable; packed buffers start on a cache line (see
:func:`~model.engine.kernels.aligned_words`).

Threads, by the call's work (:func:`row_work` × batch):

* below :data:`SERIAL_WORK_LIMIT`, the serial twins of the kernels
  (:data:`~model.engine.kernels.SERIAL`) on the calling thread alone, which also saves starting
  a parallel region in each kernel (~1 µs) and switching numba's thread count. Small calls gain
  little from the second core (digits mlp, batch 3: 61 µs on one thread, 50 µs on two, idle
  machine) but a parallel kernel waits for every worker to be scheduled, so with the other core
  busy its latency tail grows to milliseconds (same call: p99 0.2 ms, worst 8 ms on two
  threads; p99 0.11 ms on one);
* above, the parallel (OpenMP) kernels on the executor's ``threads``
  (:class:`~model.engine.options.EngineOptions`; by default the usable cores), or the serial
  ones in a child forked after OpenMP started
  (:func:`~model.engine.runtime.parallel_kernels_usable`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numba
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from model.engine import kernels, runtime
from model.engine.floatmath import F32, F64, affine_f32, fma_f32
from model.engine.kernels import PARALLEL, ROW_CHUNK, SERIAL, KernelSet
from model.engine.program import (
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
    RealBatchNorm,
    RealFlatten,
    RealMaxPool,
    SignedDense,
    ToReal,
    Unpack,
    handlers,
)
from model.engine.runtime import kernel_guard
from model.packing import unpack_signs, words_for

# Work (see row_work) of one predict call below which its kernels run single-threaded: the digits
# mlp (64 → 1024 → 256 → 10, 12,288 per row) up to batch 5, a 4096-wide binary mlp never.
SERIAL_WORK_LIMIT = 1 << 16
# Bit-planes assumed for the integer input layer (pixels 0..255) when estimating work.
PLANES_ESTIMATE = 8


class NumbaExecutor:
    """Executes a program with numba kernels; ``run`` is safe to call from several threads.

    One ``_<op>(op, value, kset)`` method per kind of operation; ``kset`` is the kernel set the
    call runs (serial or parallel), the same for all its operations."""

    name = "numba"

    def __init__(self, program: Program, threads: int | None = None) -> None:
        self.program = program
        # threads of a parallel call (runtime.apply resolves EngineOptions.threads)
        self.threads = threads or runtime.engine_threads()
        self._handlers = handlers(self)
        self._serial_rows = serial_rows(program)
        # Per binary layer, the direction flag its kernel flips on each call (kernels.next_sweep).
        self._sweeps = {id(op): np.zeros(1, np.uint8) for op in program.ops}
        self._mlp = mlp_plan(program, self._sweeps)

    @property
    def memory_bytes(self) -> int:
        return self.program.arrays_bytes

    def run(self, x: np.ndarray, kset: KernelSet | None = None) -> np.ndarray:
        """x: float32 (batch, *input_shape) → logits float32 (batch, classes). ``kset``: the
        kernels to run, by default the serial ones below :func:`serial_rows` rows."""
        if kset is None:
            if x.shape[0] < self._serial_rows and self._mlp is not None:
                logits = self._mlp.run(x)
                if logits is not None:
                    return logits
            kset = self.kernel_set(x.shape[0])
        if kset is PARALLEL:
            runtime.use_threads(self.threads)
        value = x
        with kernel_guard():
            for op in self.program.ops:
                value = self._handlers[type(op)](op, value, kset)
        return np.ascontiguousarray(value, dtype=F32)

    def kernel_set(self, batch: int) -> KernelSet:
        """The kernels a call of ``batch`` rows runs (see the module docstring)."""
        if batch < self._serial_rows or not runtime.parallel_kernels_usable():
            return SERIAL
        return PARALLEL

    # --- binary layers ----------------------------------------------------------------------------
    def _binary_dense(
        self, op: BinaryDense, words: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        a = np.ascontiguousarray(words.reshape(words.shape[0], -1))
        return self._binary_rows(op, a, op.features, kset)

    def _binary_conv(
        self, op: BinaryConv, words: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        n = words.shape[0]
        (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
        oh, ow = op.out_hw
        patches = kernels.aligned_words((n * oh * ow, op.weight.shape[1]))
        kset.im2col_bits(words, kh, kw, sh, sw, ph, pw, op.pad_words, patches)
        out = self._binary_rows(op, patches, op.features, kset)
        if isinstance(op.epilogue, ToReal):
            return out.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)
        return self._pools(op.epilogue, out.reshape(n, oh, ow, -1), kset)

    def _binary_rows(
        self, op: BinaryDense | BinaryConv, a: np.ndarray, k: int, kset: KernelSet
    ) -> np.ndarray:
        ep = op.epilogue
        if isinstance(ep, Decide):
            out = kernels.aligned_words((a.shape[0], words_for(op.weight.shape[0])))
            kset.dense_threshold_pack(
                a, op.weight, ep.cut, ep.invert, out, ROW_CHUNK, ranges(kset), self._sweeps[id(op)]
            )
            return out
        p = np.empty((a.shape[0], op.weight.shape[0]), np.int32)
        kset.xor_popcount_gemm(a, op.weight, p, ranges(kset), self._sweeps[id(op)])
        acc = k - 2 * p.astype(np.int64) if op.input.binarizer.kind == "sign" else p - op.pcw
        return _to_real(ep, acc.astype(F32))

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
        else:
            raw = np.ascontiguousarray(x, dtype=F32) @ op.weight.T  # float32 BLAS
        if op.bias_in_raw is not None:
            raw += op.bias_in_raw
        return _decide_or_real(op.epilogue, raw, kset)

    def _signed_dense(
        self, op: SignedDense, words: np.ndarray, kset: KernelSet = PARALLEL
    ) -> np.ndarray:
        bits = np.ascontiguousarray(words.reshape(words.shape[0], -1))
        raw64 = np.empty((bits.shape[0], op.weight_t.shape[1]), F64)
        kset.signed_dense(bits, op.weight_t, op.base, op.coef, raw64)
        return _decide_or_real(op.epilogue, raw64.astype(F32), kset)

    def _float_conv(self, op: FloatConv, x: np.ndarray, kset: KernelSet = PARALLEL) -> np.ndarray:
        n = x.shape[0]
        oh, ow = op.out_hw
        ep = op.epilogue
        if isinstance(ep, Decide) and op.weight.dtype != np.uint64:
            out = kernels.aligned_words((n, oh, ow, words_for(op.weight.shape[1])))
            (kh, kw), (sh, sw) = op.kernel, op.stride
            padded = pad_nhwc(x, op.padding, op.pad_value)
            bias = np.zeros(op.weight.shape[1], F32)
            if op.bias_in_raw is not None:
                bias[:] = op.bias_in_raw
            kset.real_conv_threshold_pack(
                padded, op.weight, bias, kh, kw, sh, sw, ep.cut, ep.invert, out
            )
            return self._pools(ep, out, kset)
        cols = real_im2col(x, op.kernel, op.stride, op.padding, op.pad_value)
        if op.weight.dtype == np.uint64:
            c = op.in_shape[0]
            signs = unpack_signs(op.weight, c, axis=1, dtype=F32)  # (O, C, kh, kw), transient
            w = signs.transpose(2, 3, 1, 0).reshape(-1, signs.shape[0])
        else:
            w = op.weight
        raw = cols @ w  # (N·OH·OW, O) float32 BLAS
        if op.bias_in_raw is not None:
            raw += op.bias_in_raw
        if isinstance(ep, ToReal):
            return _to_real(ep, raw).reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)
        return self._pools(ep, _threshold_rows(ep, raw, kset).reshape(n, oh, ow, -1), kset)

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

    def _pools(self, ep: Decide, bits: np.ndarray, kset: KernelSet) -> np.ndarray:
        for pool in ep.pools:
            n, h, w, wc = bits.shape
            (kh, kw), (sh, sw) = pool.kernel, pool.stride
            out = kernels.aligned_words((n, (h - kh) // sh + 1, (w - kw) // sw + 1, wc))
            kset.pool_bits(bits, kh, kw, sh, sw, pool.and_words, out)
            bits = out
        return bits


# --- threads --------------------------------------------------------------------------------------
def row_work(op: Op) -> int:
    """Cost of ``op`` per input row, in inner-loop steps: packed words × output channels (× bit
    planes, × output positions) for binary layers, multiply-adds for float ones."""
    if isinstance(op, BinaryDense):
        return op.weight.size
    if isinstance(op, BinaryConv):
        return op.out_hw[0] * op.out_hw[1] * op.weight.size
    if isinstance(op, PlanesDense):
        return PLANES_ESTIMATE * op.weight.size
    if isinstance(op, FloatDense):
        return op.weight.shape[0] * op.features
    if isinstance(op, SignedDense):
        return op.weight_t.size // 2  # about half the input bits are set
    if isinstance(op, FloatConv):
        (kh, kw), channels = op.kernel, op.in_shape[0]
        outputs = op.out_hw[0] * op.out_hw[1] * op.epilogue.out.shape[0]
        return outputs * kh * kw * channels
    return 0


@dataclass(frozen=True)
class MlpPlan:
    """A binary mlp's arrays, laid out for :func:`~model.engine.kernels.mlp_rows`, which runs
    the whole model in one call for batches below :func:`serial_rows` (single-threaded anyway,
    and at batch 1 dominated by per-layer call costs: digits mlp 21 → 8 µs a call)."""

    features: int
    classes: int
    first: tuple  # (weight, pcw, cut, invert) of the bit-plane input layer
    hidden: tuple  # (weights, cuts, inverts, direction flags) of the binary layers, each a tuple
    last: tuple  # (weight_t, base, coef, scale, bias) of the full-precision output layer

    def run(self, x: np.ndarray) -> np.ndarray | None:
        """Logits of x (batch, …) float32, or None when x is not integers in range (the
        layer-by-layer path then takes its float route)."""
        rows = np.ascontiguousarray(x.reshape(x.shape[0], self.features), dtype=F32)
        logits = np.empty((x.shape[0], self.classes), F32)
        # serial kernels only: no parallel region, so no kernel_guard whatever the layer
        done = kernels.mlp_rows(rows, MAX_PLANE_VALUE, self.first, *self.hidden, self.last, logits)
        return logits if done else None


def mlp_plan(program: Program, sweeps: dict[int, np.ndarray]) -> MlpPlan | None:
    """The :class:`MlpPlan` of ``program`` if it is [flatten,] bit-plane dense, binary dense (one
    or more), full-precision dense — every binary layer deciding without pooling, the output's
    affine step in float32 — else None."""
    flattens = [i for i, op in enumerate(program.ops) if isinstance(op, RealFlatten)]
    ops = program.ops[len(flattens) :]
    if flattens not in ([], [0]) or len(ops) < 2:  # a flatten may only come first
        return None
    first, *hidden, last = ops
    if not hidden:  # the kernel indexes the hidden layers' tuples, which must not be empty
        return None
    if not (isinstance(first, PlanesDense) and _plain_decide(first.epilogue)):
        return None
    if not all(isinstance(op, BinaryDense) and _plain_decide(op.epilogue) for op in hidden):
        return None
    if not (isinstance(last, SignedDense) and isinstance(last.epilogue, ToReal)):
        return None
    affine = last.epilogue.affine
    scale, bias = (None, None) if affine is None else (affine.scale, affine.bias)
    if any(v is not None and v.dtype != F32 for v in (scale, bias)):
        return None
    # Tuples, not typed lists: numba checks a tuple's items in C, a typed list in Python
    # (7.5 → 4.8 µs a call for the digits mlp).
    hidden_arrays = tuple(
        tuple(values)
        for values in zip(
            *((op.weight, op.epilogue.cut, op.epilogue.invert, sweeps[id(op)]) for op in hidden),
            strict=True,
        )
    )
    # the kernel indexes each tuple by a loop variable: its items must have one numba type
    for arrays, dtype in zip(hidden_arrays, (np.uint64, np.int64, np.uint8, np.uint8), strict=True):
        if not all(a.dtype == dtype and a.flags.c_contiguous for a in arrays):
            return None
    ep = first.epilogue
    return MlpPlan(
        features=first.features,
        classes=last.weight_t.shape[1],
        first=(first.weight, first.pcw, ep.cut, ep.invert),
        hidden=hidden_arrays,
        last=(last.weight_t, last.base, float(last.coef), scale, bias),
    )


def _plain_decide(ep: Decide | ToReal) -> bool:
    return isinstance(ep, Decide) and not ep.pools


def ranges(kset: KernelSet) -> int:
    """Contiguous ranges a kernel splits its work into: one per numba thread for the parallel
    kernels, else one."""
    return numba.get_num_threads() if kset is PARALLEL else 1


def serial_rows(program: Program) -> int:
    """The smallest batch whose work reaches SERIAL_WORK_LIMIT: smaller batches run the serial
    kernels, this one and larger the parallel ones."""
    return rows_below(program, SERIAL_WORK_LIMIT)


def rows_below(program: Program, limit: int) -> int:
    """The smallest batch whose work (:func:`row_work` × batch) reaches ``limit``."""
    per_row = sum(row_work(op) for op in program.ops)
    return -(-limit // per_row) if per_row else sys.maxsize


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
    """(N, C, H, W) → (N, H + 2·ph, W + 2·pw, C) float32 filled with ``pad_value`` around."""
    n, c, h, w = x.shape
    ph, pw = padding
    padded = np.full((n, h + 2 * ph, w + 2 * pw, c), pad_value, F32)
    padded[:, ph : ph + h, pw : pw + w, :] = x.transpose(0, 2, 3, 1)
    return padded


def real_im2col(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    pad_value: float,
) -> np.ndarray:
    """(N, C, H, W) → (N·OH·OW, kh·kw·C) float32 patches in (dy, dx, c) order."""
    c = x.shape[1]
    (kh, kw), (sh, sw) = kernel, stride
    padded = pad_nhwc(x, padding, pad_value)
    windows = sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
    # (N, OH, OW, C, kh, kw) → (N, OH, OW, kh, kw, C)
    return np.ascontiguousarray(windows.transpose(0, 1, 2, 4, 5, 3)).reshape(-1, kh * kw * c)


def real_maxpool(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    windows = sliding_window_view(x, kernel, axis=(2, 3))[:, :, :: stride[0], :: stride[1]]
    return windows.max(axis=(-2, -1))


def packed_dense(x: np.ndarray, weight: np.ndarray, features: int, kset: KernelSet) -> np.ndarray:
    """x (M, F) real · unpack(weight)ᵀ → (M, O) float32, summed over the packed bits in float32
    (:func:`~model.engine.kernels.real_packed_dense`); x is copied into rows of whole words,
    zero past F."""
    rows = np.zeros((x.shape[0], 64 * words_for(features)), F32)
    rows[:, :features] = x
    out = np.empty((x.shape[0], weight.shape[0]), F32)
    kset.real_packed_dense(rows, weight, out)
    return out


def _threshold_rows(ep: Decide, rows: np.ndarray, kset: KernelSet) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=F32)
    out = kernels.aligned_words((rows.shape[0], words_for(rows.shape[1])))
    kset.threshold_pack_rows(rows, ep.cut, ep.invert, out)
    return out


def _decide_or_real(ep: Decide | ToReal, raw: np.ndarray, kset: KernelSet) -> np.ndarray:
    return _threshold_rows(ep, raw, kset) if isinstance(ep, Decide) else _to_real(ep, raw)


def _to_real(ep: ToReal, raw: np.ndarray) -> np.ndarray:
    if ep.affine is None:
        return raw
    scale, bias = ep.affine.scale, ep.affine.bias
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
