"""How much memory a model needs, computed from its spec alone, before anything is allocated.

A 1.4 KB artifact can describe a network whose activations need gigabytes (a 1×1 convolution
with ``padding`` 2000 makes a 4001×4001 image per channel and instance). The loader computes
an upper bound from the layer graph and refuses the model before compiling or warming it when
the bound at the largest batch one engine call can get exceeds the limit
(:class:`MemoryLimit`; the service sets it from ``BNN_MAX_MODEL_MEMORY_BYTES``)::

    peak(batch) = weight_bytes + batch · activation_bytes_per_instance

**Weights.** The stored tensors, plus per dense/conv layer the copies of its weights that the
compiled program holds or one call makes (a row-padded copy of packed words; float64 weights
unpacked for a real input; float32 layouts and float64 conversions of real weights; on torch,
int64 and float bit expansions)::

    weight_bytes = Σ_tensors stored bytes + Σ_{dense, conv} w · O · kh · kw · F̄

with ``F̄`` the layer's input features rounded up per 64 channels (``64⌈F/64⌉``, or
``H·W·64⌈C/64⌉`` for a dense layer with binary input after a flattened image, ``64⌈C/64⌉``
for a conv) and ``w`` from :data:`WEIGHT_COPY_BYTES` (on the CPU engine 1/4 for packed weights
on binary inputs, 24 for packed weights on real inputs, 12 for real weights).

**Activations.** The engine runs the layers one after the other, so the peak is the input batch
plus the largest working set of one layer, plus (in a format v2 graph) the values computed
earlier that wait for a later consumer. Per instance, for layer i with ``x`` input values (all
its inputs: an ``add`` or ``concat`` counts each) and ``y`` output values (a convolution also has
``x̂ = C·(H + 2·ph)·(W + 2·pw)`` padded input values and ``P = OH·OW·kh·kw·C`` patch values)::

    layer_bytes = eₓ · 2·x + eₚ · (2·x̂ + P) + o · y     (x̂ = P = 0 for other layers)
    resident_i  = Σ size(v) over layers v before i, not inputs of i, whose last consumer
                  comes after i                        (0 for every layer of a chain)
    activation_bytes_per_instance = 8 · input values + max over i of (layer_bytes + 8 · resident_i)

Liveness comes from :meth:`model.spec.ModelSpec.layer_inputs`: a value dies after its last
consumer, so a shortcut counts while its branch runs (8 bytes per value: a float32 or float64
copy). Average pools, shift, PReLU, add and concat are real-valued layers like BatchNorm and
max-pool (float32 in and out; ``eₓ`` = 8 covers the input and a copy, ``o`` = 24 the output and
its intermediates).

``eₓ``, ``eₚ`` are the bytes per input value and per padded-input or patch value: 8 for real
inputs (float32 copies and float64 intermediates) and for convolutions with real weights (they
convolve their binary input unpacked to floats); for other binary inputs, counted at their
channel-padded size, 1/8 and 1/4 on the CPU engine (packed bits; patch rows padded to whole
512-bit vectors) and 20 and 8 on the torch backend (int64 bit expansions of the input, float32
patches). A layer that quantizes a real input (not the packed decisions of the layer before)
adds 8 bytes per input value for the copy it compares. ``o`` is the bytes per output value with
its accumulators: 24 for real outputs (int32 popcounts, int64/float64 sums, float32 copies; 32
on torch); for a dense/conv layer whose output folds into the next layer's binarizer
(:func:`model.engine.compiler.foldable_tail`) 12 with a real input (float64 and float32 sums
before the compare; 1 for a convolution with real weights on the CPU engine, whose kernel
compares and packs as it goes), 1 with a binary input on the CPU engine (packed decisions), and
40 on the torch backend (sums, the compare, and the int64 steps of packing). Layers between
such a producer and its consumer run on packed bits, inside the producer's working set. In a
graph an output folds only along single-consumer, single-input layers (a shortcut never does).

These are bounds: what one call allocates is at most this, usually less. The CPU engine's
constants are checked with tracemalloc (tests/model/engine/test_memory.py); the torch ones are
read from :mod:`model.engine.torch_backend`, not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from model.engine.compiler import foldable_tail
from model.errors import ModelTooLargeError
from model.spec import (
    FLOAT32,
    MODEL_INPUT,
    UINT64,
    Conv2d,
    Dense,
    Flatten,
    Layer,
    ModelSpec,
    Shape,
)

GIB = 1024**3
DEFAULT_MAX_MODEL_MEMORY_BYTES = 4 * GIB
DEFAULT_MAX_BATCH = 1024
# Bytes per value in a layer's working set, by executor (see the module docstring). The numba
# figures bound what tracemalloc measures (tests/model/engine/test_memory.py); the torch ones
# are read from model/engine/torch_backend.py (int64 bit expansions, float32/float64 copies),
# not measured: torch's allocator is invisible to tracemalloc.
# (per binary input value, per padded-input or patch value): packed words (patch rows padded
# to whole vectors) on numba; on torch int64 bit expansions of the input, float32 patches
BINARY_VALUE_BYTES = {
    "numba": (Fraction(1, 8), Fraction(1, 4)),
    "torch": (Fraction(20), Fraction(8)),
}
REAL_VALUE_BYTES = 8
# per value computed earlier and kept alive for a later consumer (a float32 or float64 copy)
RESIDENT_VALUE_BYTES = 8
REAL_OUTPUT_BYTES = {"numba": 24, "torch": 32}
# per output value folded into the next binarizer, by (executor, binary input)
DECIDED_OUTPUT_BYTES = {
    ("numba", False): 12,
    ("numba", True): 1,
    ("torch", False): 40,
    ("torch", True): 40,
}
# per logical weight (channel-padded) of a dense/conv layer, by (executor, weights, input):
# compiled layouts and the copies one call unpacks or converts
WEIGHT_COPY_BYTES = {
    ("numba", "packed", "binary"): Fraction(1, 4),  # a row-padded copy of the packed words
    ("numba", "packed", "real"): Fraction(24),  # unpacked to float64 for the float path
    ("numba", "real", "binary"): Fraction(12),
    ("numba", "real", "real"): Fraction(12),  # float64 copy per call (+ compiled layout)
    ("torch", "packed", "binary"): Fraction(20),
    ("torch", "packed", "real"): Fraction(48),
    ("torch", "real", "binary"): Fraction(16),
    ("torch", "real", "real"): Fraction(16),
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
    docstring. Exact integers whatever the sizes (no overflow); time linear in the layers."""
    shapes = spec.graph_shapes()
    sources = spec.layer_inputs()
    consumers = _consumers(spec, sources)
    resident = _resident_values(spec, sources, shapes)
    stored = sum(
        math.prod(want.shape) * STORED_BYTES[want.dtype]
        for want in spec.expected_tensors().values()
    )
    weights, working = stored, 0
    on_bits: set[str] = set()  # layers whose output is packed decisions (or runs on them)
    images: dict[str, Shape | None] = {}  # a flat output's (C, H, W) before flatten, if known
    for i, (layer, (in_shapes, out_shape)) in enumerate(zip(spec.layers, shapes, strict=True)):
        in_shape, image = in_shapes[0], images.get(sources[i][0])
        layer_bytes = 0
        if isinstance(layer, Dense | Conv2d):
            copy = WEIGHT_COPY_BYTES[executor, _weight_kind(layer), _input_kind(layer)]
            weights += math.ceil(copy * out_shape[0] * _padded_fan_in(layer, in_shape, image))
            decided = _output_decided(spec, i, consumers, shapes)
            out_bytes = _output_bytes(layer, executor, decided)
            real = (REAL_VALUE_BYTES, REAL_VALUE_BYTES)
            e = real if _real_input(layer) else BINARY_VALUE_BYTES[executor]
            layer_bytes = _layer_bytes(layer, in_shapes, out_shape, image, e, out_bytes)
            if layer.input_quantizer is not None and sources[i][0] not in on_bits:
                layer_bytes += REAL_VALUE_BYTES * math.prod(in_shape)  # quantizes a real input
            if decided:
                on_bits.add(layer.name)
        elif sources[i][0] in on_bits:  # between a decided producer and its consumer
            on_bits.add(layer.name)
        else:  # BatchNorm, pools, flatten, shift, PReLU, add, concat on real values
            real_out = REAL_OUTPUT_BYTES[executor]
            real = (REAL_VALUE_BYTES, REAL_VALUE_BYTES)
            layer_bytes = _layer_bytes(layer, in_shapes, out_shape, None, real, real_out)
        working = max(working, layer_bytes + RESIDENT_VALUE_BYTES * resident[i])
        if isinstance(layer, Flatten):
            images[layer.name] = in_shape if len(in_shape) == 3 else image
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
    in_shapes: tuple[Shape, ...],
    out_shape: Shape,
    image: Shape | None,
    e: tuple[int | Fraction, int | Fraction],
    out_bytes: int,
) -> int:
    """eₓ · 2·x + eₚ · (2·x̂ + P) + o · y for one instance (see the module docstring); ``x``
    counts the values of every input (an add's or concat's too)."""
    in_shape = in_shapes[0]
    on_bits = isinstance(layer, Dense | Conv2d) and not _real_input(layer)
    x = _channel_padded(in_shape, image) if on_bits else sum(map(math.prod, in_shapes))
    padded = patches = 0
    if isinstance(layer, Conv2d):
        channels = x // (in_shape[1] * in_shape[2])
        (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
        padded = channels * (in_shape[1] + 2 * ph) * (in_shape[2] + 2 * pw)
        patches = out_shape[1] * out_shape[2] * kh * kw * channels
    e_x, e_p = e
    staged = math.ceil(e_x * 2 * x + e_p * (2 * padded + patches))
    return staged + out_bytes * math.prod(out_shape)


def _consumers(spec: ModelSpec, sources: list[tuple[str, ...]]) -> dict[str, list[int]]:
    """The indices of the layers that take each layer's output."""
    consumers: dict[str, list[int]] = {layer.name: [] for layer in spec.layers}
    for i, names in enumerate(sources):
        for name in names:
            if name != MODEL_INPUT:
                consumers[name].append(i)
    return consumers


def _resident_values(
    spec: ModelSpec,
    sources: list[tuple[str, ...]],
    shapes: list[tuple[tuple[Shape, ...], Shape]],
) -> list[int]:
    """Per layer i, the values computed earlier that stay alive while layer i runs without
    being its input: Σ size(v) over layers v < i whose last consumer comes after i (a shortcut
    while its branch runs). A value dies after its last consumer; 0 everywhere for a chain.
    The model input is counted apart (it lives through the call)."""
    last_use = {}
    for i, names in enumerate(sources):
        for name in names:
            last_use[name] = i
    sizes = {
        layer.name: math.prod(out) for layer, (_, out) in zip(spec.layers, shapes, strict=True)
    }
    resident, live = [], 0
    dying: dict[int, int] = {}  # layer index → values whose last consumer it is
    for i, (layer, names) in enumerate(zip(spec.layers, sources, strict=True)):
        inputs_alive = sum(sizes[n] for n in set(names) if n != MODEL_INPUT)
        resident.append(live - inputs_alive)  # its inputs are in its own working set
        live -= dying.pop(i, 0)
        if layer.name in last_use:
            live += sizes[layer.name]
            dying[last_use[layer.name]] = dying.get(last_use[layer.name], 0) + sizes[layer.name]
    return resident


def _padded_fan_in(layer: Dense | Conv2d, in_shape: Shape, image: Shape | None) -> int:
    """Input values one output channel's weights span, channels padded to 64-bit words."""
    if isinstance(layer, Conv2d):
        return math.prod(layer.kernel_size) * 64 * -(-in_shape[0] // 64)
    # binary inputs after a flattened image keep its word layout; real ones are plain rows
    return _channel_padded(in_shape, image if layer.input_quantizer is not None else None)


def _weight_kind(layer: Dense | Conv2d) -> str:
    return "real" if layer.kernel_quantizer is None else "packed"


def _input_kind(layer: Dense | Conv2d) -> str:
    return "real" if _real_input(layer) else "binary"


def _real_input(layer: Dense | Conv2d) -> bool:
    """Whether the layer computes on real values: no input quantizer, or a convolution with real
    weights, which convolves its quantized input unpacked to ±1 / {0, 1} floats."""
    real_weights_conv = isinstance(layer, Conv2d) and layer.kernel_quantizer is None
    return layer.input_quantizer is None or real_weights_conv


def _output_bytes(layer: Dense | Conv2d, executor: str, decided: bool) -> int:
    """``o`` of the module docstring for a dense/conv layer."""
    if not decided:
        return REAL_OUTPUT_BYTES[executor]
    if executor == "numba" and isinstance(layer, Conv2d) and layer.kernel_quantizer is None:
        return 1  # real weights: the convolution kernel compares and packs as it goes
    return DECIDED_OUTPUT_BYTES[executor, not _real_input(layer)]


def _output_decided(
    spec: ModelSpec,
    i: int,
    consumers: dict[str, list[int]],
    shapes: list[tuple[tuple[Shape, ...], Shape]],
) -> bool:
    """Whether layer i's output folds into a later dense/conv layer's input binarizer: it
    reaches that layer through single-input layers, each the only consumer of the one before,
    which fold into thresholds (:func:`foldable_tail`; in a chain, the
    layers up to the next dense/conv). A value with two consumers (a shortcut) is never folded."""
    layers = spec.layers
    tail: list[Layer] = []
    name = layers[i].name
    while len(consumers[name]) == 1:
        consumer = layers[consumers[name][0]]
        if len(consumer.inputs) > 1:
            return False
        if isinstance(consumer, Dense | Conv2d):
            return consumer.input_quantizer is not None and foldable_tail(tuple(tail), shapes[i][1])
        tail.append(consumer)
        name = consumer.name
    return False


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
