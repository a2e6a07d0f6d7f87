"""The engine's intermediate representation: the operations a program runs, backend-independent.

:mod:`model.engine.compiler` builds a :class:`Program` from an artifact's layer graph; both
backends run it (:mod:`model.engine.cpu` with numba, and :mod:`model.engine.torch_backend`).
Values between operations are either

* **real**: float32 arrays in the spec's layout, (batch, C, H, W) or (batch, F), or
* **bits**: packed decisions of the next layer's input quantizer, one bit per value (``sign``:
  1 ⇔ −1; ``step``: 1 ⇔ 1), channels packed into uint64 words: (batch, ⌈F/64⌉) for flat values,
  (batch, H, W, ⌈C/64⌉) for images ("nhwc"), and a flattened image keeps that word layout
  (batch, H·W·⌈C/64⌉) ("hwc") — the consuming dense layer's weights are permuted to match at
  compile time.

A dense or conv layer followed (through BatchNorm, max-pool and flatten layers) by a layer with
an input quantizer ends in a :class:`Decide` epilogue: thresholds folded from the whole chain
(:mod:`model.engine.folding`) and max-pools applied to the packed decisions. Otherwise it ends
in :class:`ToReal` and the following layers run on real values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

import numpy as np

from model.engine.folding import AffineStep, BatchNormStep
from model.engine.layout import Shape
from model.quantizers import Binarizer

# Largest input value for which integer bit-planes are used (16 planes).
MAX_PLANE_VALUE = 2**16 - 1


# --- values ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bits:
    """Packed decisions. ``layout``: "flat" (F,), "nhwc" (C, H, W), "hwc" (flattened (C, H, W))."""

    binarizer: Binarizer
    shape: Shape  # logical per-instance shape; (C, H, W) for nhwc and hwc
    layout: str

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def features(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class Real:
    shape: Shape


# --- epilogues ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitPool:
    """Max-pool on packed decisions: AND of the window where ``and_words`` has a bit, else OR."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    and_words: np.ndarray  # (⌈C/64⌉,) uint64


@dataclass(frozen=True)
class Decide:
    """bit = (raw ≥ cut) XOR invert per channel, then the pools, in order.

    ``cut`` is int64 on the popcount P for binary-input layers, float64 (float32 values) on the
    raw float32 value (or integer accumulator) for real-input layers.
    """

    cut: np.ndarray
    invert: np.ndarray  # (C,) uint8
    pools: tuple[BitPool, ...]
    out: Bits


@dataclass(frozen=True)
class ToReal:
    """raw → fl(fl(raw·scale) + bias) (the layer's affine part, when it was not folded into raw),
    then, when the layer is followed by a BatchNorm whose output stays real (a residual branch
    before its ``add``), that BatchNorm: y → fma(y, alpha, beta), as torch rounds it."""

    affine: AffineStep | None
    out: Real
    batchnorm: BatchNormStep | None = None


Epilogue = Decide | ToReal


# --- operations -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinaryDense:
    """Bits × packed ±1 weights. raw = a·w = K − 2P (sign input) or P − pcw (step input)."""

    name: str
    weight: np.ndarray  # (O, L) uint64, L = words of the input layout
    pcw: np.ndarray  # (O,) int64: popcount of each weight row (its −1s)
    features: int  # K
    input: Bits
    epilogue: Epilogue


@dataclass(frozen=True)
class BinaryConv:
    """Bits (nhwc) ⋆ packed ±1 weights; patches padded with ``pad_words``."""

    name: str
    # (O, row_words(kh·kw·Wc)) uint64 in (dy, dx, word) order, zero-padded; with ``columns``,
    # (O, kh·kw·Wc) unpadded, a view of them (one copy)
    weight: np.ndarray
    pcw: np.ndarray  # (O,) int64
    features: int  # K = C·kh·kw
    input: Bits
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    pad_words: np.ndarray  # (Wc,) uint64
    out_hw: tuple[int, int]
    epilogue: Epilogue
    # (kh·kw·Wc, O) uint64, C-contiguous: the weight rows transposed, for the column kernel
    # (kernels.xor_popcount_columns) where the CPU has AVX-512 VPOPCNTDQ and the output is real
    columns: np.ndarray | None = None
    # The real output plus a second input, the shortcut (N, O, OH, OW) float32, rounded as
    # RealAdd rounds it: a residual block's conv → BatchNorm → add in one operation
    # (compiler.fuse_residual_adds), whose inputs are then (bits, shortcut).
    residual: bool = False


@dataclass(frozen=True)
class PlanesDense:
    """Real (integer-valued) model input × packed ±1 weights, exactly, through bit-planes:
    x·w = Σ_b 2^b (popcount(x_b XOR w) − pcw). Inputs that are not integers in
    [0, MAX_PLANE_VALUE] take a float32 path that sums ±x over the packed bits
    (:func:`model.engine.kernels.real_packed_dense`)."""

    name: str
    weight: np.ndarray  # (O, row_words(⌈F/64⌉)) uint64, zero-padded
    pcw: np.ndarray
    features: int
    epilogue: Epilogue


