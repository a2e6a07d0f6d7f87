"""The explicit-backward linear function: gradcheck in float64 and the formulas directly."""

from __future__ import annotations

import pytest
import torch

from training.functional import BinaryLinearFunction, linear


def _operands(bias: bool = True):
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    x, w, b = _operands(bias)
    assert torch.autograd.gradcheck(BinaryLinearFunction.apply, (x, w, b))


def test_forward_equals_torch_linear():
    x, w, b = _operands()
    assert torch.allclose(linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-12)


def test_backward_formulas():
    x, w, b = _operands()
    g = torch.randn(5, 3, dtype=torch.float64)
    linear(x, w, b).backward(g)
    assert torch.allclose(x.grad, g @ w.detach())  # grad_X = G·W
    assert torch.allclose(w.grad, g.t() @ x.detach())  # grad_W = Gᵀ·X
    assert torch.allclose(b.grad, g.sum(dim=0))  # grad_B = Σ_batch G


def test_only_requested_gradients_are_computed():
    x, w, b = _operands()
    x.requires_grad_(False)
    linear(x, w, b).sum().backward()
    assert x.grad is None and w.grad is not None and b.grad is not None


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x \(batch, 7\).*got x \[5, 6\]"):
        linear(torch.zeros(5, 6), torch.zeros(3, 7))


def test_linear_under_bf16_autocast_computes_in_bf16_and_trains():
    x = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(3, 6, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x.to(torch.bfloat16), weight, bias)  # mixed dtypes, as after a bf16 conv
    assert y.dtype == torch.bfloat16
    expected = x.to(torch.bfloat16) @ weight.to(torch.bfloat16).t() + bias.to(torch.bfloat16)
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()
