"""A model summary in the manner of Larq's ``lq.models.summary``, computed from the layer graph.

The summary is computed from a :class:`model.spec.ModelSpec` (or a model's spec layers), so it
counts exactly the tensors an artifact stores: a parameter is *binary* when the artifact packs it
at 1 bit (a weight under a kernel quantizer), otherwise *full precision* at 32 bits — biases, α
scales and BatchNorm's four statistics per channel included.

Per layer: input precision, output shape, binary and full-precision parameter counts, memory
(binary/8 + 4·float bytes, in kB = 1024 bytes), and multiply-accumulates: *binary* MACs where
both operands are binary (input and kernel quantizer set: XNOR-popcount at inference), else
full-precision MACs. A dense layer does in·out MACs per instance, a convolution
out_h·out_w·out·in·kh·kw; BatchNorm, pooling, flatten and the v2 graph layers (shift, PReLU, add,
concat, average pools) count none (as in Larq): their elementwise work is a few operations per
activation, negligible next to the convolutions. Shift and PReLU have per-channel float32
parameters (one vector each), counted as full precision.

The compression ratio compares the float32 state dict (every stored parameter at 32 bits) with
the packed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from model.spec import Conv2d, Dense, InputSpec, Layer, ModelSpec, Shape

KB = 1024


@dataclass(frozen=True)
class LayerSummary:
    name: str
    kind: str
    input_bits: int | None  # 1 or 32 for dense/conv, None for layers without weights
    output_shape: Shape
    binary_params: int
    float_params: int
    binary_macs: int
    float_macs: int

    @property
    def memory_bytes(self) -> float:
        return self.binary_params / 8 + 4 * self.float_params


@dataclass(frozen=True)
class ModelSummary:
    name: str
    input_shape: Shape
    layers: tuple[LayerSummary, ...]

    @property
    def binary_params(self) -> int:
        return sum(layer.binary_params for layer in self.layers)

    @property
    def float_params(self) -> int:
        return sum(layer.float_params for layer in self.layers)

    @property
    def binary_macs(self) -> int:
        return sum(layer.binary_macs for layer in self.layers)

    @property
    def float_macs(self) -> int:
        return sum(layer.float_macs for layer in self.layers)

    @property
    def packed_bytes(self) -> float:
        """binary/8 + 4·float: the tensor bytes of an artifact, before word padding and header."""
        return self.binary_params / 8 + 4 * self.float_params

    @property
    def float32_bytes(self) -> int:
        """Every parameter at 32 bits, as in a float32 state dict."""
        return 4 * (self.binary_params + self.float_params)

    @property
    def compression_ratio(self) -> float:
        return self.float32_bytes / self.packed_bytes if self.packed_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "layers": [
                {**asdict(layer), "output_shape": list(layer.output_shape)}
                | {"memory_kb": layer.memory_bytes / KB}
                for layer in self.layers
            ],
            "totals": {
                "binary_params": self.binary_params,
                "float_params": self.float_params,
                "binary_macs": self.binary_macs,
                "float_macs": self.float_macs,
                "memory_kb": self.packed_bytes / KB,
                "float32_kb": self.float32_bytes / KB,
                "compression_ratio": self.compression_ratio,
            },
        }

    def to_text(self) -> str:
        """A fixed-width table like Larq's, then the totals and the compression ratio."""
        header = (
            "Layer", "Input prec. (bit)", "Outputs", "# 1-bit", "# 32-bit",
            "Memory (kB)", "1-bit MACs", "32-bit MACs",
        )  # fmt: skip
        rows = [
            (
                f"{layer.name} ({layer.kind})",
                "-" if layer.input_bits is None else str(layer.input_bits),
                _shape(layer.output_shape),
                f"{layer.binary_params:,}",
                f"{layer.float_params:,}",
                f"{layer.memory_bytes / KB:.2f}",
                f"{layer.binary_macs:,}",
                f"{layer.float_macs:,}",
            )
            for layer in self.layers
        ]
        total = (
            "Total", "", "", f"{self.binary_params:,}", f"{self.float_params:,}",
            f"{self.packed_bytes / KB:.2f}", f"{self.binary_macs:,}", f"{self.float_macs:,}",
        )  # fmt: skip
        widths = [max(len(row[i]) for row in (header, *rows, total)) for i in range(len(header))]
        rule = "  ".join("-" * w for w in widths)

        def line(row: Sequence[str]) -> str:
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
            ]
            return "  ".join(cells).rstrip()

        lines = [f"{self.name} stats (input {_shape(self.input_shape)})", line(header), rule]
        lines += [line(row) for row in rows] + [rule, line(total), ""]
        lines += [
            f"Total params: {self.binary_params + self.float_params:,} "
            f"({self.binary_params:,} binary, {self.float_params:,} full precision)",
            f"Packed size: {self.packed_bytes / KB:.2f} kB; float32 state dict: "
            f"{self.float32_bytes / KB:.2f} kB",
            f"Compression ratio vs float32: {self.compression_ratio:.2f}x",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def summarize_layers(
    layers: Sequence[Layer], input_shape: Shape, name: str = "model"
) -> ModelSummary:
    """The summary of the layer graph ``layers`` (a chain, or v2 named inputs) applied to
    per-instance inputs of ``input_shape``."""
    graph = ModelSpec(
        name=name, architecture="", input=InputSpec(shape=tuple(input_shape)), labels=(),
        layers=tuple(layers),
    )  # fmt: skip
    rows = []
    for layer, (ins, out) in zip(graph.layers, graph.graph_shapes(), strict=True):
        shape = ins[0]
        binary = floats = 0
        for expectation in layer.tensors(shape).values():
            if expectation.logical_shape is not None:  # packed ±1: one bit per weight
                binary += math.prod(expectation.logical_shape)
            else:
                floats += math.prod(expectation.shape)
        macs = _macs(layer, out)
        is_binary_op = _binary_operands(layer)
        rows.append(
            LayerSummary(
                name=layer.name,
                kind=layer.kind,
                input_bits=_input_bits(layer),
                output_shape=out,
                binary_params=binary,
                float_params=floats,
                binary_macs=macs if is_binary_op else 0,
                float_macs=0 if is_binary_op else macs,
            )
        )
    return ModelSummary(name=name, input_shape=tuple(input_shape), layers=tuple(rows))


def summarize_spec(spec: ModelSpec) -> ModelSummary:
    """The summary of an artifact's layer graph."""
    return summarize_layers(spec.layers, tuple(spec.input.shape), name=spec.name)


def summarize_model(model: Any, name: str | None = None) -> ModelSummary:
    """The summary of a :class:`training.architectures.BinaryNet` (anything with
    ``spec_layers()`` and ``input_shape``)."""
    return summarize_layers(
        model.spec_layers(), tuple(model.input_shape), name=name or model.architecture
    )


def _macs(layer: Layer, out: Shape) -> int:
    if isinstance(layer, Dense):
        return layer.in_features * layer.out_features
    if isinstance(layer, Conv2d):
        _, out_h, out_w = out
        kh, kw = layer.kernel_size
        return out_h * out_w * layer.out_channels * layer.in_channels * kh * kw
    return 0


def _binary_operands(layer: Layer) -> bool:
    return (
        getattr(layer, "input_quantizer", None) is not None
        and getattr(layer, "kernel_quantizer", None) is not None
    )


def _input_bits(layer: Layer) -> int | None:
    if not isinstance(layer, Dense | Conv2d):
        return None
    return 1 if layer.input_quantizer is not None else 32


def _shape(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
