"""How much memory a model needs, computed from its spec alone, before anything is allocated.

A 1.4 KB artifact can describe a network whose activations need gigabytes (a 1×1 convolution
with ``padding`` 2000 makes a 4001×4001 image per channel and instance). The loader computes
an upper bound from the layer graph and refuses the model before compiling or warming it when
the bound at the largest batch one engine call can get exceeds the limit
(:class:`MemoryLimit`; the service sets it from ``BNN_MAX_MODEL_MEMORY_BYTES``)::

    peak(batch) = weight_bytes + batch · activation_bytes_per_instance

**Weights.** The stored tensors, plus a float32 copy of every dense/conv weight at its
channel-padded size (the CPU engine keeps binary weights packed, but a layer that multiplies
±1 activations by real weights holds float32 weights laid out in 64-channel words, and the torch
backend unpacks packed weights to float32 for each call)::

    weight_bytes = Σ_tensors stored bytes + Σ_{dense, conv} 4 · O · kh · kw · F̄

with ``F̄`` the layer's input features rounded up per 64 channels (``64⌈F/64⌉``, or
``H·W·64⌈C/64⌉`` for a dense layer with binary input after a flattened image, ``64⌈C/64⌉``
for a conv).

**Activations.** The engine runs the layers one after the other, so the peak is the input batch
plus the largest working set of one layer. Per instance, for a layer with ``x`` input values and
``y`` output values (a convolution also has ``x̂ = C·(H + 2·ph)·(W + 2·pw)`` padded input values
and ``P = OH·OW·kh·kw·C`` patch values)::

    layer_bytes = e · (2·x + 2·x̂ + P) + o · y          (x̂ = P = 0 for other layers)
    activation_bytes_per_instance = 8 · input values + max over layers of layer_bytes

``e`` is the bytes per input value: 8 for real inputs (float32 copies and float64
intermediates); for binary inputs, counted at their channel-padded size, 1/8 on the CPU engine
(1 bit, packed) and 4 on the torch backend (float32 0/1 values). ``o`` is the bytes per output
value with its accumulators: 24 for real outputs (int32 popcounts, int64/float64 sums, float32
copies); for a dense/conv layer whose output folds into the next layer's binarizer
(:func:`model.engine.program.foldable_tail`) 12 with a real input (float64 and float32 sums
before the compare; 1 for a convolution with real weights on the CPU engine, whose kernel
compares and packs as it goes), and with a binary input 1 on the CPU engine (packed decisions)
and 8 on the torch backend (float32 popcounts and the compare). Layers between such a producer and its
consumer run on packed bits, inside the producer's working set. These are bounds: what one call
allocates is at most this, usually less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from model.engine.program import foldable_tail
from model.errors import ModelTooLargeError
from model.spec import FLOAT32, UINT64, Conv2d, Dense, Flatten, Layer, ModelSpec, Shape

GIB = 1024**3
DEFAULT_MAX_MODEL_MEMORY_BYTES = 4 * GIB
DEFAULT_MAX_BATCH = 1024
# Bytes per binary input value in a layer's working set, by executor (see the module docstring).
BINARY_VALUE_BYTES = {"numba": Fraction(1, 8), "torch": Fraction(4)}
REAL_VALUE_BYTES = 8
REAL_OUTPUT_BYTES = 24
# Bytes per output value folded into the next binarizer, by (executor, binary input).
DECIDED_OUTPUT_BYTES = {
    ("numba", False): 12,
    ("numba", True): 1,
    ("torch", False): 12,
    ("torch", True): 8,
}
STORED_BYTES = {FLOAT32: 4, UINT64: 8}  # per element of a stored tensor


@dataclass(frozen=True)
class MemoryLimit:
    """At most ``max_bytes`` for a model at ``max_batch`` rows per engine call."""

    max_bytes: int = DEFAULT_MAX_MODEL_MEMORY_BYTES
    max_batch: int = DEFAULT_MAX_BATCH


@dataclass(frozen=True)
class MemoryEstimate:
    """Upper bounds on a model's memory: fixed weights, and activations per instance."""

    weight_bytes: int
    activation_bytes_per_instance: int

    def peak_bytes(self, batch: int) -> int:
        """weight_bytes + batch · activation_bytes_per_instance."""
        return self.weight_bytes + batch * self.activation_bytes_per_instance


