"""Quantizers: binarizing forwards with straight-through (or surrogate) backwards.

Each quantizer is a :class:`torch.autograd.Function` behind a plain function (``ste_sign(x)``),
registered by name in :data:`QUANTIZERS` so that configs and artifacts name them as strings.
The names are exactly those of :data:`model.quantizers.INFERENCE_BINARIZERS`, which says what
each means at inference:

====================  ==============================  ==========================================
name                  forward (training)              backward ∂L/∂x
====================  ==============================  ==========================================
``ste_sign``          sign(x), sign(0) = +1           g · 1{|x| ≤ clip}
``clipped_ste``       sign(x)                         clamp(g, −1, 1)
``approx_sign``       sign(x)                         g · (2 − 2|x|) · 1{|x| ≤ 1}
``swish_sign``        sign(x)                         g · β(2 − βx·tanh(βx/2)) / (1 + cosh(βx))
``stochastic_binary`` 1{x > 0} w.p. p, else sigmoid   g · σ(x)(1 − σ(x))
====================  ==============================  ==========================================

A gradient estimator is not the derivative of its forward, so these fail
``torch.autograd.gradcheck`` by design; the tests compare each backward to its formula instead.

``stochastic_binary`` is the only one whose forward depends on the mode: in training it draws
once per call; in evaluation (``training=False``) it is the hard step 1{x > 0}, exactly what
inference computes. Layers hold a :class:`Quantizer` module, which passes ``self.training``, so
``model.eval()`` switches it. It is an activation quantizer only: its values are {0, 1}, and a
weight must be one sign bit (see :func:`check_kernel_quantizer`).

ONNX: every Function carries a ``symbolic`` that ``torch.onnx.export(..., dynamo=False)`` emits
in place of tracing its forward, in standard ops only: the sign family as
``Where(GreaterOrEqual(x, 0), 1, −1)`` (so sign(0) = +1, which ONNX's own ``Sign`` would map to
0) and ``stochastic_binary`` as its evaluation form ``Cast(Greater(x, 0), FLOAT)``, whatever mode
the module is in (an exported graph is for inference; a random draw baked into it would be
wrong).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from model.errors import UnknownQuantizerError
from model.quantizers import INFERENCE_BINARIZERS, binarizer_for
from model.quantizers import check_kernel_quantizer as _check_kernel_quantizer


def _sign(x: Tensor) -> Tensor:
    """sign(x) with sign(0) = +1 (``torch.sign(0)`` is 0, which is not a binary value)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _onnx_constant(g: Any, value: float) -> Any:
    """A float32 scalar constant in the ONNX graph ``g`` (broadcasts against any shape)."""
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))


def onnx_sign(g: Any, x: Any) -> Any:
    """ONNX nodes for sign(x) with sign(0) = +1: Where(x ≥ 0, +1, −1)."""
    fires = g.op("GreaterOrEqual", x, _onnx_constant(g, 0.0))
    return g.op("Where", fires, _onnx_constant(g, 1.0), _onnx_constant(g, -1.0))


def onnx_step(g: Any, x: Any) -> Any:
    """ONNX nodes for the step 1{x > 0} as float32: Cast(x > 0, FLOAT)."""
    fires = g.op("Greater", x, _onnx_constant(g, 0.0))
    return g.op("Cast", fires, to_i=torch.onnx.TensorProtoDataType.FLOAT)


