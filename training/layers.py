"""Binary dense and convolution layers with latent float weights.

Both compute what :mod:`model.spec` specifies for an artifact's ``dense`` / ``conv2d`` layer::

    y = scale ⊙ (q_in(x) ∗ q_k(W)) + bias

``q_in`` and ``q_k`` are named quantizers (None = identity, i.e. full precision), ``W`` is the
latent float weight the optimizer updates, and ``scale`` (when enabled) is XNOR-Net's
per-output-channel α = mean|W| over the channel's (in, kh, kw) weights, computed from the latent
weights (Rastegari et al. 2016). A convolution quantizes its input first, then pads it with
``pad_value`` and convolves without padding: a binary input is padded with +1 or −1 (a value of
its quantizer, never 0), so every binary operand is exactly ±1 as in inference.

Binary latent weights are :class:`LatentWeight` parameters: optimizers such as Bop find them
with :func:`binary_parameters` / :func:`is_binary_parameter`, and the training loop calls
:func:`clip_latent_weights` after every step to keep them in [−1, 1], where the STE passes
gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.errors import InvalidSpecError
from model.packing import pack_signs, unpack_signs
from model.spec import Conv2d, Dense, Layer
from training.functional import linear
from training.quantizers import check_kernel_quantizer, make_quantizer, quantizer_values

IntPair = int | tuple[int, int]


class LatentWeight(nn.Parameter):
    """A latent float weight whose forward value is binarized by a kernel quantizer."""


class QuantizedLayer(nn.Module):
    """What dense and conv layers share: quantizers, latent weight, bias and α.

    Subclasses give the weight's shape and implement ``_transform(x_q, w_q, bias)``, the
    product ``∗`` (plus ``bias`` when given).
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        *,
        input_quantizer: str | None,
        kernel_quantizer: str | None,
        bias: bool,
        scale: bool,
    ) -> None:
        super().__init__()
        if kernel_quantizer is not None:
            check_kernel_quantizer(kernel_quantizer, type(self).__name__)
        self.input_quantizer_name = input_quantizer
        self.kernel_quantizer_name = kernel_quantizer
        self.input_quantizer = make_quantizer(input_quantizer)
        self.kernel_quantizer = make_quantizer(kernel_quantizer)
        self.scale = scale
        weight_class = nn.Parameter if kernel_quantizer is None else LatentWeight
        self.weight = weight_class(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        # Set when rebuilt from an artifact: α as stored, not recomputed from ±1 weights.
        self.register_buffer("frozen_scale", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(−1/√fan_in, 1/√fan_in), as torch's Linear and Conv2d: small latent weights, so
        their signs can still flip early in training."""
        bound = 1.0 / math.sqrt(math.prod(self.weight.shape[1:]))
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def is_binary(self) -> bool:
        return self.kernel_quantizer_name is not None

    def quantized_weight(self) -> Tensor:
        """q_k(W): ±1 for a binary layer, the latent weight itself for full precision."""
        return self.kernel_quantizer(self.weight)

    def channel_scale(self) -> Tensor:
        """α per output channel: mean|W_latent| over all but the output axis, shape (out,)."""
        if self.frozen_scale is not None:
            return self.frozen_scale
        return self.weight.abs().mean(dim=tuple(range(1, self.weight.dim())))

    def forward(self, x: Tensor) -> Tensor:
        x_q, w_q = self.input_quantizer(x), self.quantized_weight()
        if not self.scale:
            return self._transform(x_q, w_q, self.bias)
        y = self._transform(x_q, w_q, None) * _per_channel(self.channel_scale(), x.dim())
        return y if self.bias is None else y + _per_channel(self.bias, x.dim())

    def _transform(self, x_q: Tensor, w_q: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    # --- artifact ----------------------------------------------------------------------------
    def to_spec(self, name: str) -> Layer:
        raise NotImplementedError

    def _spec_options(self) -> dict[str, Any]:
        """The spec fields dense and conv share."""
        return {
            "input_quantizer": self.input_quantizer_name,
            "kernel_quantizer": self.kernel_quantizer_name,
            "bias": self.bias is not None,
            "scale": self.scale,
        }

    def export_tensors(self, name: str) -> dict[str, np.ndarray]:
        """The artifact tensors ``<name>.weight/.bias/.scale``: a binary weight as packed signs
        of the latent weight (sign(0) = +1) along the input axis, everything else float32."""
        with torch.no_grad():
            if self.is_binary:
                signs = self.quantized_weight().cpu().numpy()  # ±1, never 0 or −0.0
                tensors = {f"{name}.weight": pack_signs(signs, axis=1)}
            else:
                tensors = {f"{name}.weight": _float32(self.weight)}
            if self.bias is not None:
                tensors[f"{name}.bias"] = _float32(self.bias)
            if self.scale:
                tensors[f"{name}.scale"] = _float32(self.channel_scale())
        return tensors

    def load_exported_tensors(self, name: str, tensors: Mapping[str, np.ndarray]) -> None:
        """Inverse of :meth:`export_tensors`: binary weights become ±1.0, α is frozen."""
        stored = tensors[f"{name}.weight"]
        if self.is_binary:
            stored = unpack_signs(stored, self.weight.shape[1], axis=1)
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(np.array(stored, dtype=np.float32)))
            if self.bias is not None:
                self.bias.copy_(torch.from_numpy(np.array(tensors[f"{name}.bias"])))
        if self.scale:
            self.frozen_scale = torch.from_numpy(np.array(tensors[f"{name}.scale"]))


class BinaryLinear(QuantizedLayer):
    """Dense layer y = α ⊙ (q_in(x) · q_k(W)ᵀ) + b on (batch, in_features) inputs, through
    :func:`training.functional.linear`. Defaults: full-precision input, ``ste_sign`` weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        input_quantizer: str | None = None,
        kernel_quantizer: str | None = "ste_sign",
        bias: bool = True,
        scale: bool = False,
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        super().__init__(
            (out_features, in_features),
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            bias=bias,
            scale=scale,
        )

    def _transform(self, x_q: Tensor, w_q: Tensor, bias: Tensor | None) -> Tensor:
        return linear(x_q, w_q, bias)

    def to_spec(self, name: str) -> Dense:
        return Dense(name, self.in_features, self.out_features, **self._spec_options())

    @classmethod
    def from_spec(cls, layer: Dense) -> BinaryLinear:
        return cls(layer.in_features, layer.out_features, **_options_of(layer))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {_quantizer_repr(self)}"


class BinaryConv2d(QuantizedLayer):
    """2-D convolution y = α ⊙ (pad(q_in(x), pad_value) ⋆ q_k(W)) + b on (batch, C, H, W).

    ``pad_value`` must be a value of the input quantizer (±1 for the sign family, 0 or 1 for
    ``stochastic_binary``); with a full-precision input (``input_quantizer=None``) any finite
    value is allowed, 0.0 giving ordinary zero padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair = 3,
        stride: IntPair = 1,
        padding: IntPair = 1,
        *,
        pad_value: float = 1.0,
        input_quantizer: str | None = None,
        kernel_quantizer: str | None = "ste_sign",
        bias: bool = True,
        scale: bool = False,
    ) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.stride = _pair("stride", stride)
        self.padding = _pair("padding", padding, minimum=0)
        self.pad_value = _check_pad_value(float(pad_value), input_quantizer, self.padding)
        super().__init__(
            (out_channels, in_channels, *self.kernel_size),
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            bias=bias,
            scale=scale,
        )

    def _transform(self, x_q: Tensor, w_q: Tensor, bias: Tensor | None) -> Tensor:
        ph, pw = self.padding
        if ph or pw:
            x_q = F.pad(x_q, (pw, pw, ph, ph), mode="constant", value=self.pad_value)
        return F.conv2d(x_q, w_q, bias, stride=self.stride)

    def to_spec(self, name: str) -> Conv2d:
        geometry = (self.kernel_size, self.stride, self.padding)
        return Conv2d(name, self.in_channels, self.out_channels, *geometry,
                      pad_value=self.pad_value, **self._spec_options())  # fmt: skip

    @classmethod
    def from_spec(cls, layer: Conv2d) -> BinaryConv2d:
        geometry = (layer.kernel_size, layer.stride, layer.padding)
        return cls(layer.in_channels, layer.out_channels, *geometry,
                   pad_value=layer.pad_value, **_options_of(layer))  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, pad_value={self.pad_value}, "
            f"{_quantizer_repr(self)}"
        )


# --- what the optimizer and the training loop use ------------------------------------------------
def binary_parameters(module: nn.Module) -> list[LatentWeight]:
    """The latent weights of every binary layer in ``module`` (those a kernel quantizer binarizes)."""
    return [p for p in module.parameters() if is_binary_parameter(p)]


def is_binary_parameter(parameter: Tensor) -> bool:
    """True for a binary layer's latent weight (survives ``deepcopy``, ``.to()``, state loads)."""
    return isinstance(parameter, LatentWeight)


def clip_latent_weights(module: nn.Module) -> None:
    """Clamp every binary latent weight to [−1, 1] in place (call after each optimizer step):
    outside it the STE passes no gradient, so a weight there could never flip back."""
    with torch.no_grad():
        for weight in binary_parameters(module):
            weight.clamp_(-1.0, 1.0)


def quantized_layers(module: nn.Module) -> Iterator[QuantizedLayer]:
    """Every dense or conv layer in ``module``."""
    return (m for m in module.modules() if isinstance(m, QuantizedLayer))


# --- helpers -------------------------------------------------------------------------------------
def _check_pad_value(pad_value: float, input_quantizer: str | None, padding: tuple[int, int]):
    if not math.isfinite(pad_value):
        raise InvalidSpecError(f"BinaryConv2d: pad_value must be finite, got {pad_value}")
    if input_quantizer is None or not any(padding):
        return pad_value
    allowed = quantizer_values(input_quantizer)
    if pad_value not in allowed:
        raise InvalidSpecError(
            f"BinaryConv2d: pad_value={pad_value} is not a value of the input quantizer "
            f"{input_quantizer!r}; expected one of {list(allowed)} (binary inputs are never "
            "padded with anything else)"
        )
    return pad_value


def _options_of(layer: Dense | Conv2d) -> dict[str, Any]:
    """Constructor options from a spec layer (inverse of ``_spec_options``)."""
    return {
        "input_quantizer": layer.input_quantizer,
        "kernel_quantizer": layer.kernel_quantizer,
        "bias": layer.bias,
        "scale": layer.scale,
    }


def _pair(field: str, value: IntPair, minimum: int = 1) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(
            f"BinaryConv2d: {field} must be an int ≥ {minimum} or a pair of them, got {value!r}"
        )
    return pair  # type: ignore[return-value]


def _per_channel(vector: Tensor, ndim: int) -> Tensor:
    """(C,) → broadcastable against (batch, C) or (batch, C, H, W)."""
    return vector.view(-1, *([1] * (ndim - 2)))


def _float32(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy().copy()


def _quantizer_repr(layer: QuantizedLayer) -> str:
    return (
        f"input_quantizer={layer.input_quantizer_name!r}, "
        f"kernel_quantizer={layer.kernel_quantizer_name!r}, "
        f"bias={layer.bias is not None}, scale={layer.scale}"
    )