def estimate_memory(spec: ModelSpec, executor: str = "numba") -> MemoryEstimate:
    """Bounds for ``spec`` run by ``executor`` ("numba" or "torch"); formulas in the module
    docstring. Exact integers whatever the sizes (no overflow)."""
    shapes = spec.layer_shapes()
    stored = sum(
        math.prod(want.shape) * STORED_BYTES[want.dtype]
        for want in spec.expected_tensors().values()
    )
    weights, working, on_bits = stored, 0, False
    image: Shape | None = None  # the (C, H, W) a flat input was flattened from
    for i, (layer, (in_shape, out_shape)) in enumerate(zip(spec.layers, shapes, strict=True)):
        if isinstance(layer, Dense | Conv2d):
            weights += 4 * out_shape[0] * _padded_fan_in(layer, in_shape, image)
            decided = _output_decided(spec, i)
            out_bytes = _output_bytes(layer, executor, decided)
            binary_input = layer.input_quantizer is not None
            e = BINARY_VALUE_BYTES[executor] if binary_input else REAL_VALUE_BYTES
            working = max(working, _layer_bytes(layer, in_shape, out_shape, image, e, out_bytes))
            on_bits = decided
        elif not on_bits:  # BatchNorm, max-pool, flatten on real values
            working = max(
                working,
                _layer_bytes(layer, in_shape, out_shape, None, REAL_VALUE_BYTES, REAL_OUTPUT_BYTES),
            )
        if isinstance(layer, Flatten) and len(in_shape) == 3:
            image = in_shape
        elif not isinstance(layer, Flatten):
            image = None
    activation = REAL_VALUE_BYTES * math.prod(spec.input.shape) + working
    return MemoryEstimate(weight_bytes=weights, activation_bytes_per_instance=activation)


def check_memory(spec: ModelSpec, limit: MemoryLimit, executor: str = "numba") -> MemoryEstimate:
    """The estimate, or ModelTooLargeError if its peak at ``limit.max_batch`` exceeds
    ``limit.max_bytes``."""
    estimate = estimate_memory(spec, executor)
    peak = estimate.peak_bytes(limit.max_batch)
    if peak > limit.max_bytes:
        raise ModelTooLargeError(
            f"model {spec.name!r} needs up to {_size(peak)} at a batch of {limit.max_batch} "
            f"({_size(estimate.weight_bytes)} of weights + "
            f"{_size(estimate.activation_bytes_per_instance)} of activations per instance); "
            f"the limit is {_size(limit.max_bytes)} (BNN_MAX_MODEL_MEMORY_BYTES)"
        )
    return estimate


def _layer_bytes(
    layer: Layer,
    in_shape: Shape,
    out_shape: Shape,
    image: Shape | None,
    e: int | Fraction,
    out_bytes: int,
) -> int:
    """e · (2·x + 2·x̂ + P) + o · y for one instance (see the module docstring)."""
    binary_input = getattr(layer, "input_quantizer", None) is not None
    x = _channel_padded(in_shape, image) if binary_input else math.prod(in_shape)
    padded = patches = 0
    if isinstance(layer, Conv2d):
        channels = x // (in_shape[1] * in_shape[2])
        (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
        padded = channels * (in_shape[1] + 2 * ph) * (in_shape[2] + 2 * pw)
        patches = out_shape[1] * out_shape[2] * kh * kw * channels
    return math.ceil(e * (2 * x + 2 * padded + patches)) + out_bytes * math.prod(out_shape)


def _padded_fan_in(layer: Dense | Conv2d, in_shape: Shape, image: Shape | None) -> int:
    """Input values one output channel's weights span, channels padded to 64-bit words."""
    if isinstance(layer, Conv2d):
        return math.prod(layer.kernel_size) * 64 * -(-in_shape[0] // 64)
    # binary inputs after a flattened image keep its word layout; real ones are plain rows
    return _channel_padded(in_shape, image if layer.input_quantizer is not None else None)


def _output_bytes(layer: Dense | Conv2d, executor: str, decided: bool) -> int:
    """``o`` of the module docstring for a dense/conv layer."""
    if not decided:
        return REAL_OUTPUT_BYTES
    if executor == "numba" and isinstance(layer, Conv2d) and layer.kernel_quantizer is None:
        return 1  # real weights: the convolution kernel compares and packs as it goes
    return DECIDED_OUTPUT_BYTES[executor, layer.input_quantizer is not None]


def _output_decided(spec: ModelSpec, i: int) -> bool:
    """Whether layer i's output folds into the next dense/conv layer's input binarizer."""
    layers = spec.layers
    j = next((k for k in range(i + 1, len(layers)) if isinstance(layers[k], Dense | Conv2d)), None)
    if j is None or layers[j].input_quantizer is None:
        return False
    return foldable_tail(layers[i + 1 : j], spec.layer_shapes()[i][1])


def _channel_padded(shape: Shape, image: Shape | None) -> int:
    """Values of ``shape`` with channels rounded up to whole 64-bit words."""
    if len(shape) == 3:
        c, h, w = shape
        return 64 * -(-c // 64) * h * w
    if image is not None:
        return _channel_padded(image, None)
    return 64 * -(-shape[0] // 64)


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"