@dataclass(frozen=True)
class FloatDense:
    """Real input × weights in float32: ``weight`` is float32 (F, O), Wᵀ (read as a 1×1
    convolution's weights, :func:`model.engine.real_kernels.real_conv_rows`), or packed ±1
    (O, ⌈F/64⌉) uint64 (summed over the bits, :func:`model.engine.kernels.real_packed_dense`).
    raw = fl(x·W) (+ bias when it is not part of the epilogue's affine)."""

    name: str
    weight: np.ndarray
    features: int
    bias_in_raw: np.ndarray | None
    epilogue: Epilogue

    @property
    def outputs(self) -> int:
        return self.weight.shape[0] if self.weight.dtype == np.uint64 else self.weight.shape[1]


@dataclass(frozen=True)
class SignedDense:
    """Bits × float32 weights (the full-precision output layer), straight from the packed bits:
    raw = fl(Σ_i v_i·W[o, i]) with v = ±1 (sign) or {0, 1} (step), accumulated in float64 as
    ``base + coef · Σ_{bit i set} weight_t[i]`` (sign: base = Σ_i W[o, i], coef = −2)."""

    name: str
    weight_t: np.ndarray  # (64·L, O) float32: Wᵀ in the bits' word layout, zero rows at padding
    base: np.ndarray  # (O,) float64
    coef: float
    input: Bits
    epilogue: Epilogue


@dataclass(frozen=True)
class FloatConv:
    """Real (N, C, H, W) input, padded with ``pad_value``, ⋆ weights, accumulated in float32.
    ``weight`` is float32 (kh·kw·C, O) with rows in (dy, dx, c) order, or packed ±1
    (O, kh, kw, ⌈C/64⌉) words as stored (unpacked per call)."""

    name: str
    weight: np.ndarray
    in_shape: Shape
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    pad_value: float
    out_hw: tuple[int, int]
    bias_in_raw: np.ndarray | None
    epilogue: Epilogue


@dataclass(frozen=True)
class Quantize:
    """Real → bits with the consumer's binarizer: a threshold at 0, or per channel where
    shifts (ReActNet's RSign) or BatchNorms before the binarizer are folded into ``cut``."""

    decide: Decide


@dataclass(frozen=True)
class Unpack:
    """Bits → real ±1 (sign) or {0, 1} (step) in the spec's layout."""

    input: Bits
    out: Real


@dataclass(frozen=True)
class RealBatchNorm:
    alpha: np.ndarray
    beta: np.ndarray


@dataclass(frozen=True)
class RealMaxPool:
    kernel: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True)
class RealFlatten:
    out: Real


# --- v2 graph operations on real values (float32, as eager torch computes them) ----------------
@dataclass(frozen=True)
class RealAdd:
    """((x₁ + x₂) + x₃) + …, each sum rounded to float32, in the order of the inputs."""

    out: Real


@dataclass(frozen=True)
class RealConcat:
    """The inputs joined along the channel (or feature) axis, ``torch.cat(dim=1)``."""

    out: Real


@dataclass(frozen=True)
class RealAvgPool:
    """Mean of each kh×kw window: fl(Σ window in (dy, dx) order, float32) / (kh·kw), which is
    ``F.avg_pool2d`` on the CPU bit for bit."""

    kernel: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True)
class RealGlobalAvgPool:
    """(N, C, H, W) → (N, C): the mean over H·W (summed in float64, then rounded once)."""

    out: Real


@dataclass(frozen=True)
class RealShift:
    """y = fl(x + shift[c])."""

    shift: np.ndarray  # (C,) float32


@dataclass(frozen=True)
class RealPReLU:
    """y = x where x > 0, else fl(weight[c]·x) (``F.prelu``)."""

    weight: np.ndarray  # (C,) float32


Op = (
    BinaryDense
    | BinaryConv
    | PlanesDense
    | FloatDense
    | SignedDense
    | FloatConv
    | Quantize
    | Unpack
    | RealBatchNorm
    | RealMaxPool
    | RealFlatten
    | RealAdd
    | RealConcat
    | RealAvgPool
    | RealGlobalAvgPool
    | RealShift
    | RealPReLU
)

# Operations that take several inputs (a tuple of values) rather than one.
MERGE_OPS: tuple[type, ...] = (RealAdd, RealConcat)


OPS: tuple[type, ...] = get_args(Op)


@dataclass(frozen=True)
class Wire:
    """Where one operation of a graph program reads and writes: value slots (slot 0 is the
    model input), and the slots whose last reader it is, released after it runs."""

    inputs: tuple[int, ...]
    output: int
    release: tuple[int, ...]


@dataclass(frozen=True)
class Program:
    """The operations in order. ``wiring`` (one :class:`Wire` per operation) is None for a
    chain, where each operation reads the previous one's output; a v2 graph has it."""

    ops: tuple[Op, ...]
    input_shape: Shape
    arrays_bytes: int = field(default=0)
    wiring: tuple[Wire, ...] | None = None
