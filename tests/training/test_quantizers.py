"""Quantizers: forward values (sign(0) = +1), each backward against its formula in numpy, the
registry, and mode handling of stochastic_binary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.errors import InvalidSpecError, UnknownQuantizerError
from model.quantizers import INFERENCE_BINARIZERS
from training.quantizers import (
    QUANTIZERS,
    Quantizer,
    approx_sign,
    check_kernel_quantizer,
    clipped_ste,
    get_quantizer,
    make_quantizer,
    quantizer_values,
    ste_sign,
    stochastic_binary,
    swish_sign,
)

SIGN_FAMILY = ("ste_sign", "clipped_ste", "approx_sign", "swish_sign")
# Points on both sides of every kink: 0, ±clip, ±1, and far outside.
X = np.array([-3.0, -1.5, -1.0, -0.999, -0.5, -1e-3, 0.0, 1e-3, 0.3, 0.999, 1.0, 1.0001, 2.5])


def backward_of(function, x: np.ndarray, grad: np.ndarray, **params) -> np.ndarray:
    """∂L/∂x of ``function`` for upstream gradient ``grad`` (float64)."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    function(xt, **params).backward(torch.tensor(grad, dtype=torch.float64))
    return xt.grad.numpy()


@pytest.fixture
def upstream() -> np.ndarray:
    # Values beyond ±1 so that clipping the gradient's value is visible.
    return np.linspace(-2.5, 2.5, X.size)


def test_registry_names_equal_the_model_packages_names():
    assert set(QUANTIZERS) == set(INFERENCE_BINARIZERS)


@pytest.mark.parametrize("name", SIGN_FAMILY)
def test_sign_family_maps_zero_to_plus_one(name):
    q = get_quantizer(name)(torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, 7.0]))
    assert q.tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("name", SIGN_FAMILY)
def test_sign_family_keeps_dtype_and_shape(name):
    x = torch.randn(3, 4, dtype=torch.float64)
    q = get_quantizer(name)(x)
    assert q.dtype == torch.float64 and q.shape == (3, 4)
    assert set(q.unique().tolist()) <= {-1.0, 1.0}


def test_ste_sign_backward_masks_by_clip(upstream):
    assert np.array_equal(backward_of(ste_sign, X, upstream), upstream * (np.abs(X) <= 1.0))


def test_ste_sign_backward_uses_clip_value(upstream):
    got = backward_of(ste_sign, X, upstream, clip_value=0.5)
    assert np.array_equal(got, upstream * (np.abs(X) <= 0.5))


def test_clipped_ste_backward_clips_the_gradient_not_the_input(upstream):
    got = backward_of(clipped_ste, X, upstream)
    assert np.array_equal(got, np.clip(upstream, -1.0, 1.0))
    # Unlike ste_sign, a gradient flows at |x| = 3.
    assert got[0] != 0.0


def test_approx_sign_backward(upstream):
    expected = upstream * np.where(np.abs(X) <= 1.0, 2.0 - 2.0 * np.abs(X), 0.0)
    np.testing.assert_allclose(backward_of(approx_sign, X, upstream), expected, rtol=1e-12)
    assert backward_of(approx_sign, np.array([0.0]), np.array([1.0]))[0] == 2.0


@pytest.mark.parametrize("beta", [5.0, 1.0])
def test_swish_sign_backward(upstream, beta):
    bx = beta * X
    expected = upstream * beta * (2.0 - bx * np.tanh(bx / 2.0)) / (1.0 + np.cosh(bx))
    got = backward_of(swish_sign, X, upstream, beta=beta)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300)


def test_swish_sign_backward_at_zero_is_beta():
    # β(2 − 0)/(1 + 1) = β.
    assert backward_of(swish_sign, np.array([0.0]), np.array([1.0]))[0] == 5.0


def test_swish_sign_backward_is_finite_where_cosh_overflows():
    grad = backward_of(swish_sign, np.array([-500.0, 500.0]), np.array([1.0, 1.0]))
    assert np.array_equal(grad, [0.0, 0.0])


def test_stochastic_binary_eval_is_the_hard_step():
    x = torch.tensor([-1.0, 0.0, 1e-6, 3.0])
    for _ in range(20):
        assert stochastic_binary(x, training=False).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_stochastic_binary_training_draws_step_or_sigmoid():
    x = torch.tensor([-1.0, 0.0, 2.0])
    torch.manual_seed(0)
    outputs = {tuple(stochastic_binary(x).tolist()) for _ in range(200)}
    step = (0.0, 0.0, 1.0)
    sigmoid = tuple(torch.sigmoid(x).tolist())
    assert outputs == {step, sigmoid}


@pytest.mark.parametrize("p, expected", [(1.0, (0.0, 0.0, 1.0)), (0.0, None)])
def test_stochastic_binary_probability_extremes(p, expected):
    x = torch.tensor([-1.0, 0.0, 2.0])
    out = tuple(stochastic_binary(x, p=p).tolist())
    assert out == (expected or tuple(torch.sigmoid(x).tolist()))


@pytest.mark.parametrize("p", [1.0, 0.0])
@pytest.mark.parametrize("training", [True, False])
def test_stochastic_binary_backward_is_always_the_sigmoids_gradient(upstream, p, training):
    s = 1.0 / (1.0 + np.exp(-X))
    got = backward_of(stochastic_binary, X, upstream, p=p, training=training)
    np.testing.assert_allclose(got, upstream * s * (1.0 - s), rtol=1e-12)


def test_quantizer_module_follows_train_and_eval():
    q = Quantizer("stochastic_binary", p=0.0)  # training: always the sigmoid
    x = torch.tensor([-1.0, 2.0])
    assert torch.allclose(q(x), torch.sigmoid(x))
    assert q.eval()(x).tolist() == [0.0, 1.0]


def test_quantizer_module_passes_params():
    x = torch.tensor([0.7], requires_grad=True)
    Quantizer("ste_sign", clip_value=0.5)(x).sum().backward()
    assert x.grad.item() == 0.0


def test_make_quantizer_none_is_identity():
    x = torch.tensor([0.3, -2.0])
    assert torch.equal(make_quantizer(None)(x), x)


def test_unknown_quantizer_names_the_known_ones():
    with pytest.raises(UnknownQuantizerError, match="'sgn'.*approx_sign, clipped_ste"):
        get_quantizer("sgn")


def test_stochastic_binary_is_rejected_as_kernel_quantizer():
    with pytest.raises(InvalidSpecError, match="stochastic_binary.*±1"):
        check_kernel_quantizer("stochastic_binary", "dense1")
    for name in SIGN_FAMILY:
        check_kernel_quantizer(name, "dense1")


def test_quantizer_values():
    assert quantizer_values("ste_sign") == (-1.0, 1.0)
    assert quantizer_values("stochastic_binary") == (0.0, 1.0)
