"""The layer graph of an artifact: typed layer specs, shape inference and the tensors each needs.

A model is a graph of layers applied to one input tensor of shape ``input.shape`` (per
instance, batch axis excluded; images are channels-first ``(C, H, W)`` as in PyTorch). The
graph is stored as JSON in the artifact's metadata; this module is its schema and validator.

Layers are listed in topological order. In format v1 each layer takes the previous layer's
output (the first takes the model input). Format v2 adds an optional ``inputs`` list per layer
naming earlier layers (or ``@input``, the model input), which expresses residual shortcuts and
channel concatenation; a layer without ``inputs`` still takes the previous layer's output. The
last layer's output is the model's output. A graph that needs none of v2's features is written
as v1, byte for byte as before.

Layer kinds and their tensors (``<name>.<suffix>``; binary weights are bit-packed, see
:mod:`model.packing`):

=============  =================================================================================
``dense``      ``weight`` (out, in) — packed along ``in`` to (out, ⌈in/64⌉) uint64 when
               ``kernel_quantizer`` is set, else float32; ``bias`` (out,); ``scale`` (out,)
``conv2d``     ``weight`` (out, in, kh, kw) — packed along ``in`` to (out, kh, kw, ⌈in/64⌉)
               uint64 when binary, else float32; ``bias``, ``scale`` (out,)
``batchnorm``  ``weight``, ``bias``, ``running_mean``, ``running_var`` (C,) float32, raw
``maxpool2d``  none
``flatten``    none — (C, H, W) → (C·H·W,) in C, H, W order
v2:
``avgpool2d``  none — mean over each kh×kw window (no padding), like ``nn.AvgPool2d``
``global_avgpool2d`` none — (C, H, W) → (C,): the mean over H·W per channel
``shift``      ``shift`` (C,) float32 — y = x + shift[c] (ReActNet's RSign threshold and RPReLU's
               shifts; C is axis 0)
``prelu``      ``weight`` (C,) float32 — y = x if x ≥ 0 else weight[c] · x
``add``        none — the elementwise sum of its ≥ 2 inputs, which have one shape, summed in order
``concat``     none — its ≥ 2 inputs joined along axis 0 (channels); other axes must agree
=============  =================================================================================

A dense or conv layer computes ``y = scale ⊙ (q_in(x) ∗ q_k(W)) + bias`` where ``q_in`` and
``q_k`` are the named quantizers (None = identity), ``scale`` is XNOR-Net's per-output-channel
α = mean|W| (present when ``scale`` is true) and convolutions first pad their (quantized) input
with ``pad_value``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from model.errors import (
    DanglingInputError,
    DimensionTooLargeError,
    FormatVersionError,
    GraphCycleError,
    GraphTooLargeError,
    InvalidBatchNormError,
    InvalidInputShapeError,
    InvalidLabelsError,
    InvalidSpecError,
    InvalidValueRangeError,
    ShapeMismatchError,
    UnknownLayerError,
    UnusedLayerError,
)
from model.packing import packed_shape
from model.quantizers import SIGN, binarizer_for, check_kernel_quantizer

FORMAT_NAME = "bnnserve"
FORMAT_VERSION = 2  # the newest; a graph that needs no v2 feature is still written as v1
SUPPORTED_FORMAT_VERSIONS = frozenset({1, 2})
MODEL_INPUT = "@input"  # the name by which a v2 layer's ``inputs`` refers to the model input
FLOAT32 = "F32"
UINT64 = "U64"

# Layer names (and so the names in ``inputs``) are short: every message about a layer quotes
# its name, and a refusal's message reaches the repository index and the logs.
MAX_NAME_LENGTH = 128
_LAYER_NAME = re.compile(rf"^[A-Za-z0-9_]{{1,{MAX_NAME_LENGTH}}}$")
# The largest size of any one dimension (features, channels, kernel, stride, padding, input
# dims): the kernels index with 32-bit signed integers, and Python's unbounded ints must not
# reach numpy (OverflowError) or an allocation.
MAX_DIMENSION = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38  # float(np.finfo(np.float32).max)
# Caps on a graph's size, checked before any layer is built: a 16 MiB header could list 500k
# layers or give one concat 4M inputs, each costing the loader time (validation is linear, the
# compile and warm-up are per layer). A Bi-Real-Net-18 has 62 layers, its ReActNet form 126, a
# ResNet-152-deep one with RSign/RPReLU about 1,100; a DenseNet block joins at most 48 inputs.
MAX_LAYERS = 4096
MAX_LAYER_INPUTS = 256
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorExpectation:
    """What the graph needs of one stored tensor. ``logical_shape`` is set for packed ±1 tensors."""

    shape: Shape
    dtype: str
    logical_shape: Shape | None = None
    packed_axis: int | None = None


@dataclass(frozen=True)
class Layer:
    """Base of every layer spec; ``kind`` is the JSON tag."""

    kind: ClassVar[str] = ""
    since_version: ClassVar[int] = 1  # the first format version with this kind
    arity: ClassVar[int] = 1  # inputs taken; 0 means two or more (add, concat)
    name: str
    # v2: the layers (or MODEL_INPUT) whose outputs this layer takes; () = the previous layer's.
    inputs: tuple[str, ...] = field(default=(), kw_only=True)

    def output_shape(self, shape: Shape) -> Shape:
        raise NotImplementedError

    def merge_shapes(self, shapes: tuple[Shape, ...]) -> Shape:
        """The output shape of a layer given all its input shapes (one, unless arity is 0)."""
        return self.output_shape(shapes[0])

    def tensors(self, shape: Shape) -> dict[str, TensorExpectation]:
        """Tensors this layer needs, given its (first) input shape, keyed by full tensor name."""
        return {}

    def to_json(self) -> dict[str, Any]:
        doc = {"kind": self.kind, **_jsonable(asdict(self))}
        if not self.inputs:
            del doc["inputs"]  # v1 documents have no such field
        return doc


@dataclass(frozen=True)
class Dense(Layer):
    kind: ClassVar[str] = "dense"
    in_features: int
    out_features: int
    input_quantizer: str | None = None
    kernel_quantizer: str | None = None
    bias: bool = True
    scale: bool = False

    def output_shape(self, shape: Shape) -> Shape:
        _expect(len(shape) == 1, self, f"expects a flat input (features,), got {list(shape)}")
        _expect(
            shape[0] == self.in_features,
            self,
            f"in_features={self.in_features} but the previous layer gives {shape[0]}",
        )
        return (self.out_features,)

    def tensors(self, shape: Shape) -> dict[str, TensorExpectation]:
        logical = (self.out_features, self.in_features)
        out = {f"{self.name}.weight": _weight(logical, self.kernel_quantizer)}
        return out | _vectors(self.name, self.out_features, bias=self.bias, scale=self.scale)


@dataclass(frozen=True)
class Conv2d(Layer):
    kind: ClassVar[str] = "conv2d"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    pad_value: float = 1.0
    input_quantizer: str | None = None
    kernel_quantizer: str | None = None
    bias: bool = True
    scale: bool = False

    def output_shape(self, shape: Shape) -> Shape:
        _expect(len(shape) == 3, self, f"expects a (C, H, W) input, got {list(shape)}")
        c, h, w = shape
        _expect(c == self.in_channels, self, f"in_channels={self.in_channels} but input has {c}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        _expect(oh > 0 and ow > 0, self, f"kernel {kh}x{kw} does not fit input {h}x{w}")
        return (self.out_channels, oh, ow)

    def tensors(self, shape: Shape) -> dict[str, TensorExpectation]:
        logical = (self.out_channels, self.in_channels, *self.kernel_size)
        out = {f"{self.name}.weight": _weight(logical, self.kernel_quantizer)}
        return out | _vectors(self.name, self.out_channels, bias=self.bias, scale=self.scale)


@dataclass(frozen=True)
class BatchNorm(Layer):
    """Inference BatchNorm: y = (x − running_mean) / sqrt(running_var + eps) · weight + bias,
    per channel (axis 0 of the per-instance shape)."""

    kind: ClassVar[str] = "batchnorm"
    num_features: int
    eps: float = 1e-5

    def output_shape(self, shape: Shape) -> Shape:
        _expect(
            len(shape) in (1, 3) and shape[0] == self.num_features,
            self,
            f"num_features={self.num_features} but input shape is {list(shape)}",
        )
        return shape

    def tensors(self, shape: Shape) -> dict[str, TensorExpectation]:
        stats = ("weight", "bias", "running_mean", "running_var")
        return {f"{self.name}.{s}": TensorExpectation((self.num_features,), FLOAT32) for s in stats}


@dataclass(frozen=True)
class MaxPool2d(Layer):
    kind: ClassVar[str] = "maxpool2d"
    kernel_size: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)

    def output_shape(self, shape: Shape) -> Shape:
        return _window_shape(self, shape, self.kernel_size, self.stride)


@dataclass(frozen=True)
class Flatten(Layer):
    kind: ClassVar[str] = "flatten"

    def output_shape(self, shape: Shape) -> Shape:
        size = 1
        for dim in shape:
            size *= dim
        return (size,)


@dataclass(frozen=True)
class AvgPool2d(Layer):
    """Mean over each kh×kw window with the given stride, no padding: like ``nn.AvgPool2d``
    (float32 sum of the window, then one division by kh·kw)."""

    kind: ClassVar[str] = "avgpool2d"
    since_version: ClassVar[int] = 2
    kernel_size: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)

    def output_shape(self, shape: Shape) -> Shape:
        return _window_shape(self, shape, self.kernel_size, self.stride)


@dataclass(frozen=True)
class GlobalAvgPool2d(Layer):
    """(C, H, W) → (C,): y[c] = Σ_{h,w} x[c, h, w] / (H·W), i.e. ``x.mean((2, 3))``."""

    kind: ClassVar[str] = "global_avgpool2d"
    since_version: ClassVar[int] = 2

    def output_shape(self, shape: Shape) -> Shape:
        _expect(len(shape) == 3, self, f"expects a (C, H, W) input, got {list(shape)}")
        return (shape[0],)


@dataclass(frozen=True)
class Shift(Layer):
    """y = x + shift[c] per channel (axis 0): the learnable threshold of ReActNet's RSign
    (``sign(x + shift)``) and the two shifts of its RPReLU."""

    kind: ClassVar[str] = "shift"
    since_version: ClassVar[int] = 2
    num_features: int

    def output_shape(self, shape: Shape) -> Shape:
        return _per_channel_shape(self, self.num_features, shape)

    def tensors(self, shape: Shape) -> dict[str, TensorExpectation]:
        return {f"{self.name}.shift": TensorExpectation((self.num_features,), FLOAT32)}


@dataclass(frozen=True)
class PReLU(Layer):
    """y = x if x ≥ 0 else weight[c] · x per channel (axis 0), like ``nn.PReLU(C)``."""

    kind: ClassVar[str] = "prelu"
    since_version: ClassVar[int] = 2
    num_features: int

    def output_shape(self, shape: Shape) -> Shape:
        return _per_channel_shape(self, self.num_features, shape)

    def tensors(self, shape: Shape) -> dict[str, TensorExpectation]:
        return {f"{self.name}.weight": TensorExpectation((self.num_features,), FLOAT32)}


@dataclass(frozen=True)
class Add(Layer):
    """The elementwise sum of two or more inputs of one shape, y = ((x₁ + x₂) + x₃) + …, in
    float32 and in the order of ``inputs`` (a residual shortcut)."""

    kind: ClassVar[str] = "add"
    since_version: ClassVar[int] = 2
    arity: ClassVar[int] = 0

    def merge_shapes(self, shapes: tuple[Shape, ...]) -> Shape:
        if any(shape != shapes[0] for shape in shapes):
            raise ShapeMismatchError(
                f"layer {self.name!r} (add): inputs {list(self.inputs)} have shapes "
                f"{[list(s) for s in shapes]}; expected one shape"
            )
        return shapes[0]


@dataclass(frozen=True)
class Concat(Layer):
    """Two or more inputs joined along axis 0 (channels, or features for flat inputs), as
    ``torch.cat(dim=1)`` on batches; the other axes must agree."""

    kind: ClassVar[str] = "concat"
    since_version: ClassVar[int] = 2
    arity: ClassVar[int] = 0

    def merge_shapes(self, shapes: tuple[Shape, ...]) -> Shape:
        if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
            raise ShapeMismatchError(
                f"layer {self.name!r} (concat): inputs {list(self.inputs)} have shapes "
                f"{[list(s) for s in shapes]}; expected the same shape apart from axis 0"
            )
        channels = sum(s[0] for s in shapes)
        if channels > MAX_DIMENSION:
            raise DimensionTooLargeError(
                f"layer {self.name!r} (concat): {channels} channels; expected at most "
                f"{MAX_DIMENSION}"
            )
        return (channels, *shapes[0][1:])


LAYER_KINDS: dict[str, type[Layer]] = {
    cls.kind: cls
    for cls in (
        Dense,
        Conv2d,
        BatchNorm,
        MaxPool2d,
        Flatten,
        AvgPool2d,
        GlobalAvgPool2d,
        Shift,
        PReLU,
        Add,
        Concat,
    )
}


@dataclass(frozen=True)
class InputSpec:
    """The model's input: per-instance shape, and the range of values it was trained on."""

    name: str = "input"
    shape: Shape = ()
    datatype: str = "FP32"
    value_range: tuple[float, float] | None = None
    integer_valued: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Everything in an artifact except the tensors' bytes."""

    name: str
    architecture: str
    input: InputSpec
    labels: tuple[str, ...]
    layers: tuple[Layer, ...]
    output_name: str = "logits"
    training: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    # None: the lowest version that expresses this graph (what a writer records); a parsed
    # document keeps the version it declared.
    format_version: int | None = field(default=None, compare=False)

    @property
    def effective_format_version(self) -> int:
        return self.format_version or self.required_format_version()

    def required_format_version(self) -> int:
        """1 for a plain sequence of v1 kinds, 2 once any layer has ``inputs`` or a v2 kind."""
        return max((2 if layer.inputs else layer.since_version) for layer in self.layers)

    def layer_inputs(self) -> list[tuple[str, ...]]:
        """Each layer's input names resolved: ``inputs``, or else the previous layer's name
        (MODEL_INPUT for the first layer). Raises the GraphError subclasses for names that
        are unknown or not earlier, for a wrong number of inputs and for dead branches."""
        names = [layer.name for layer in self.layers]
        position = {name: i for i, name in enumerate(names)}
        resolved: list[tuple[str, ...]] = []
        for i, layer in enumerate(self.layers):
            sources = layer.inputs or ((names[i - 1],) if i else (MODEL_INPUT,))
            for source in sources:
                _check_source(layer, source, i, position)
            _check_arity(layer, sources)
            resolved.append(sources)
        used = {source for sources in resolved for source in sources}
        dead = [name for name in names[:-1] if name not in used]
        if dead:
            raise UnusedLayerError(
                f"layers {dead} feed nothing; every layer but the last must be some layer's "
                "input (the last layer's output is the model's output)"
            )
        return resolved

    def is_sequential(self) -> bool:
        """True when every layer takes exactly the previous layer's output (a v1 chain)."""
        previous = [MODEL_INPUT] + [layer.name for layer in self.layers[:-1]]
        return all(
            sources == (prev,) for sources, prev in zip(self.layer_inputs(), previous, strict=True)
        )

    def graph_shapes(self) -> list[tuple[tuple[Shape, ...], Shape]]:
        """(input shapes, output shape) of each layer; InvalidSpecError on any mismatch."""
        produced: dict[str, Shape] = {MODEL_INPUT: tuple(self.input.shape)}
        shapes = []
        for layer, sources in zip(self.layers, self.layer_inputs(), strict=True):
            ins = tuple(produced[source] for source in sources)
            out = layer.merge_shapes(ins)
            produced[layer.name] = out
            shapes.append((ins, out))
        return shapes

    def layer_shapes(self) -> list[tuple[Shape, Shape]]:
        """(first input shape, output shape) of each layer; InvalidSpecError on any mismatch.
        For a sequential graph the first input shape is the previous layer's output."""
        return [(ins[0], out) for ins, out in self.graph_shapes()]

    def expected_tensors(self) -> dict[str, TensorExpectation]:
        """Every tensor the graph needs, with its stored shape and dtype."""
        expected: dict[str, TensorExpectation] = {}
        for layer, (shape, _) in zip(self.layers, self.layer_shapes(), strict=True):
            expected |= layer.tensors(shape)
        return expected

    def validate(self) -> None:
        """Check names, quantizers, shapes and labels; raise a named error for the first problem."""
        if not self.layers:
            raise InvalidSpecError("the layer graph is empty; expected at least one layer")
        _check_layer_count(len(self.layers))
        seen: set[str] = set()
        for layer in self.layers:
            _expect(
                bool(_LAYER_NAME.match(layer.name)),
                layer,
                f"name must match [A-Za-z0-9_]+ (at most {MAX_NAME_LENGTH} characters)",
            )
            _expect(layer.name not in seen, layer, "layer names must be unique")
            seen.add(layer.name)
            _check_field_types(layer)
            _check_quantizers(layer)
        required = self.required_format_version()
        if self.format_version is not None and self.format_version < required:
            raise FormatVersionError(
                f"format_version {self.format_version} cannot express this graph (a layer has "
                f"'inputs' or a kind added in version {required}); expected format_version "
                f"{required}"
            )
        _input_shape_from_json(list(self.input.shape))
        _value_range_from_json(
            None if self.input.value_range is None else list(self.input.value_range)
        )
        _labels_from_json(list(self.labels))
        final = self.layer_shapes()[-1][1]
        if final != (len(self.labels),):
            raise InvalidSpecError(
                f"the last layer gives shape {list(final)} but there are {len(self.labels)} "
                f"labels; expected output shape [{len(self.labels)}]"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.effective_format_version,
            "name": self.name,
            "architecture": self.architecture,
            "input": _jsonable(asdict(self.input)),
            "output": {"name": self.output_name, "datatype": "FP32", "shape": [len(self.labels)]},
            "labels": list(self.labels),
            "layers": [layer.to_json() for layer in self.layers],
            "training": self.training,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ModelSpec:
        """Parse and validate; every malformed field raises InvalidSpecError naming it."""
        try:
            spec = cls(
                name=_typed(doc, "name", str),
                architecture=_typed(doc, "architecture", str),
                input=_input_from_json(_typed(doc, "input", dict)),
                labels=_labels_from_json(_typed(doc, "labels", list)),
                layers=_layers_from_json(_typed(doc, "layers", list)),
                output_name=_typed(doc.get("output", {}), "name", str, default="logits"),
                training=_typed(doc, "training", dict, default={}),
                provenance=_typed(doc, "provenance", dict, default={}),
                format_version=_typed(doc, "format_version", int),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidSpecError(f"malformed model spec: {exc}") from None
        spec.validate()
        return spec


def _layers_from_json(items: list[Any]) -> tuple[Layer, ...]:
    _check_layer_count(len(items))  # before building any: the cap bounds the work
    return tuple(layer_from_json(item) for item in items)


def _check_layer_count(count: int) -> None:
    if count > MAX_LAYERS:
        raise GraphTooLargeError(
            f"the graph has {count} layers; expected at most {MAX_LAYERS} (MAX_LAYERS)"
        )


def layer_from_json(doc: Any) -> Layer:
    """Build one layer spec from its JSON object; unknown kinds and fields are named errors."""
    if not isinstance(doc, dict) or "kind" not in doc:
        raise InvalidSpecError(f"a layer must be an object with a 'kind', got {doc!r:.80}")
    kind = doc["kind"]
    cls = LAYER_KINDS.get(kind)
    if cls is None:
        known = ", ".join(sorted(LAYER_KINDS))
        raise UnknownLayerError(f"unknown layer kind {kind!r:.80}; expected one of: {known}")
    values = {k: v for k, v in doc.items() if k != "kind"}
    allowed = {f.name for f in fields(cls)}
    unexpected = sorted(set(values) - allowed)
    if unexpected:
        raise InvalidSpecError(
            f"layer {doc.get('name')!r:.80} ({kind}): unknown fields {unexpected!r:.200}"
        )
    try:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        layer = cls(**values)
    except TypeError as exc:
        raise InvalidSpecError(f"layer {doc.get('name')!r:.80} ({kind}): {exc!s:.200}") from None
    _check_field_types(layer)
    return layer


# --- helpers -------------------------------------------------------------------------------------
def _weight(logical: Shape, kernel_quantizer: str | None) -> TensorExpectation:
    if kernel_quantizer is None:
        return TensorExpectation(logical, FLOAT32)
    return TensorExpectation(packed_shape(logical, 1), UINT64, logical_shape=logical, packed_axis=1)


def _vectors(name: str, size: int, *, bias: bool, scale: bool) -> dict[str, TensorExpectation]:
    out = {}
    if bias:
        out[f"{name}.bias"] = TensorExpectation((size,), FLOAT32)
    if scale:
        out[f"{name}.scale"] = TensorExpectation((size,), FLOAT32)
    return out


def _check_quantizers(layer: Layer) -> None:
    for attr in ("input_quantizer", "kernel_quantizer"):
        name = getattr(layer, attr, None)
        if name is not None:
            binarizer_for(name)
    kernel = getattr(layer, "kernel_quantizer", None)
    if kernel is not None:
        check_kernel_quantizer(kernel, layer.name)
    if isinstance(layer, Conv2d) and layer.input_quantizer is not None and any(layer.padding):
        binarizer = binarizer_for(layer.input_quantizer)
        allowed = (-1.0, 1.0) if binarizer is SIGN else (0.0, 1.0)
        _expect(
            layer.pad_value in allowed,
            layer,
            f"pad_value={layer.pad_value} is not a binary value of {layer.input_quantizer}; "
            f"expected one of {list(allowed)}",
        )


def _window_shape(
    layer: Layer, shape: Shape, kernel: tuple[int, int], stride: tuple[int, int]
) -> Shape:
    """(C, H, W) → (C, ⌊(H − kh)/sh⌋ + 1, ⌊(W − kw)/sw⌋ + 1): a pooling window, no padding."""
    _expect(len(shape) == 3, layer, f"expects a (C, H, W) input, got {list(shape)}")
    c, h, w = shape
    (kh, kw), (sh, sw) = kernel, stride
    _expect(h >= kh and w >= kw, layer, f"window {kh}x{kw} does not fit input {h}x{w}")
    return (c, (h - kh) // sh + 1, (w - kw) // sw + 1)


def _per_channel_shape(layer: Layer, channels: int, shape: Shape) -> Shape:
    _expect(
        len(shape) in (1, 3) and shape[0] == channels,
        layer,
        f"num_features={channels} but input shape is {list(shape)}",
    )
    return shape


def _check_source(layer: Layer, source: str, index: int, position: dict[str, int]) -> None:
    if source == MODEL_INPUT:
        return
    if source not in position:
        raise DanglingInputError(
            f"layer {layer.name!r} ({layer.kind}): input {source!r} names no layer; expected "
            f"an earlier layer's name or {MODEL_INPUT!r}"
        )
    if position[source] >= index:
        raise GraphCycleError(
            f"layer {layer.name!r} ({layer.kind}): input {source!r} is "
            f"{'itself' if position[source] == index else 'a later layer'}; layers must be "
            "listed in topological order, so the graph has no cycles"
        )


def _check_arity(layer: Layer, sources: tuple[str, ...]) -> None:
    if layer.arity == 0:
        _expect(len(sources) >= 2, layer, f"takes two or more inputs, got {list(sources)}")
    else:
        _expect(len(sources) == layer.arity, layer, f"takes one input, got {list(sources)}")
    _expect(len(set(sources)) == len(sources), layer, f"inputs {list(sources)} repeat a name")


def _check_field_types(layer: Layer) -> None:
    # the name first: every message below quotes it
    name_ok = isinstance(layer.name, str) and bool(_LAYER_NAME.match(layer.name))
    _expect(name_ok, layer, f"name must match [A-Za-z0-9_]+ (at most {MAX_NAME_LENGTH} characters)")
    if isinstance(layer, BatchNorm) and not (
        isinstance(layer.eps, int | float) and math.isfinite(layer.eps) and layer.eps > 0
    ):
        raise InvalidBatchNormError(
            f"layer {layer.name!r} (batchnorm): eps is {layer.eps!r:.40}; expected a finite "
            "number > 0 (it keeps 1/sqrt(running_var + eps) finite)"
        )
    if isinstance(layer.inputs, tuple) and len(layer.inputs) > MAX_LAYER_INPUTS:
        raise GraphTooLargeError(
            f"layer {layer.name!r} ({layer.kind}): {len(layer.inputs)} inputs; expected at "
            f"most {MAX_LAYER_INPUTS} (MAX_LAYER_INPUTS)"
        )
    for f in fields(layer):
        name, value = f.name, getattr(layer, f.name)
        if name in ("input_quantizer", "kernel_quantizer"):
            ok = value is None or isinstance(value, str)
        elif name == "inputs":
            ok = isinstance(value, tuple)
            ok = ok and all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_LENGTH for v in value)
        elif f.type in ("int",):
            ok = _is_int(value) and value > 0
        elif f.type == "tuple[int, int]":
            ok = isinstance(value, tuple) and len(value) == 2
            ok = ok and all(_is_int(v) and v >= 0 for v in value)
        elif f.type == "bool":
            ok = isinstance(value, bool)
        elif f.type == "float":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        else:
            ok = isinstance(value, str)
        _expect(ok, layer, f"field {name!r} has invalid value {value!r:.80} (expected {f.type})")
        sizes = value if f.type == "tuple[int, int]" else (value,) if f.type == "int" else ()
        if any(size > MAX_DIMENSION for size in sizes):
            raise DimensionTooLargeError(
                f"layer {layer.name!r} ({layer.kind}): field {name!r} is {value!r}; "
                f"expected at most {MAX_DIMENSION}"
            )
    for name in ("kernel_size", "stride"):
        if hasattr(layer, name):
            _expect(all(getattr(layer, name)), layer, f"{name} must be positive")


def _input_from_json(doc: dict[str, Any]) -> InputSpec:
    integer_valued = doc.get("integer_valued", False)
    if not isinstance(integer_valued, bool):
        raise InvalidSpecError(
            f"input 'integer_valued' must be true or false, got {integer_valued!r:.40}"
        )
    return InputSpec(
        name=_typed(doc, "name", str, default="input"),
        shape=_input_shape_from_json(_typed(doc, "shape", list)),
        datatype=_typed(doc, "datatype", str, default="FP32"),
        value_range=_value_range_from_json(doc.get("value_range")),
        integer_valued=integer_valued,
    )


def _input_shape_from_json(shape: list[Any]) -> Shape:
    """``[d1, ..., dk]``, 1 ≤ k, 1 ≤ dᵢ ≤ MAX_DIMENSION, integers (not floats or booleans)."""
    if not shape or not all(_is_int(d) and d > 0 for d in shape):
        raise InvalidInputShapeError(
            f"input shape must be a non-empty list of positive integers, got {shape!r:.80}"
        )
    if any(d > MAX_DIMENSION for d in shape):
        raise DimensionTooLargeError(
            f"input shape {shape!r:.80} has a dimension above {MAX_DIMENSION}"
        )
    return tuple(shape)


def _value_range_from_json(value: Any) -> tuple[float, float] | None:
    """null, or ``[low, high]``: two numbers with low ≤ high, finite in float32 (the engine's
    input type: |v| ≤ 3.4028235e38)."""
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 2
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ok = ok and all(abs(v) <= FLOAT32_MAX for v in value) and float(value[0]) <= float(value[1])
    if not ok:
        raise InvalidValueRangeError(
            f"input value_range must be null or [low, high] with low <= high, both finite in "
            f"float32 (at most {FLOAT32_MAX:.8g} in magnitude), got {value!r:.80}"
        )
    return float(value[0]), float(value[1])


def _labels_from_json(labels: list[Any]) -> tuple[str, ...]:
    """Distinct, non-empty strings: ``labels[i]`` names output column i."""
    if not all(isinstance(label, str) and label for label in labels):
        raise InvalidLabelsError(f"labels must be non-empty strings, got {labels!r:.80}")
    if len(set(labels)) != len(labels):
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        raise InvalidLabelsError(f"labels must be distinct; repeated: {repeated!r:.80}")
    return tuple(labels)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(doc: Any, key: str, kind: type, default: Any = ...) -> Any:
    if not isinstance(doc, dict) or key not in doc:
        if default is not ...:
            return default
        raise InvalidSpecError(f"model spec is missing the field {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidSpecError(
            f"model spec field {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _expect(condition: bool, layer: Layer, message: str) -> None:
    if not condition:
        raise InvalidSpecError(f"layer {layer.name!r:.80} ({layer.kind}): {message}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