class _SignWithGradient(torch.autograd.Function):
    """Base of the sign family: forward sign(x), backward ``surrogate_grad(x, g)``."""

    @staticmethod
    def forward(x: Tensor, *params: Any) -> Tensor:
        return _sign(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, *params = inputs
        ctx.save_for_backward(x)
        ctx.params = params

    @staticmethod
    def symbolic(g: Any, x: Any, *params: Any) -> Any:
        """ONNX export: the forward only (the parameters shape the backward alone)."""
        return onnx_sign(g, x)


class SteSignFunction(_SignWithGradient):
    """Backward g · 1{|x| ≤ clip}: the derivative of Htanh(x) = clip(x, −clip, clip)."""

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        (clip_value,) = ctx.params
        return grad * (x.abs() <= clip_value).to(grad.dtype), None


class ClippedSteFunction(_SignWithGradient):
    """Backward clamp(g, −1, 1): clips the gradient's value, not by the input's magnitude."""

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.clamp(-1.0, 1.0)


class ApproxSignFunction(_SignWithGradient):
    """Backward g · (2 − 2|x|) on |x| ≤ 1, else 0 (the derivative of a piecewise quadratic)."""

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        magnitude = x.abs()
        return grad * torch.where(magnitude <= 1.0, 2.0 - 2.0 * magnitude, 0.0)


class SwishSignFunction(_SignWithGradient):
    """Backward g · β(2 − βx·tanh(βx/2)) / (1 + cosh(βx)), the derivative of the SignSwish
    2σ(βx)(1 + βx(1 − σ(βx))) − 1. For large |βx| cosh overflows to inf and the factor is 0."""

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        (beta,) = ctx.params
        bx = beta * x
        return grad * beta * (2.0 - bx * torch.tanh(bx / 2.0)) / (1.0 + torch.cosh(bx)), None


class StochasticBinaryFunction(torch.autograd.Function):
    """Forward the hard step 1{x > 0} when ``hard`` else sigmoid(x); backward always
    g · σ(x)(1 − σ(x)), the sigmoid's gradient."""

    @staticmethod
    def forward(x: Tensor, hard: bool) -> Tensor:
        return (x > 0).to(x.dtype) if hard else torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def symbolic(g: Any, x: Any, hard: bool) -> Any:
        """ONNX export: the evaluation form 1{x > 0}, whatever ``hard`` this call drew."""
        return onnx_step(g, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1.0 - s), None


# --- plain functions -----------------------------------------------------------------------------
def ste_sign(x: Tensor, clip_value: float = 1.0) -> Tensor:
    """Sign with the straight-through estimator (BinaryNet, Courbariaux, Hubara et al. 2016).

    Forward q = +1 if x ≥ 0 else −1; backward ∂L/∂x = ∂L/∂q · 1{|x| ≤ clip_value}.
    """
    return SteSignFunction.apply(x, clip_value)


def clipped_ste(x: Tensor) -> Tensor:
    """Sign whose backward clips the gradient's value: ∂L/∂x = clamp(∂L/∂q, −1, 1).

    A widely copied variant of the STE; unlike :func:`ste_sign` it passes gradients for any |x|.
    """
    return ClippedSteFunction.apply(x)


def approx_sign(x: Tensor) -> Tensor:
    """Sign with ApproxSign's gradient (Bi-Real Net, Liu et al. 2018).

    Forward sign(x) (sign(0) = +1); backward ∂L/∂x = ∂L/∂q · (2 − 2|x|) for |x| ≤ 1, else 0.
    """
    return ApproxSignFunction.apply(x)


def swish_sign(x: Tensor, beta: float = 5.0) -> Tensor:
    """Sign with the SignSwish gradient (BNN+, Darabi et al. 2018).

    Forward sign(x) (sign(0) = +1);
    backward ∂L/∂x = ∂L/∂q · β(2 − βx·tanh(βx/2)) / (1 + cosh(βx)).
    """
    return SwishSignFunction.apply(x, beta)


def stochastic_binary(x: Tensor, p: float = 0.5, *, training: bool = True) -> Tensor:
    """A {0, 1} activation that mixes a hard step and a sigmoid (after the TensorFlow
    ``tf.custom_gradient`` example of stochastic binary units).

    Training forward: with probability ``p``, drawn once per call from torch's generator,
    1{x > 0}; otherwise sigmoid(x). Backward always ∂L/∂x = ∂L/∂q · σ(x)(1 − σ(x)).
    Evaluation (``training=False``) and inference: the hard step 1{x > 0}.
    """
    hard = not training or bool(torch.rand(()) < p)
    return StochasticBinaryFunction.apply(x, hard)


QuantizerFunction = Callable[..., Tensor]

QUANTIZERS: dict[str, QuantizerFunction] = {
    "ste_sign": ste_sign,
    "clipped_ste": clipped_ste,
    "approx_sign": approx_sign,
    "swish_sign": swish_sign,
    "stochastic_binary": stochastic_binary,
}
# Quantizers whose forward differs between training and evaluation; they take ``training=``.
MODE_DEPENDENT = frozenset({"stochastic_binary"})

assert set(QUANTIZERS) == set(INFERENCE_BINARIZERS), "training and model quantizer names differ"


def get_quantizer(name: str) -> QuantizerFunction:
    """The plain function registered as ``name``; UnknownQuantizerError naming the known ones."""
    try:
        return QUANTIZERS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(QUANTIZERS))
        raise UnknownQuantizerError(
            f"unknown quantizer {name!r}; expected one of: {known}"
        ) from None


def check_kernel_quantizer(name: str, layer: str = "layer") -> None:
    """Raise unless ``name`` is a registered quantizer that binarizes weights to ±1."""
    get_quantizer(name)
    _check_kernel_quantizer(name, layer)


def quantizer_values(name: str) -> tuple[float, float]:
    """The two values quantizer ``name`` takes at inference: (−1, +1) or (0, 1)."""
    get_quantizer(name)
    binarizer = binarizer_for(name)
    return float(binarizer.low), float(binarizer.high)


class Quantizer(nn.Module):
    """A named quantizer as a module, so that ``model.train()`` / ``model.eval()`` reach it.

    ``params`` are passed to the plain function (e.g. ``clip_value``, ``beta``, ``p``); only the
    name goes into an artifact, since inference uses the forward alone.
    """

    def __init__(self, name: str, **params: Any) -> None:
        super().__init__()
        self.function = get_quantizer(name)
        self.name = name
        self.params = params

    def forward(self, x: Tensor) -> Tensor:
        if self.name in MODE_DEPENDENT:
            return self.function(x, **self.params, training=self.training)
        return self.function(x, **self.params)

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"{self.name!r}{params}"


def make_quantizer(name: str | None, **params: Any) -> nn.Module:
    """A :class:`Quantizer` for ``name``, or ``nn.Identity`` for None (full precision)."""
    return nn.Identity() if name is None else Quantizer(name, **params)
