"""A linear map with an explicit, true backward: Y = X·Wᵀ + B.

Unlike the quantizers (gradient *estimators*), this is the exact gradient of its forward, so
``torch.autograd.gradcheck`` verifies it in float64. :class:`training.layers.BinaryLinear`
applies it to the quantized input and weights. Exported to ONNX (``dynamo=False``), it is one
``Gemm(X, W, B, transB=1)`` node.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class BinaryLinearFunction(torch.autograd.Function):
    """Y = X·Wᵀ + B for X (batch, in), W (out, in), B (out,) or None.

    Backward: ∂L/∂X = G·W, ∂L/∂W = Gᵀ·X, ∂L/∂B = Σ_batch G, with G = ∂L/∂Y (batch, out).
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = x.mm(weight.t())  # (batch, out)
        return out if bias is None else out + bias

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, bias: Any) -> Any:
        """ONNX export: Y = Gemm(X, W, B) = X·Wᵀ + B (``transB=1``; no C input without a bias)."""
        no_bias = bias is None or bias.node().mustBeNone()
        operands = (x, weight) if no_bias else (x, weight, bias)
        return g.op("Gemm", *operands, transB_i=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad.mm(weight) if need_x else None  # (batch, in)
        grad_w = grad.t().mm(x) if need_w else None  # (out, in)
        grad_b = grad.sum(dim=0) if ctx.has_bias and need_b else None  # (out,)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Y = X·Wᵀ + B with :class:`BinaryLinearFunction`'s explicit backward; X must be 2-D.

    Under ``torch.autocast`` the operands are cast to its dtype first (as ``F.linear`` would
    be): autocast does not reach the ``mm`` inside a custom autograd Function."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear: expected x (batch, {weight.shape[-1]}) and weight (out, in), "
            f"got x {list(x.shape)} and weight {list(weight.shape)}"
        )
    device = x.device.type
    if torch.is_autocast_enabled(device):  # autocast does not reach into a custom Function
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return BinaryLinearFunction.apply(x, weight, bias)
