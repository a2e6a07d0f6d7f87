"""The torch backend: the same compiled program on a torch device (CUDA, or CPU for CI).

At load every operation of the program becomes a *step* holding device tensors prepared once:
packed weights are unpacked to ±1 in the binary dtype, thresholds moved into the accumulator's
domain. Between steps, binary activations stay unpacked on the device as values (±1 for
``sign``, {0, 1} for ``step``) in (N, C, H, W) or (N, F) — never re-packed to bits.

Binary layers (``BinaryDense``, ``BinaryConv``) compute the signed sum exactly::

    acc = Σ_i a_i·s_i,   a_i ∈ {±1} or {0, 1},  s_i ∈ {±1},  |acc| ≤ K

* float32 (CPU): one matmul / ``F.conv2d``; exact while K < 2**24.
* float16 (CUDA, tensor cores): every partial sum of at most 2048 terms is an integer of
  magnitude ≤ 2048, which float16 holds exactly, so the product is exact whatever the library
  accumulates in. Longer sums are split into chunks of ≤ 2048 terms (a batched matmul, or a
  grouped convolution over channel groups) whose float16 results are added in float32.

Binary convolutions pad explicitly with the trained pad value (±1, or the ``step`` value)
before a ``padding=0`` convolution, so padded positions count as in training. The popcount
threshold of the CPU engine, ``bit = (P ≥ cut) XOR invert``, is moved at load into the
accumulator's domain with a per-output-channel sign folded into the weight rows::

    sign input: P = (K − acc)/2   ⇒ bit ⇔ −acc ≥ 2·cut − K
    step input: P = acc + pcw     ⇒ bit ⇔  acc ≥ cut − pcw
    invert:     NOT (u ≥ T)       ⇔ −u ≥ 1 − T              (u, T integers)

so the epilogue is one compare ``u ≥ T`` and a ``where`` to the next layer's values. Max-pools
of decisions pool ``u`` before the compare (OR of ``u ≥ T`` = max u ≥ T; AND = min u ≥ T).

Exactness policy. Binary layers and integer-input bit-plane layers are exact integer
arithmetic on every device, so their decisions equal the CPU engine's. Full-precision layers
(float weights, or real-valued inputs) accumulate in ``real_dtype``: float64 on the CPU, the
CPU engine's own rounding (then rounded to float32), so the torch backend on the CPU is bit
identical to the CPU engine for integer inputs; float32 on CUDA (float64 runs at 1/32–1/64
speed on most cards), where logits agree to float32 rounding of the sums and a stem decision
can flip only when its float64 sum lies within that rounding of the threshold.

On CUDA each model owns a stream and, per served batch size (rounded up to a power of two), a
CUDA graph of the whole forward with static input/output buffers and pinned host staging; a
call copies in, replays, copies out. :attr:`TorchExecutor.memory_bytes` is the weights plus the
peak device memory of a call at the largest prepared batch.

This is the only module of ``model`` that imports torch.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model.engine.graph import run_wired
from model.engine.ops import (
    MAX_PLANE_VALUE,
    BinaryConv,
    BinaryDense,
    Bits,
    Decide,
    FloatConv,
    FloatDense,
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
from model.errors import DeviceUnavailableError, ModelMemoryError

# Longest sum a float16 product may carry: its partial sums are integers of magnitude ≤ 2048.
FP16_EXACT_TERMS = 2048
# Longest sum float32 holds exactly.
FP32_EXACT_TERMS = 2**24
# Largest batch captured as a CUDA graph; larger calls run eagerly on the model's stream.
MAX_GRAPH_BATCH = 1024

# A step takes its input's tensor, or (add, concat) the tuple of its inputs' tensors as
# graph.run_wired hands them: Any, since one callable type cannot take either.
Step = Callable[[Any], torch.Tensor]


def cuda_device(device: str) -> str:
    """Validate "cuda" / "cuda:N" against this machine; DeviceUnavailableError if absent."""
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device!r} was requested but torch {torch.__version__} sees no CUDA "
            "device; use device='cpu' or 'auto'"
        )
    index = torch.cuda.current_device() if device == "cuda" else int(device.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailableError(
            f"device {device!r} does not exist: this machine has {count} CUDA device(s)"
        )
    return f"cuda:{index}"


def device_name(device: str) -> str:
    """A human name of ``device`` ("NVIDIA H200", "cpu")."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def release_cuda_memory() -> None:
    """Hand cached blocks of dropped tensors back to the driver (after a model left the GPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Precision:
    """Dtypes of one executor: ``binary`` for ±1 activations and weights (their sums exact, see
    the module docstring), ``real`` for the accumulation of full-precision layers."""

    binary: torch.dtype
    real: torch.dtype

    @staticmethod
    def for_device(device: torch.device) -> Precision:
        if device.type == "cuda":
            return Precision(binary=torch.float16, real=torch.float32)
        return Precision(binary=torch.float32, real=torch.float64)


class TorchExecutor:
    """Runs a program with torch on ``device``; ``run`` is thread-safe.

    ``precision``: dtypes (default :meth:`Precision.for_device`). ``max_batch``: the largest
    batch the memory figure and the CUDA graphs are prepared for. ``max_memory_bytes``: refuse
    (:class:`~model.errors.ModelMemoryError`) a model whose weights plus a call's peak at
    ``max_batch`` exceed it. ``cuda_graphs``: capture graphs on CUDA (off: eager on the stream).
    """

    name = "torch"

    def __init__(
        self,
        program: Program,
        device: str,
        *,
        precision: Precision | None = None,
        max_batch: int = 64,
        max_memory_bytes: int | None = None,
        cuda_graphs: bool = True,
        input_range: tuple[float, float] | None = None,
    ) -> None:
        self.program = program
        self.input_range = input_range
        self.device = torch.device(device)
        self.precision = precision or Precision.for_device(self.device)
        self.max_batch = max_batch
        self._held: list[torch.Tensor] = []
        self._steps = [self._prepare(op) for op in program.ops]
        self.weight_bytes = sum(t.element_size() * t.nelement() for t in self._held)
        self._runner = CudaRunner(self, graphs=cuda_graphs) if self.device.type == "cuda" else None
        self.call_bytes = self._measure_call_bytes(max_batch)
        if max_memory_bytes is not None and self.memory_bytes > max_memory_bytes:
            raise ModelMemoryError(
                f"model needs {self.memory_bytes} bytes on {self.device} ({self.weight_bytes} "
                f"of weights + {self.call_bytes} for a call of {max_batch} rows), over the "
                f"limit of {max_memory_bytes} bytes"
            )

    @property
    def memory_bytes(self) -> int:
        """Weights on the device plus the peak of one call at ``max_batch`` rows."""
        return self.weight_bytes + self.call_bytes

    def run(self, x: np.ndarray) -> np.ndarray:
        if self._runner is not None:
            return self._runner.run(x)
        with torch.inference_mode():
            return self.forward(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 (batch, *input_shape) on the device → logits float32 (batch, classes)."""
        if self.program.wiring is not None:
            steps = dict(zip(map(id, self.program.ops), self._steps, strict=True))
            value = run_wired(self.program, x, lambda op, v: steps[id(op)](v))
            return value.to(torch.float32)
        value = x
        for step in self._steps:
            value = step(value)
        return value.to(torch.float32)

    # --- memory -----------------------------------------------------------------------------------
    def _measure_call_bytes(self, batch: int) -> int:
        """Peak bytes a call of ``batch`` rows allocates beyond the weights: measured by the CUDA
        allocator on a GPU, else by tracking live tensors at batches 1 and 2 and extrapolating
        linearly (every activation is proportional to the batch)."""
        if self._runner is not None:
            return self._runner.peak_bytes(batch)
        held = {t.untyped_storage().data_ptr() for t in self._held}
        one, two = (peak_live_bytes(self.forward, self._zeros(b), held) for b in (1, 2))
        return max(one + (two - one) * (batch - 1), one)

    def _zeros(self, batch: int) -> torch.Tensor:
        return torch.zeros((batch, *self.program.input_shape), device=self.device)

    # --- preparation ------------------------------------------------------------------------------
    def _tensor(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """``array`` on the device as ``dtype`` (not counted: see :meth:`_hold`)."""
        tensor = torch.as_tensor(np.asarray(array)).to(device=self.device, dtype=dtype)
        return tensor.contiguous()

    def _hold(self, value: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A tensor a step keeps for the model's lifetime, counted in ``weight_bytes``."""
        if isinstance(value, torch.Tensor):
            tensor = value.to(device=self.device, dtype=dtype).contiguous()
        else:
            tensor = self._tensor(value, dtype)
        self._held.append(tensor)
        return tensor

    def _prepare(self, op: object) -> Step:
        return self._preparers()[type(op)](op)

    def _preparers(self) -> dict[type, Callable[..., Step]]:
        """{op class: the method that prepares its step}, one per kind of operation."""
        return {
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

    def _binary_dense(self, op: BinaryDense) -> Step:
        signs = dense_signs(op.weight, op.input)  # (O, K) ±1
        rows, epilogue = self._binary_epilogue(op, signs)
        matmul = self._binary_matmul(rows)

        def step(a: torch.Tensor) -> torch.Tensor:
            return epilogue(matmul(a.reshape(a.shape[0], -1)))

        return step

    def _binary_conv(self, op: BinaryConv) -> Step:
        (kh, kw), (ph, pw) = op.kernel, op.padding
        c = op.input.channels
        words = op.weight[:, : kh * kw * -(-c // 64)]
        signs = unpack_words(words.reshape(len(words), kh, kw, -1))[..., :c]  # (O, kh, kw, C)
        signs = np.ascontiguousarray(signs.transpose(0, 3, 1, 2))  # (O, C, kh, kw)
        kernel, epilogue = self._binary_epilogue(op, signs, spatial=True)
        conv = self._binary_conv2d(kernel, op.stride)
        pad_value = bit_value(bool(op.pad_words[0] & np.uint64(1)), op.input)
        pad = (pw, pw, ph, ph)

        def step(a: torch.Tensor) -> torch.Tensor:
            padded = F.pad(a, pad, value=pad_value) if ph or pw else a
            return epilogue(conv(padded))

        if op.residual:  # (bits, shortcut): the add as _real_add rounds it
            return lambda xs: step(xs[0]).to(torch.float32) + xs[1].to(torch.float32)
        return step

    def _binary_epilogue(self, op: BinaryDense | BinaryConv, signs: np.ndarray, spatial=False):
        """(weights with the per-channel sign folded in, epilogue on their float32 sum u)."""
        ep = op.epilogue
        if isinstance(ep, ToReal):
            return self._tensor(signs, self.precision.binary), self._to_real_step(ep)
        sigma, threshold = popcount_to_sum_domain(ep, op.input, op.features, op.pcw)
        rows = signs * sigma.reshape((-1,) + (1,) * (signs.ndim - 1))
        t = self._hold(threshold, torch.float32)
        shape = (1, -1, 1, 1) if spatial else (1, -1)
        t = t.view(shape)
        pools = [
            (pool.kernel, pool.stride, self._pool_flip(pool.and_words, len(threshold)))
            for pool in ep.pools
        ]
        one, zero = self._bit_values(ep.out)

        def epilogue(u: torch.Tensor) -> torch.Tensor:
            for kernel, stride, flip in pools:  # AND channels pool −u: min u = −max(−u)
                u = F.max_pool2d(u * flip, kernel, stride) * flip
            return torch.where(u >= t, one, zero)

        return self._tensor(rows, self.precision.binary), epilogue

    def _pool_flip(self, and_words: np.ndarray, channels: int) -> torch.Tensor:
        """(1, C, 1, 1): −1 for the channels the pool ANDs (their min is −max(−u)), else 1."""
        flip = unpack_words(and_words[None])[0, :channels]  # a set bit reads −1
        return self._hold(flip, torch.float32).view(1, -1, 1, 1)

    def _bit_values(self, bits: Bits) -> tuple[torch.Tensor, torch.Tensor]:
        """The activation values of a set and a clear bit, as 0-d tensors of the binary dtype."""
        one, zero = (np.array(bit_value(b, bits), np.float32) for b in (True, False))
        return self._hold(one, self.precision.binary), self._hold(zero, self.precision.binary)

    def _binary_matmul(self, rows: torch.Tensor) -> Step:
        """a (M, K) binary dtype → a·rowsᵀ (M, O) float32, exact (see the module docstring)."""
        o, k = rows.shape
        if rows.dtype != torch.float16 or k <= FP16_EXACT_TERMS:
            w_t = self._hold(rows.T, rows.dtype)
            return lambda a: torch.mm(a, w_t).to(torch.float32)
        chunks = -(-k // FP16_EXACT_TERMS)
        width = -(-k // chunks)
        padded = F.pad(rows, (0, chunks * width - k))  # zero terms add nothing
        w_c = self._hold(padded.reshape(o, chunks, width).permute(1, 2, 0), rows.dtype)
        extra = chunks * width - k  # (w_c: chunks, width, O)

        def matmul(a: torch.Tensor) -> torch.Tensor:
            a_c = (F.pad(a, (0, extra)) if extra else a).reshape(a.shape[0], chunks, width)
            return torch.bmm(a_c.transpose(0, 1), w_c).sum(0, dtype=torch.float32)

        return matmul

    def _binary_conv2d(self, kernel: torch.Tensor, stride: tuple[int, int]) -> Step:
        """a (N, C, H, W) binary dtype, padded → conv (N, O, OH, OW) float32, exact."""
        o, c, kh, kw = kernel.shape
        if kernel.dtype != torch.float16 or c * kh * kw <= FP16_EXACT_TERMS:
            kernel = self._hold(kernel, kernel.dtype)
            return lambda a: F.conv2d(a, kernel, stride=stride).to(torch.float32)
        # channel groups of ≤ 2048 terms: group g's outputs are the partial sums over its inputs
        groups = -(-c * kh * kw // FP16_EXACT_TERMS)
        while -(-c // groups) * kh * kw > FP16_EXACT_TERMS:
            groups += 1
        width = -(-c // groups)
        padded = F.pad(kernel, (0, 0, 0, 0, 0, groups * width - c))  # (O, G·width, kh, kw)
        grouped = padded.reshape(o, groups, width, kh, kw).transpose(0, 1)
        grouped = self._hold(grouped.reshape(groups * o, width, kh, kw), kernel.dtype)
        extra = groups * width - c

        def conv(a: torch.Tensor) -> torch.Tensor:
            if extra:
                a = F.pad(a, (0, 0, 0, 0, 0, extra))
            parts = F.conv2d(a, grouped, stride=stride, groups=groups)  # (N, G·O, OH, OW)
            n, _, oh, ow = parts.shape
            return parts.view(n, groups, o, oh, ow).sum(1, dtype=torch.float32)

        return conv

    # --- real-valued layers -----------------------------------------------------------------------
    def _planes_dense(self, op: PlanesDense) -> Step:
        """Integer model input × ±1: exact in float32 while K·max|x| < 2**24 (from the
        spec's value range, checked by the compiler's choice of this op), else ``real``."""
        signs = unpack_words(op.weight)[:, : op.features]
        w_t = self._hold(signs.T, self._planes_dtype(op.features))
        decide = self._real_epilogue(op.epilogue)

        def step(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(x.shape[0], -1)
            return decide((x.to(w_t.dtype) @ w_t).to(torch.float32))

        return step

    def _planes_dtype(self, features: int) -> torch.dtype:
        # the compiler plans bit-planes for integer inputs in [0, MAX_PLANE_VALUE] only
        high = MAX_PLANE_VALUE if self.input_range is None else self.input_range[1]
        exact = features * high < FP32_EXACT_TERMS
        return torch.float32 if exact else self.precision.real

    def _float_dense(self, op: FloatDense) -> Step:
        real = self.precision.real
        packed = op.weight.dtype == np.uint64
        rows = unpack_words(op.weight)[:, : op.features].T if packed else op.weight  # (F, O)
        w_t = self._hold(np.ascontiguousarray(rows, np.float32), real)
        bias = None if op.bias_in_raw is None else self._hold(op.bias_in_raw, real)
        finish = self._real_epilogue(op.epilogue)

        def step(x: torch.Tensor) -> torch.Tensor:
            raw = x.reshape(x.shape[0], -1).to(real) @ w_t
            if bias is not None:
                raw = raw + bias
            return finish(raw.to(torch.float32))

        return step

    def _signed_dense(self, op: SignedDense) -> Step:
        """raw = base + coef·Σ_{bit set} Wᵀ, as the CPU kernel sums (in ``real``)."""
        real = self.precision.real
        w_t = self._hold(logical_rows(op.weight_t, op.input), real)  # (F, O)
        base = self._hold(op.base, real)
        coef = float(op.coef)
        finish = self._real_epilogue(op.epilogue)
        set_value = bit_value(True, op.input)  # −1 (sign) or 1 (step): the value of a set bit

        def step(a: torch.Tensor) -> torch.Tensor:
            bits = (a.reshape(a.shape[0], -1) == set_value).to(real)
            return finish((base + coef * (bits @ w_t)).to(torch.float32))

        return step

    def _float_conv(self, op: FloatConv) -> Step:
        real = self.precision.real
        (kh, kw), (ph, pw) = op.kernel, op.padding
        c = op.in_shape[0]
        if op.weight.dtype == np.uint64:  # packed ±1 (O, kh, kw, Wc)
            kernel = unpack_words(op.weight)[..., :c].transpose(0, 3, 1, 2)
        else:  # (kh·kw·C, O) rows in (dy, dx, c) order
            kernel = op.weight.reshape(kh, kw, c, -1).transpose(3, 2, 0, 1)
        weight = self._hold(np.ascontiguousarray(kernel, np.float32), real)
        bias = (
            None if op.bias_in_raw is None else self._hold(op.bias_in_raw, real).view(1, -1, 1, 1)
        )
        pad, pad_value = (pw, pw, ph, ph), op.pad_value
        finish = self._real_epilogue(op.epilogue, spatial=True)

        def step(x: torch.Tensor) -> torch.Tensor:
            x = x.to(real)
            if ph or pw:
                x = F.pad(x, pad, value=pad_value)
            with full_precision_convolutions(x.device):
                raw = F.conv2d(x, weight, stride=op.stride)
            if bias is not None:
                raw = raw + bias
            return finish(raw.to(torch.float32))

        return step

    def _quantize(self, op: Quantize) -> Step:
        decide = self._decide_real(op.decide, spatial=len(op.decide.out.shape) == 3)

        def step(x: torch.Tensor) -> torch.Tensor:
            return decide(x if x.dim() == 4 else x.reshape(x.shape[0], -1))

        return step

    def _unpack(self, op: Unpack) -> Step:
        flatten = op.input.layout == "hwc"

        def step(a: torch.Tensor) -> torch.Tensor:
            return (a.reshape(a.shape[0], -1) if flatten else a).to(torch.float32)

        return step

    def _real_batch_norm(self, op: RealBatchNorm) -> Step:
        real = self.precision.real
        alpha, beta = self._hold(op.alpha, real), self._hold(op.beta, real)

        def step(x: torch.Tensor) -> torch.Tensor:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            # float64 on the CPU: the product is exact, one rounding each to float64 and float32
            return torch.addcmul(beta.view(shape), x.to(real), alpha.view(shape)).to(torch.float32)

        return step

    def _real_max_pool(self, op: RealMaxPool) -> Step:
        return lambda x: F.max_pool2d(x, op.kernel, op.stride)

    def _real_flatten(self, op: RealFlatten) -> Step:
        return lambda x: x.reshape(x.shape[0], -1)

    # --- v2 graph operations: float32, the eager model's own torch ops ----------------------------
    def _real_add(self, op: RealAdd) -> Step:
        def step(xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
            total = xs[0].to(torch.float32) + xs[1].to(torch.float32)
            for x in xs[2:]:
                total = total + x.to(torch.float32)
            return total

        return step

    def _real_concat(self, op: RealConcat) -> Step:
        return lambda xs: torch.cat([x.to(torch.float32) for x in xs], dim=1)

    def _real_avg_pool(self, op: RealAvgPool) -> Step:
        return lambda x: F.avg_pool2d(x.to(torch.float32), op.kernel, op.stride)

    def _real_global_avg_pool(self, op: RealGlobalAvgPool) -> Step:
        return lambda x: x.to(torch.float32).mean((2, 3))

    def _real_shift(self, op: RealShift) -> Step:
        shift = self._hold(op.shift, torch.float32)

        def step(x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.float32) + shift.view((1, -1) + (1,) * (x.dim() - 2))

        return step

    def _real_prelu(self, op: RealPReLU) -> Step:
        weight = self._hold(op.weight, torch.float32)
        return lambda x: F.prelu(x.to(torch.float32), weight)

    # --- epilogues of real-valued layers ----------------------------------------------------------
    def _real_epilogue(self, ep: Decide | ToReal, spatial: bool = False) -> Step:
        if isinstance(ep, Decide):
            return self._decide_real(ep, spatial)
        return self._to_real_step(ep)

    def _decide_real(self, ep: Decide, spatial: bool) -> Step:
        """raw float32 → values of (raw ≥ cut) XOR invert, then the pools (on the bits)."""
        shape = (1, -1, 1, 1) if spatial else (1, -1)
        cut = self._hold(ep.cut, self.precision.real).view(shape)
        invert = self._hold(ep.invert.astype(bool), torch.bool).view(shape)
        pools = [
            (pool.kernel, pool.stride, self._pool_flip(pool.and_words, len(ep.cut)))
            for pool in ep.pools
        ]
        one, zero = self._bit_values(ep.out)

        def decide(raw: torch.Tensor) -> torch.Tensor:
            bits = (raw.to(cut.dtype) >= cut) != invert
            if pools:  # OR = max of the 0/1 bits, AND = −max(−bits)
                u = bits.to(torch.float32)
                for kernel, stride, flip in pools:
                    u = F.max_pool2d(u * flip, kernel, stride) * flip
                bits = u > 0.5
            return torch.where(bits, one, zero)

        return decide

    def _to_real_step(self, ep: ToReal) -> Step:
        """acc → fl32(fl32(acc·scale) + bias), two roundings as the eager layer does."""
        affine = ep.affine
        shape = (1, -1, 1, 1) if len(ep.out.shape) == 3 else (1, -1)
        vectors = [] if affine is None else [affine.scale, affine.bias]
        scale, bias = (
            None if v is None else self._hold(v, torch.from_numpy(np.asarray(v)).dtype).view(shape)
            for v in (vectors or [None, None])
        )

        batchnorm = None
        if ep.batchnorm is not None:
            real = self.precision.real
            alpha = self._hold(ep.batchnorm.alpha, real).view(shape)
            batchnorm = (alpha, self._hold(ep.batchnorm.beta, real).view(shape))

        def to_real(raw: torch.Tensor) -> torch.Tensor:
            raw = raw.to(torch.float32)
            if scale is not None:
                raw = (raw * scale).to(torch.float32)
            if bias is not None:
                raw = (raw + bias).to(torch.float32)
            if batchnorm is not None:  # as _real_batch_norm: one rounding each in real, float32
                alpha, beta = batchnorm
                raw = torch.addcmul(beta, raw.to(alpha.dtype), alpha).to(torch.float32)
            return raw

        return to_real


# --- CUDA: streams, graphs, pinned staging -------------------------------------------------------
class CudaRunner:
    """Runs an executor's forward on its own stream, as a CUDA graph per batch bucket (the next
    power of two, up to MAX_GRAPH_BATCH, padded with zero rows) with pinned host staging. One
    lock per model: a graph's static buffers serve one call at a time. Only exercised on a GPU."""

    def __init__(self, executor: TorchExecutor, graphs: bool = True) -> None:
        self.executor = executor
        self.device = executor.device
        self.stream = torch.cuda.Stream(device=self.device)
        self.graphs_enabled = graphs
        self._graphs: dict[int, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self._lock = threading.Lock()
        torch.cuda.synchronize(self.device)  # the weights' copies, made on the default stream

    def run(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        bucket = batch_bucket(n)
        with self._lock, torch.inference_mode(), torch.cuda.stream(self.stream):
            if self.graphs_enabled and bucket <= MAX_GRAPH_BATCH:
                graph = self._graphs.get(bucket) or self._capture(bucket)
                return graph.replay(x, self.stream)
            staged = torch.from_numpy(np.ascontiguousarray(x)).pin_memory()
            out = self.executor.forward(staged.to(self.device, non_blocking=True))
            host = out.to("cpu", non_blocking=True)
            self.stream.synchronize()
            return host.numpy()

    def peak_bytes(self, batch: int) -> int:
        """Peak bytes the CUDA allocator held beyond the weights during a call of ``batch``."""
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.run(np.zeros((batch, *self.executor.program.input_shape), np.float32))
        torch.cuda.synchronize(self.device)
        return max(torch.cuda.max_memory_allocated(self.device) - base, 0)

    def _capture(self, bucket: int) -> _Graph:
        forward = self.executor.forward
        static_in = torch.zeros((bucket, *self.executor.program.input_shape), device=self.device)
        for _ in range(2):  # warm up on the side stream (cuDNN/cuBLAS choose their kernels)
            forward(static_in)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other models' threads keep using CUDA while this one captures
        capture = torch.cuda.graph(
            graph, pool=self._pool, stream=self.stream, capture_error_mode="thread_local"
        )
        with capture:
            static_out = forward(static_in)
        captured = _Graph(graph, static_in, static_out)
        self._graphs[bucket] = captured
        return captured


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor

    def __post_init__(self) -> None:
        self.host_in = torch.zeros(self.static_in.shape, pin_memory=True)
        self.host_out = torch.zeros(self.static_out.shape, pin_memory=True)

    def replay(self, x: np.ndarray, stream: torch.cuda.Stream) -> np.ndarray:
        n = x.shape[0]
        self.host_in[:n].numpy()[...] = x
        self.host_in[n:].zero_()
        self.static_in.copy_(self.host_in, non_blocking=True)
        self.graph.replay()
        self.host_out.copy_(self.static_out, non_blocking=True)
        stream.synchronize()
        return self.host_out[:n].numpy().copy()


def batch_bucket(n: int) -> int:
    """The batch a call of ``n`` rows runs as: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def full_precision_convolutions(device: torch.device) -> contextlib.AbstractContextManager:
    """Full-precision convolutions in float32 proper on CUDA: cuDNN would otherwise round their
    inputs to TF32 (10 mantissa bits). The flag is process-wide while set; every model sets the
    same value. A no-op on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled,
        benchmark=torch.backends.cudnn.benchmark,
        deterministic=torch.backends.cudnn.deterministic,
        allow_tf32=False,
    )


# --- helpers: bits and thresholds ----------------------------------------------------------------
def unpack_words(words: np.ndarray) -> np.ndarray:
    """(..., L) uint64 → (..., 64·L) float32 ±1 (bit set ⇔ −1), little-endian bits."""
    as_bytes = np.ascontiguousarray(words).view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")
    return 1 - 2 * bits.astype(np.float32)


def bit_value(bit: bool, bits: Bits) -> float:
    """The activation value a decision bit stands for: sign: 1 ⇔ −1; step: 1 ⇔ 1."""
    if bits.binarizer.kind == "sign":
        return -1.0 if bit else 1.0
    return 1.0 if bit else 0.0


def dense_signs(words: np.ndarray, bits: Bits) -> np.ndarray:
    """Packed dense weights in the input's word layout → (O, K) ±1 in the values' layout:
    flat (F,) or, for a flattened image ("hwc" words), (C, H, W) order."""
    signs = unpack_words(words)
    if bits.layout != "hwc":
        return np.ascontiguousarray(signs[:, : bits.features])
    c, h, w = bits.shape
    grid = signs[:, : h * w * -(-c // 64) * 64].reshape(len(words), h, w, -1)[..., :c]
    return np.ascontiguousarray(grid.transpose(0, 3, 1, 2).reshape(len(words), -1))


def logical_rows(weight_t: np.ndarray, bits: Bits) -> np.ndarray:
    """SignedDense's Wᵀ rows in the bits' word layout → rows in the values' layout (F, O)."""
    if bits.layout != "hwc":
        return np.ascontiguousarray(weight_t[: bits.features])
    c, h, w = bits.shape
    grid = weight_t[: h * w * -(-c // 64) * 64].reshape(h, w, -1, weight_t.shape[1])[:, :, :c]
    return np.ascontiguousarray(grid.transpose(2, 0, 1, 3).reshape(-1, weight_t.shape[1]))


def popcount_to_sum_domain(
    ep: Decide, bits: Bits, k: int, pcw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (σ, T) with bit = (σ·acc ≥ T) ⇔ (P ≥ cut) XOR invert (module docs);
    T clipped to [−K−1, K+1] (|acc| ≤ K), so float32 holds it exactly."""
    cut = ep.cut.astype(np.int64)
    if bits.binarizer.kind == "sign":
        sigma, threshold = -np.ones(len(cut)), 2 * cut - k
    else:
        sigma, threshold = np.ones(len(cut)), cut - pcw.astype(np.int64)
    invert = ep.invert.astype(bool)
    sigma = np.where(invert, -sigma, sigma)
    threshold = np.where(invert, 1 - threshold, threshold)
    return sigma.astype(np.float32), np.clip(threshold, -k - 1, k + 1).astype(np.float32)


# --- helpers: memory -----------------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages the ops under it create and that are still referenced."""

    def __init__(self, inputs: Iterable[torch.Tensor], ignored: set[int]) -> None:
        super().__init__()
        self.ignored = ignored  # storages not to count (the weights)
        self.live: dict[int, list[int]] = {}  # storage pointer → [bytes, referencing tensors]
        self.current = self.peak = 0
        for tensor in inputs:
            self._track(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.ignored:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]


def peak_live_bytes(forward: Step, x: torch.Tensor, ignored: AbstractSet[int] = frozenset()) -> int:
    """Peak bytes of tensors alive at once while ``forward(x)`` runs, the input included and
    the storages in ``ignored`` (the weights) left out."""
    with torch.inference_mode():
        mode = _LiveBytes([x], set(ignored))
        with mode:
            out = forward(x)
        del out
    return mode.peak
