"""The torch backend: the same compiled program on a torch device (CUDA, or CPU for CI).

Weights stay packed on the device (int64 words, the bit patterns of the uint64 ones) and are
unpacked per layer per call into {0, 1} bit matrices. A binary layer computes the popcount the
CPU kernels use, exactly, with a float32 matrix product of 0/1 values:

    P = popcount(a XOR w) = Σa + Σw − 2·(a·w)         (a, w ∈ {0, 1}; exact below 2**24)

then the same folded thresholds and bit-pools, and packs its decisions into words again, so
both backends agree bit for bit. The 0/1 operands are exact even in TF32 (which only shortens
input mantissas) and the float32 accumulation is exact below 2**24, so no global precision
setting can change a decision. Real-valued layers (first layer, full-precision output layer)
run in float64 like the CPU backend; binary convolutions run as unfold + matmul.

This is the only module of ``model`` that imports torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.engine.program import (
    BinaryConv,
    BinaryDense,
    Bits,
    Decide,
    FloatConv,
    FloatDense,
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
from model.errors import DeviceUnavailableError
from model.packing import words_for


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


class TorchExecutor:
    """Runs a program with torch on ``device``; ``run`` is thread-safe."""

    name = "torch"

    def __init__(self, program: Program, device: str) -> None:
        self.program = program
        self.device = torch.device(device)
        self._shifts = torch.arange(64, dtype=torch.int64, device=self.device)
        self._tensors: dict[int, torch.Tensor] = {}
        self._nbytes = 0
        self._handlers = handlers(self)
        for op in program.ops:  # move every array to the device once
            self._register(op)

    @property
    def memory_bytes(self) -> int:
        return self._nbytes

    def run(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            value = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
            for op in self.program.ops:
                value = self._handlers[type(op)](op, value)
            return value.to(torch.float32).cpu().numpy()

    # --- device arrays ----------------------------------------------------------------------------
    def _register(self, value: object) -> None:
        if isinstance(value, np.ndarray):
            if id(value) not in self._tensors:
                array = value.view(np.int64) if value.dtype == np.uint64 else value
                tensor = torch.from_numpy(np.array(array, copy=True)).to(self.device)
                self._tensors[id(value)] = tensor
                self._nbytes += tensor.element_size() * tensor.nelement()
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                self._register(getattr(value, name))
        elif isinstance(value, tuple):
            for item in value:
                self._register(item)

    def _t(self, array: np.ndarray) -> torch.Tensor:
        return self._tensors[id(array)]

    # --- bit helpers ------------------------------------------------------------------------------
    def _unpack(self, op: Unpack, words: torch.Tensor) -> torch.Tensor:
        return self._values(words, op.input)

    def _bits(self, words: torch.Tensor) -> torch.Tensor:
        """(..., L) int64 words → (..., 64·L) float32 bits in {0, 1}."""
        bits = (words.unsqueeze(-1) >> self._shifts) & 1
        return bits.reshape(*words.shape[:-1], -1).to(torch.float32)

    def _pack(self, bits: torch.Tensor) -> torch.Tensor:
        """(..., C) bool → (..., ⌈C/64⌉) int64 words (little-endian bits)."""
        c = bits.shape[-1]
        padded = F.pad(bits.to(torch.int64), (0, words_for(c) * 64 - c))
        grouped = padded.reshape(*bits.shape[:-1], -1, 64)
        return (grouped << self._shifts).sum(dim=-1)

    def _values(self, words: torch.Tensor, bits: Bits) -> torch.Tensor:
        """Packed decisions → float32 ±1 / {0, 1} in the spec's layout."""
        n = words.shape[0]
        if bits.layout == "flat":
            b = self._bits(words)[:, : bits.features]
        else:
            c, h, w = bits.shape
            b = self._bits(words.reshape(n, h, w, -1))[..., :c].permute(0, 3, 1, 2)
            if bits.layout == "hwc":
                b = b.reshape(n, -1)
        return 1 - 2 * b if bits.binarizer.kind == "sign" else b

    def _decide(self, ep: Decide, raw: torch.Tensor) -> torch.Tensor:
        """raw (..., C) → bool decisions (..., C): (raw ≥ cut) XOR invert."""
        cut = self._t(ep.cut)
        if cut.dtype == torch.float64:
            raw = raw.to(torch.float64)
        return (raw >= cut) ^ self._t(ep.invert).to(torch.bool)

    def _pool_decisions(self, ep: Decide, bits: torch.Tensor) -> torch.Tensor:
        """bits (N, C, H, W) bool → pooled, AND where the pool's mask is set, else OR."""
        for pool in ep.pools:
            c = bits.shape[1]
            mask = self._bits(self._t(pool.and_words))[:c].to(torch.bool).view(1, c, 1, 1)
            as_float = bits.to(torch.float32)
            any_set = F.max_pool2d(as_float, pool.kernel, pool.stride)
            all_set = -F.max_pool2d(-as_float, pool.kernel, pool.stride)
            bits = torch.where(mask, all_set, any_set) > 0.5
        return bits

    # --- binary layers ----------------------------------------------------------------------------
    def _popcounts(self, a_bits: torch.Tensor, op: BinaryDense | BinaryConv, w_bits: torch.Tensor):
        """P = Σa + Σw − 2 a·w for a (M, L·64) and w (O, L·64) bits → (M, O) float32, exact."""
        pcw = self._t(op.pcw).to(torch.float32)
        return a_bits.sum(dim=1, keepdim=True) + pcw - 2 * (a_bits @ w_bits.T)

    def _binary_epilogue(self, op: BinaryDense | BinaryConv, p: torch.Tensor):
        ep = op.epilogue
        if isinstance(ep, Decide):
            return self._decide(ep, p.to(torch.int64))
        if op.input.binarizer.kind == "sign":
            acc = op.features - 2 * p
        else:
            acc = p - self._t(op.pcw).to(torch.float32)
        return self._to_real(ep, acc.to(torch.float32))

    def _binary_dense(self, op: BinaryDense, words: torch.Tensor) -> torch.Tensor:
        a = self._bits(words.reshape(words.shape[0], -1))
        out = self._binary_epilogue(op, self._popcounts(a, op, self._bits(self._t(op.weight))))
        return self._pack(out) if isinstance(op.epilogue, Decide) else out

    def _binary_conv(self, op: BinaryConv, words: torch.Tensor) -> torch.Tensor:
        n, h, w, wc = words.shape
        (kh, kw), (ph, pw) = op.kernel, op.padding
        oh, ow = op.out_hw
        x = self._bits(words).permute(0, 3, 1, 2)  # (N, 64·Wc, H, W)
        pad = self._bits(self._t(op.pad_words)).view(1, -1, 1, 1)
        padded = pad.expand(n, -1, h + 2 * ph, w + 2 * pw).clone()
        padded[:, :, ph : ph + h, pw : pw + w] = x
        cols = F.unfold(padded, (kh, kw), stride=op.stride)  # (N, 64·Wc·kh·kw, OH·OW), (c, dy, dx)
        a = cols.transpose(1, 2).reshape(n * oh * ow, -1)
        words = self._t(op.weight)[:, : kh * kw * wc]  # drop the kernels' zero padding
        weight = self._bits(words.reshape(-1, kh, kw, wc))  # (O, kh, kw, 64·Wc)
        w_bits = weight.permute(0, 3, 1, 2).reshape(weight.shape[0], -1)
        out = self._binary_epilogue(op, self._popcounts(a, op, w_bits))  # (N·OH·OW, O)
        out = out.reshape(n, oh, ow, -1)
        if isinstance(op.epilogue, ToReal):
            return out.permute(0, 3, 1, 2)
        return self._packed_nhwc(op.epilogue, out)

    def _packed_nhwc(self, ep: Decide, decisions: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) bool decisions → pools → (N, H', W', Wc) words."""
        pooled = self._pool_decisions(ep, decisions.permute(0, 3, 1, 2))
        return self._pack(pooled.permute(0, 2, 3, 1))

    # --- real-valued layers -----------------------------------------------------------------------
    def _planes_dense(self, op: PlanesDense, x: torch.Tensor) -> torch.Tensor:
        # Integer inputs are exact in float64 products and sums; others as exact as float64.
        x = x.reshape(x.shape[0], -1)
        raw = self._packed_matmul(x, op.weight, op.features).to(torch.float32)
        return self._decide_or_real(op.epilogue, raw)

    def _float_dense(self, op: FloatDense, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if op.weight.dtype == np.uint64:
            raw64 = self._packed_matmul(x, op.weight, op.features)
        else:
            raw64 = x.to(torch.float64) @ self._t(op.weight).to(torch.float64).T
        if op.bias_in_raw is not None:
            raw64 = raw64 + self._t(op.bias_in_raw).to(torch.float64)
        return self._decide_or_real(op.epilogue, raw64.to(torch.float32))

    def _signed_dense(self, op: SignedDense, words: torch.Tensor) -> torch.Tensor:
        bits = self._bits(words.reshape(words.shape[0], -1)).to(torch.float64)
        values = 1 - 2 * bits if op.input.binarizer.kind == "sign" else bits
        # padding bits read as +1 (sign) but meet zero rows of weight_t
        raw64 = values @ self._t(op.weight_t).to(torch.float64)
        return self._decide_or_real(op.epilogue, raw64.to(torch.float32))

    def _float_conv(self, op: FloatConv, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        (kh, kw), (ph, pw) = op.kernel, op.padding
        oh, ow = op.out_hw
        c = op.in_shape[0]
        padded = F.pad(x.to(torch.float64), (pw, pw, ph, ph), value=op.pad_value)
        cols = F.unfold(padded, (kh, kw), stride=op.stride)  # (N, C·kh·kw, L) in (c, dy, dx)
        a = cols.transpose(1, 2).reshape(n * oh * ow, -1)
        if op.weight.dtype == np.uint64:  # packed ±1 (O, kh, kw, Wc), unpacked for this call
            bits = self._bits(self._t(op.weight))[..., :c].to(torch.float64)
            w = (1 - 2 * bits).permute(0, 3, 1, 2).reshape(bits.shape[0], -1)
        else:  # float32 (kh·kw·C, O) rows in (dy, dx, c) order → unfold's (c, dy, dx)
            w = self._t(op.weight).to(torch.float64).reshape(kh, kw, c, -1)
            w = w.permute(3, 2, 0, 1).reshape(w.shape[-1], -1)
        raw64 = a @ w.T
        if op.bias_in_raw is not None:
            raw64 = raw64 + self._t(op.bias_in_raw).to(torch.float64)
        raw = raw64.to(torch.float32).reshape(n, oh, ow, -1)
        ep = op.epilogue
        if isinstance(ep, ToReal):
            return self._to_real(ep, raw).permute(0, 3, 1, 2)
        return self._packed_nhwc(ep, self._decide(ep, raw))

    def _packed_matmul(self, x: torch.Tensor, weight: np.ndarray, features: int) -> torch.Tensor:
        signs = 1 - 2 * self._bits(self._t(weight))[:, :features].to(torch.float64)
        return x.to(torch.float64) @ signs.T

    def _quantize(self, op: Quantize, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return self._pack(self._decide(op.decide, x.permute(0, 2, 3, 1)))
        return self._pack(self._decide(op.decide, x.reshape(x.shape[0], -1)))

    def _real_batch_norm(self, op: RealBatchNorm, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        alpha = self._t(op.alpha).to(torch.float64).view(shape)
        beta = self._t(op.beta).to(torch.float64).view(shape)
        return (x.to(torch.float64) * alpha + beta).to(torch.float32)

    def _real_max_pool(self, op: RealMaxPool, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, op.kernel, op.stride)

    def _real_flatten(self, op: RealFlatten, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    def _decide_or_real(self, ep: Decide | ToReal, raw: torch.Tensor) -> torch.Tensor:
        if isinstance(ep, Decide):
            return self._pack(self._decide(ep, raw))
        return self._to_real(ep, raw)

    def _to_real(self, ep: ToReal, raw: torch.Tensor) -> torch.Tensor:
        if ep.affine is None:
            return raw
        if ep.affine.scale is not None:
            raw = raw * self._t(ep.affine.scale)
        if ep.affine.bias is not None:
            raw = raw + self._t(ep.affine.bias)
        return raw
