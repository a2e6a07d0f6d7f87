"""Binary layers: the spec's equation y = α ⊙ (q_in(x) ∗ q_k(W)) + b, padding with ±1, α,
latent clipping, parameter tagging, spec conversion, and configuration errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.errors import InvalidSpecError, UnknownQuantizerError
from model.packing import unpack_signs
from model.spec import Conv2d, Dense
from training.layers import (
    BinaryConv2d,
    BinaryLinear,
    binary_parameters,
    clip_latent_weights,
    is_binary_parameter,
)


def sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- dense ---------------------------------------------------------------------------------------
def test_binary_linear_computes_sign_x_times_sign_w_plus_bias():
    layer = BinaryLinear(70, 5, input_quantizer="ste_sign")
    with torch.no_grad():
        layer.bias.copy_(torch.arange(5.0))
    x = torch.randn(4, 70)
    expected = sign(x) @ sign(layer.weight).t() + layer.bias
    assert torch.equal(layer(x), expected)


def test_binary_linear_full_precision_input_by_default():
    layer = BinaryLinear(6, 3, bias=False)
    x = torch.randn(2, 6)
    assert torch.allclose(layer(x), x @ sign(layer.weight).t())
    assert layer.bias is None


def test_scale_is_mean_abs_latent_weight_per_output_channel():
    layer = BinaryLinear(4, 2, input_quantizer="ste_sign", scale=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.25, 0.0, 1.0], [-0.1, -0.1, -0.1, -0.1]]))
        layer.bias.copy_(torch.tensor([10.0, 20.0]))
    assert torch.allclose(layer.channel_scale(), torch.tensor([0.4375, 0.1]))
    x = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    # signs of row 0: + − + +  → 1 − 1 + 1 − 1 = 0; row 1: all − → −(1+1+1−1) = −2.
    assert torch.allclose(layer(x), torch.tensor([[0.0 * 0.4375 + 10.0, -2.0 * 0.1 + 20.0]]))


def test_ste_gradient_reaches_latent_weights_masked_by_clip():
    layer = BinaryLinear(3, 1, input_quantizer="ste_sign", bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.5, 1.0]]))
    x = torch.tensor([[2.0, -3.0, 0.5]])
    layer(x).sum().backward()
    # ∂L/∂W = gᵀ·sign(x) · 1{|W| ≤ 1}
    assert layer.weight.grad.tolist() == [[1.0, 0.0, 1.0]]


def test_stochastic_binary_input_is_the_hard_step_in_eval():
    layer = BinaryLinear(3, 1, input_quantizer="stochastic_binary", bias=False).eval()
    with torch.no_grad():
        layer.weight.fill_(0.3)
    assert layer(torch.tensor([[-1.0, 0.0, 2.0]])).item() == 1.0


# --- conv ----------------------------------------------------------------------------------------
def conv_with_positive_weights(pad_value: float, in_channels: int = 2) -> BinaryConv2d:
    layer = BinaryConv2d(
        in_channels, 1, pad_value=pad_value, input_quantizer="ste_sign", bias=False
    )
    with torch.no_grad():
        layer.weight.fill_(0.5)  # all +1 after sign
    return layer


@pytest.mark.parametrize("pad_value, corner, edge", [(1.0, 9, 9), (-1.0, 4 - 5, 6 - 3)])
def test_binary_conv_border_is_padded_with_pad_value(pad_value, corner, edge):
    layer = conv_with_positive_weights(pad_value)
    x = torch.full((1, 2, 4, 4), 0.7)  # quantizes to +1 everywhere inside
    y = layer(x)[0, 0]
    assert y[1, 1].item() == 2 * 9  # interior: 9 products of +1, 2 channels
    assert y[0, 0].item() == 2 * corner  # 4 inside, 5 padded
    assert y[0, 1].item() == 2 * edge  # 6 inside, 3 padded


def test_binary_conv_pads_the_quantized_input_not_with_zero():
    layer = conv_with_positive_weights(1.0, in_channels=1)
    x = torch.full((1, 1, 3, 3), -0.2)  # quantizes to −1 inside, border +1
    # corner: 4 inside (−1) + 5 padded (+1) = 1; a zero pad would give −4.
    assert layer(x)[0, 0, 0, 0].item() == 1.0


def test_binary_conv_matches_reference_convolution():
    layer = BinaryConv2d(3, 4, 3, stride=2, padding=1, input_quantizer="ste_sign", scale=True)
    x = torch.randn(2, 3, 7, 7)
    padded = F.pad(sign(x), (1, 1, 1, 1), value=1.0)
    alpha = layer.weight.abs().mean(dim=(1, 2, 3))
    expected = F.conv2d(padded, sign(layer.weight), stride=2) * alpha.view(1, -1, 1, 1)
    expected = expected + layer.bias.view(1, -1, 1, 1)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_full_precision_conv_zero_pads():
    layer = BinaryConv2d(1, 2, pad_value=0.0, kernel_quantizer=None)
    x = torch.randn(1, 1, 5, 5)
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize(
    "input_quantizer, pad_value",
    [("ste_sign", 0.0), ("ste_sign", 0.5), ("approx_sign", 2.0), ("stochastic_binary", -1.0)],
)
def test_pad_value_outside_the_input_quantizers_values_is_rejected(input_quantizer, pad_value):
    with pytest.raises(InvalidSpecError, match=f"pad_value={pad_value}.*{input_quantizer}"):
        BinaryConv2d(2, 2, pad_value=pad_value, input_quantizer=input_quantizer)


def test_allowed_pad_values():
    BinaryConv2d(2, 2, pad_value=-1.0, input_quantizer="swish_sign")
    BinaryConv2d(2, 2, pad_value=0.0, input_quantizer="stochastic_binary")
    BinaryConv2d(2, 2, pad_value=0.0, input_quantizer=None)
    BinaryConv2d(2, 2, padding=0, pad_value=0.0, input_quantizer="ste_sign")  # never used


def test_nonfinite_pad_value_is_rejected():
    with pytest.raises(InvalidSpecError, match="finite"):
        BinaryConv2d(2, 2, pad_value=float("nan"))


# --- configuration errors ------------------------------------------------------------------------
def test_stochastic_binary_kernel_quantizer_is_rejected():
    with pytest.raises(InvalidSpecError, match="stochastic_binary"):
        BinaryLinear(4, 2, kernel_quantizer="stochastic_binary")
    with pytest.raises(InvalidSpecError, match="stochastic_binary"):
        BinaryConv2d(4, 2, kernel_quantizer="stochastic_binary")


def test_unknown_quantizer_is_rejected():
    with pytest.raises(UnknownQuantizerError, match="'htanh'"):
        BinaryLinear(4, 2, input_quantizer="htanh")
    with pytest.raises(UnknownQuantizerError, match="'sign'"):
        BinaryConv2d(4, 2, kernel_quantizer="sign")


def test_bad_kernel_size_is_rejected():
    with pytest.raises(ValueError, match="kernel_size must be an int ≥ 1.*got 0"):
        BinaryConv2d(4, 2, kernel_size=0)


# --- what the optimizer and the loop use ---------------------------------------------------------
def small_net() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        BinaryConv2d(1, 3, kernel_quantizer=None, pad_value=0.0),
        BinaryConv2d(3, 3, input_quantizer="ste_sign"),
        torch.nn.Flatten(),
        BinaryLinear(3 * 16, 4, input_quantizer="ste_sign"),
        BinaryLinear(4, 2, kernel_quantizer=None),
    )


def test_binary_parameters_are_the_binarized_latent_weights_only():
    net = small_net()
    assert [id(p) for p in binary_parameters(net)] == [id(net[1].weight), id(net[3].weight)]
    assert not is_binary_parameter(net[0].weight)
    assert not is_binary_parameter(net[1].bias)
    # The tag survives a deepcopy (the loop may keep the best epoch's model).
    assert len(binary_parameters(copy.deepcopy(net))) == 2


def test_clip_latent_weights_clamps_binary_weights_only():
    net = small_net()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(100.0)
    fp_before = net[0].weight.clone()
    bias_before = net[3].bias.clone()
    clip_latent_weights(net)
    for p in binary_parameters(net):
        assert p.abs().max().item() == 1.0
    assert torch.equal(net[0].weight, fp_before)
    assert torch.equal(net[3].bias, bias_before)


# --- spec and export tensors ---------------------------------------------------------------------
def test_linear_to_spec_and_back():
    layer = BinaryLinear(65, 3, input_quantizer="approx_sign", scale=True, bias=False)
    spec = layer.to_spec("dense7")
    assert spec == Dense(
        name="dense7", in_features=65, out_features=3, input_quantizer="approx_sign",
        kernel_quantizer="ste_sign", bias=False, scale=True,
    )  # fmt: skip
    assert BinaryLinear.from_spec(spec).to_spec("dense7") == spec


def test_conv_to_spec_and_back():
    layer = BinaryConv2d(3, 8, (3, 5), stride=(1, 2), padding=(1, 2), pad_value=-1.0,
                         input_quantizer="clipped_ste", kernel_quantizer="swish_sign")  # fmt: skip
    spec = layer.to_spec("conv2")
    assert isinstance(spec, Conv2d)
    assert (spec.kernel_size, spec.stride, spec.padding) == ((3, 5), (1, 2), (1, 2))
    assert (spec.pad_value, spec.input_quantizer, spec.kernel_quantizer) == (
        -1.0, "clipped_ste", "swish_sign",
    )  # fmt: skip
    assert BinaryConv2d.from_spec(spec).to_spec("conv2") == spec


def test_export_tensors_pack_signs_with_zero_as_plus_one():
    layer = BinaryConv2d(70, 2, scale=True, input_quantizer="ste_sign")
    with torch.no_grad():
        layer.weight[0, 5] = 0.0
        layer.weight[1, 6] = -0.0
    tensors = layer.export_tensors("conv1")
    assert (
        tensors["conv1.weight"].shape == (2, 3, 3, 2) and tensors["conv1.weight"].dtype == np.uint64
    )
    signs = unpack_signs(tensors["conv1.weight"], 70, axis=1)
    assert np.array_equal(signs, sign(layer.weight).detach().numpy())
    assert (signs[0, 5] == 1.0).all() and (signs[1, 6] == 1.0).all()
    assert tensors["conv1.scale"].dtype == np.float32
    assert np.array_equal(tensors["conv1.scale"], layer.channel_scale().detach().numpy())


def test_loaded_tensors_freeze_scale():
    layer = BinaryLinear(10, 3, input_quantizer="ste_sign", scale=True)
    rebuilt = BinaryLinear(10, 3, input_quantizer="ste_sign", scale=True)
    rebuilt.load_exported_tensors("d", layer.export_tensors("d"))
    assert set(rebuilt.weight.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(rebuilt.channel_scale(), layer.channel_scale().detach())
    x = torch.randn(5, 10)
    assert torch.equal(rebuilt(x), layer(x))
