"""Network architectures built from typed configs: a BinaryNet-style ``mlp`` and a ``cnn``, and
the residual ``birealnet`` and ``reactnet``.

A :class:`BinaryNet` is a graph of named modules in topological order, each of which is one
layer kind of :mod:`model.spec`; a module takes the previous module's output unless
``inputs`` names others (format v2's named inputs; ``model.spec.MODEL_INPUT`` is the input):

====================================  ======================
module                                spec layer
====================================  ======================
``nn.Flatten``                        ``flatten``
``BinaryLinear``                      ``dense``
``BinaryConv2d``                      ``conv2d``
``nn.BatchNorm1d`` / ``BatchNorm2d``  ``batchnorm``
``nn.MaxPool2d``                      ``maxpool2d``
``nn.AvgPool2d``                      ``avgpool2d``
``blocks.GlobalAvgPool2d``            ``global_avgpool2d``
``blocks.Shift``                      ``shift``
``nn.PReLU(C)``                       ``prelu``
``blocks.Add`` / ``blocks.Concat``    ``add`` / ``concat``
====================================  ======================

Hidden activations are binarized by the *next* layer's input quantizer, so "BN then sign" reads
BatchNorm → BinaryLinear(input_quantizer="ste_sign"). The first layer sees the real-valued input
and the last layer has full-precision weights (BinaryNet, Courbariaux, Hubara et al. 2016).

Bi-Real Net (Liu et al. 2018) wraps every binary 3×3 conv + BatchNorm in a real-valued shortcut,
``x + BN(conv3x3_bin(sign(x)))``, and downsamples the shortcut with a 2×2 average pool, a
full-precision 1×1 conv and BatchNorm. ReActNet (Liu et al. 2020) adds RSign, sign(x + β_c)
(a ``shift`` before the binary conv), and RPReLU after each sum: shift(γ) → PReLU → shift(ζ).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from itertools import pairwise
from typing import Any, ClassVar

from torch import Tensor, nn

from model.errors import InvalidSpecError
from model.spec import (
    MODEL_INPUT,
    Add,
    AvgPool2d,
    BatchNorm,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool2d,
    InputSpec,
    Layer,
    MaxPool2d,
    ModelSpec,
    PReLU,
    Shape,
    Shift,
)
from training import blocks
from training.layers import BinaryConv2d, BinaryLinear, QuantizedLayer
from training.quantizers import check_kernel_quantizer, get_quantizer

Named = tuple[str, nn.Module]
# A graph node while building: name, module, and its inputs (() = the previous node's output).
Node = tuple[str, nn.Module, tuple[str, ...]]


@dataclass(frozen=True)
class MLPConfig:
    """BinaryNet MLP: Flatten → dense(real input, binary weights) → BN → [binary dense → BN]* →
    full-precision dense on binarized input. ``hidden`` gives the width of each hidden layer."""

    arch: ClassVar[str] = "mlp"
    hidden: tuple[int, ...] = (512, 512)
    activation_quantizer: str = "ste_sign"
    kernel_quantizer: str = "ste_sign"
    scale: bool = False
    batchnorm_momentum: float = 0.1

    def __post_init__(self) -> None:
        _check_widths("hidden", self.hidden, allow_empty=False)
        _check_quantizer_names(self)


@dataclass(frozen=True)
class CNNConfig:
    """Full-precision stem conv → BN → binary conv blocks (conv → [maxpool 2×2] → BN) → Flatten →
    [binary dense → BN]* → full-precision dense on binarized input.

    ``channels[i]`` is block i's width and ``pool[i]`` whether it max-pools (2×2, stride 2);
    binary convs pad with ``pad_value`` (+1 or −1), the stem with zeros.
    """

    arch: ClassVar[str] = "cnn"
    stem_channels: int = 32
    channels: tuple[int, ...] = (64, 64, 128)
    pool: tuple[bool, ...] = (False, True, True)
    kernel_size: int = 3
    pad_value: float = 1.0
    hidden: tuple[int, ...] = ()
    activation_quantizer: str = "ste_sign"
    kernel_quantizer: str = "ste_sign"
    scale: bool = False
    batchnorm_momentum: float = 0.1

    def __post_init__(self) -> None:
        _check_widths("stem_channels", (self.stem_channels,), allow_empty=False)
        _check_widths("channels", self.channels, allow_empty=False)
        _check_widths("hidden", self.hidden, allow_empty=True)
        if len(self.pool) != len(self.channels):
            raise ValueError(
                f"CNNConfig: pool has {len(self.pool)} entries but channels has "
                f"{len(self.channels)}; expected one pooling flag per conv block"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"CNNConfig: kernel_size must be odd and ≥ 1, got {self.kernel_size}")
        _check_quantizer_names(self)


@dataclass(frozen=True)
class ResidualConfig:
    """What Bi-Real Net and ReActNet share: full-precision stem conv (``stem_kernel``,
    ``stem_stride``, zero padding) → BN, then per stage ``i`` of width ``channels[i]``,
    ``blocks`` residual blocks ``x + BN(conv3x3_bin(q(x)))`` — the first block of every stage
    after the first with stride 2 and the shortcut ``BN(conv1x1_fp(avgpool2x2(x)))``, a stride-1
    block whose width changes with ``BN(conv1x1_fp(x))`` — then global average pooling and a
    full-precision dense classifier on real-valued features.

    Binary convs have no bias (BatchNorm follows) and pad their ±1 input with ``pad_value``.
    Each downsampling stage needs an even input size (a stride-2 3×3 conv gives ⌈H/2⌉ rows, a
    2×2 pool ⌊H/2⌋).
    """

    arch: ClassVar[str] = ""
    stem_channels: int = 32
    channels: tuple[int, ...] = (32, 64, 128)
    blocks: int = 2
    stem_kernel: int = 3
    stem_stride: int = 1
    pad_value: float = 1.0
    activation_quantizer: str = "ste_sign"
    kernel_quantizer: str = "ste_sign"
    scale: bool = False
    batchnorm_momentum: float = 0.1

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_widths("stem_channels", (self.stem_channels,), allow_empty=False)
        _check_widths("channels", self.channels, allow_empty=False)
        _check_widths("blocks", (self.blocks,), allow_empty=False)
        _check_widths("stem_stride", (self.stem_stride,), allow_empty=False)
        if self.stem_kernel < 1 or self.stem_kernel % 2 == 0:
            raise ValueError(f"{name}: stem_kernel must be odd and ≥ 1, got {self.stem_kernel}")
        _check_quantizer_names(self)


@dataclass(frozen=True)
class BiRealConfig(ResidualConfig):
    """Bi-Real Net: a real-valued shortcut around every binary 3×3 conv + BN (Liu et al. 2018)."""

    arch: ClassVar[str] = "birealnet"


@dataclass(frozen=True)
class ReActNetConfig(ResidualConfig):
    """Bi-Real Net plus ReActNet's RSign (a learnable per-channel shift before every sign) and
    RPReLU after every residual sum: shift → PReLU → shift (Liu et al. 2020)."""

    arch: ClassVar[str] = "reactnet"


ArchitectureConfig = MLPConfig | CNNConfig | BiRealConfig | ReActNetConfig
ARCHITECTURES: dict[str, type[ArchitectureConfig]] = {
    "mlp": MLPConfig,
    "cnn": CNNConfig,
    "birealnet": BiRealConfig,
    "reactnet": ReActNetConfig,
}

# Per data set: {arch: config overrides}. digits: 8×8×1, values 0..16; mnist/fashion: 28×28×1.
_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {
        # A wide first layer (many ±1 projections of the 64 pixels) is what lifts the binary
        # MLP past 97% test accuracy; (512, 512) stays near 96.5% (docs/training.md).
        "mlp": {"hidden": (1024, 256)},
        # 8×8: two stages (8×8 → 4×4).
        "birealnet": {"stem_channels": 32, "channels": (32, 64), "blocks": 2},
        "reactnet": {"stem_channels": 32, "channels": (32, 64), "blocks": 2},
        # The binary dense layer before the classifier steadies the CNN across seeds
        # (98.9-99.2% test vs 98.1-99.4% without it; docs/training.md).
        "cnn": {
            "stem_channels": 32,
            "channels": (64, 64, 128),
            "pool": (False, True, True),
            "hidden": (256,),
        },
    },
    "mnist": {
        "mlp": {"hidden": (1024, 1024, 1024)},
        "cnn": {
            "stem_channels": 32,
            "channels": (64, 64, 128, 128),
            "pool": (False, True, False, True),
            "hidden": (256,),
        },
        # 28×28 and 32×32 alike: three stages (28 → 14 → 7, 32 → 16 → 8).
        "birealnet": {"stem_channels": 32, "channels": (32, 64, 128), "blocks": 2},
        "reactnet": {"stem_channels": 32, "channels": (32, 64, 128), "blocks": 2},
    },
}
_DEFAULTS["fashion"] = _DEFAULTS["mnist"]
# Any .npz image set (e.g. CIFAR-shaped 3×32×32): the 28×28/32×32 residual nets.
_DEFAULTS["npz"] = _DEFAULTS["digits"] | {
    arch: _DEFAULTS["mnist"][arch] for arch in ("birealnet", "reactnet")
}


class BinaryNet(nn.Module):
    """A graph of named layers (``self.layers``), each one spec layer kind; see module doc.

    ``inputs`` maps a layer's name to the layers (or ``MODEL_INPUT``) it takes; a layer not in
    it takes the previous layer's output. A plain chain runs as ``nn.Sequential``; a graph keeps
    each output only until its last consumer has run.
    """

    SUPPORTED = (
        nn.Flatten,
        BinaryLinear,
        BinaryConv2d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.PReLU,
        blocks.GlobalAvgPool2d,
        blocks.Shift,
        blocks.Add,
        blocks.Concat,
    )

    def __init__(
        self,
        layers: Iterable[Named],
        *,
        architecture: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        config: ArchitectureConfig | None = None,
        inputs: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(layers))
        self.architecture = architecture
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.config = config
        for name, module in self.layers.named_children():
            if type(module) not in self.SUPPORTED:
                raise TypeError(f"layer {name!r}: {type(module).__name__} has no spec layer kind")
        self.inputs = _explicit_inputs(list(self.layers._modules), inputs or {})
        graph = self.graph_spec()
        sequential = not self.layers or graph.is_sequential()
        self._plan = None if sequential else _execution_plan(graph)
        output = graph.graph_shapes()[-1][1] if self.layers else self.input_shape
        if output != (num_classes,):
            raise InvalidSpecError(f"the network outputs {list(output)}; expected [{num_classes}]")

    def forward(self, x: Tensor) -> Tensor:
        if self._plan is None:
            return self.layers(x)
        values = {MODEL_INPUT: x}
        for name, sources, done in self._plan:
            values[name] = getattr(self.layers, name)(*(values[source] for source in sources))
            for source in done:  # no later layer reads it
                del values[source]
        return values[name]

    def spec_layers(self) -> tuple[Layer, ...]:
        """The :mod:`model.spec` layer of each module, named as in ``self.layers``, with its
        ``inputs`` where it does not simply take the previous layer's output."""
        return tuple(
            replace(spec_layer(name, module), inputs=self.inputs.get(name, ()))
            for name, module in self.layers.named_children()
        )

    def graph_spec(self) -> ModelSpec:
        """The layer graph alone (no labels or tensors): for its validation, input resolution
        and shapes. A dangling or later input is a named :class:`InvalidSpecError`."""
        return ModelSpec(
            name="graph",
            architecture=self.architecture,
            input=InputSpec(shape=self.input_shape),
            labels=(),
            layers=self.spec_layers(),
        )

    def spec_shapes(self) -> list[tuple[Shape, Shape]]:
        """(first input, output) per-instance shape of each layer."""
        return self.graph_spec().layer_shapes()


def build_model(
    config: ArchitectureConfig, input_shape: tuple[int, ...], num_classes: int
) -> BinaryNet:
    """Build the network ``config`` describes for inputs of ``input_shape`` (batch axis excluded,
    images (C, H, W)) and ``num_classes`` outputs."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be ≥ 2, got {num_classes}")
    input_shape = tuple(input_shape)
    inputs: dict[str, tuple[str, ...]] = {}
    if isinstance(config, MLPConfig):
        layers = _mlp_layers(config, input_shape, num_classes)
    elif isinstance(config, CNNConfig):
        layers = _cnn_layers(config, input_shape, num_classes)
    elif isinstance(config, ResidualConfig):
        nodes = _residual_nodes(config, input_shape, num_classes)
        layers = [(name, module) for name, module, _ in nodes]
        inputs = {name: sources for name, _, sources in nodes if sources}
    else:
        raise TypeError(f"expected one of {sorted(ARCHITECTURES)}'s configs, got {config!r}")
    return BinaryNet(
        layers,
        architecture=config.arch,
        input_shape=input_shape,
        num_classes=num_classes,
        config=config,
        inputs=inputs,
    )


def default_config(arch: str, dataset: str = "digits") -> ArchitectureConfig:
    """The default config of ``arch`` for ``dataset`` ("digits", "mnist", "fashion"; any other
    data set gets the digits defaults)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of: {sorted(ARCHITECTURES)}")
    overrides = _DEFAULTS.get(dataset, _DEFAULTS["digits"])[arch]
    return ARCHITECTURES[arch](**overrides)


def config_to_dict(config: ArchitectureConfig) -> dict[str, Any]:
    """JSON-ready dict of ``config`` with its ``arch``; inverse of :func:`config_from_dict`."""
    return {"arch": config.arch, **{k: _jsonable(v) for k, v in asdict(config).items()}}


def config_from_dict(doc: dict[str, Any]) -> ArchitectureConfig:
    """Rebuild a config from :func:`config_to_dict`'s output (lists become tuples)."""
    doc = dict(doc)
    arch = doc.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of: {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown fields {unknown}; expected some of {sorted(known)}"
        )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})


# --- builders ------------------------------------------------------------------------------------
def _mlp_layers(config: MLPConfig, input_shape: Shape, num_classes: int) -> list[Named]:
    features = _product(input_shape)
    layers: list[Named] = [("flatten", nn.Flatten())]
    widths = (features, *config.hidden)
    for i, (n_in, n_out) in enumerate(pairwise(widths), start=1):
        dense = BinaryLinear(
            n_in,
            n_out,
            input_quantizer=None if i == 1 else config.activation_quantizer,
            kernel_quantizer=config.kernel_quantizer,
            scale=config.scale,
        )
        layers += [(f"dense{i}", dense), (f"bn{i}", _batchnorm(n_out, 1, config))]
    layers.append(("output", _classifier(widths[-1], num_classes, config)))
    return layers


def _cnn_layers(config: CNNConfig, input_shape: Shape, num_classes: int) -> list[Named]:
    if len(input_shape) != 3:
        raise ValueError(f"cnn: expected an image input shape (C, H, W), got {list(input_shape)}")
    k, half = config.kernel_size, config.kernel_size // 2
    stem = BinaryConv2d(
        input_shape[0], config.stem_channels, k, padding=half, pad_value=0.0,
        input_quantizer=None, kernel_quantizer=None,
    )  # fmt: skip
    layers: list[Named] = [("conv0", stem), ("bn0", _batchnorm(config.stem_channels, 2, config))]
    widths = (config.stem_channels, *config.channels)
    for i, (n_in, n_out) in enumerate(pairwise(widths), start=1):
        conv = BinaryConv2d(
            n_in, n_out, k, padding=half, pad_value=config.pad_value,
            input_quantizer=config.activation_quantizer,
            kernel_quantizer=config.kernel_quantizer, scale=config.scale,
        )  # fmt: skip
        layers.append((f"conv{i}", conv))
        if config.pool[i - 1]:
            layers.append((f"pool{i}", nn.MaxPool2d(2, 2)))
        layers.append((f"bn{i}", _batchnorm(n_out, 2, config)))
    layers.append(("flatten", nn.Flatten()))
    features = _flat_features(layers, input_shape)
    dense_widths = (features, *config.hidden)
    for j, (n_in, n_out) in enumerate(pairwise(dense_widths), start=1):
        dense = BinaryLinear(
            n_in, n_out, input_quantizer=config.activation_quantizer,
            kernel_quantizer=config.kernel_quantizer, scale=config.scale,
        )  # fmt: skip
        layers += [(f"dense{j}", dense), (f"bn_dense{j}", _batchnorm(n_out, 1, config))]
    layers.append(("output", _classifier(dense_widths[-1], num_classes, config)))
    return layers


def _residual_nodes(config: ResidualConfig, input_shape: Shape, num_classes: int) -> list[Node]:
    """Stem, stages of residual blocks, global pool, classifier (see :class:`ResidualConfig`)."""
    if len(input_shape) != 3:
        raise ValueError(
            f"{config.arch}: expected an image input shape (C, H, W), got {list(input_shape)}"
        )
    k = config.stem_kernel
    stem = BinaryConv2d(
        input_shape[0], config.stem_channels, k, config.stem_stride, k // 2, pad_value=0.0,
        input_quantizer=None, kernel_quantizer=None, bias=False,
    )  # fmt: skip
    nodes: list[Node] = [
        ("stem", stem, ()),
        ("stem_bn", _batchnorm(config.stem_channels, 2, config), ()),
    ]
    x, width, size = "stem_bn", config.stem_channels, _spatial(stem.to_spec("stem"), input_shape)
    for s, out in enumerate(config.channels):
        for b in range(config.blocks):
            stride = 2 if s > 0 and b == 0 else 1
            if stride == 2 and any(d % 2 for d in size):
                raise ValueError(
                    f"{config.arch}: stage {s} downsamples a {size[0]}x{size[1]} map; expected "
                    "even sizes (use fewer stages or another input size)"
                )
            nodes += _residual_block(f"s{s}b{b}", x, width, out, stride, config)
            x, width = nodes[-1][0], out
            size = (size[0] // stride, size[1] // stride)
    nodes += [
        ("pool", blocks.GlobalAvgPool2d(), ()),
        ("output", BinaryLinear(width, num_classes, input_quantizer=None, kernel_quantizer=None), ()),
    ]  # fmt: skip
    return nodes


def _residual_block(
    tag: str, x: str, n_in: int, n_out: int, stride: int, config: ResidualConfig
) -> list[Node]:
    """``x + BN(conv3x3_bin(q(x)))`` (ReActNet: q(x + β) and RPReLU after the sum), with the
    shortcut ``BN(conv1x1_fp(avgpool(x)))`` where the shape changes."""
    react = isinstance(config, ReActNetConfig)
    conv = BinaryConv2d(
        n_in, n_out, 3, stride, 1, pad_value=config.pad_value,
        input_quantizer=config.activation_quantizer, kernel_quantizer=config.kernel_quantizer,
        bias=False, scale=config.scale,
    )  # fmt: skip
    nodes: list[Node] = []
    if react:  # RSign: sign(x + β_c)
        nodes.append((f"{tag}_rsign", blocks.Shift(n_in), (x,)))
    nodes += [
        (f"{tag}_conv", conv, () if react else (x,)),
        (f"{tag}_bn", _batchnorm(n_out, 2, config), ()),
    ]
    shortcut = x
    if stride != 1 or n_in != n_out:
        down = BinaryConv2d(n_in, n_out, 1, 1, 0, pad_value=0.0, input_quantizer=None,
                            kernel_quantizer=None, bias=False)  # fmt: skip
        if stride != 1:
            nodes.append((f"{tag}_pool", nn.AvgPool2d(stride, stride), (x,)))
        nodes += [
            (f"{tag}_down", down, () if stride != 1 else (x,)),
            (f"{tag}_down_bn", _batchnorm(n_out, 2, config), ()),
        ]
        shortcut = f"{tag}_down_bn"
    nodes.append((f"{tag}_add", blocks.Add(), (f"{tag}_bn", shortcut)))
    if react:  # RPReLU: shift(γ) → PReLU(β) → shift(ζ)
        nodes += [
            (f"{tag}_rp_in", blocks.Shift(n_out), ()),
            (f"{tag}_rp", nn.PReLU(n_out), ()),
            (f"{tag}_rp_out", blocks.Shift(n_out), ()),
        ]
    return nodes


def _spatial(layer: Conv2d, input_shape: Shape) -> tuple[int, int]:
    _, h, w = layer.output_shape(input_shape)
    return h, w


def _classifier(n_in: int, num_classes: int, config: ArchitectureConfig) -> BinaryLinear:
    """Full-precision weights on binarized input."""
    return BinaryLinear(
        n_in, num_classes, input_quantizer=config.activation_quantizer, kernel_quantizer=None
    )


def _batchnorm(channels: int, spatial_dims: int, config: ArchitectureConfig) -> nn.Module:
    cls = nn.BatchNorm1d if spatial_dims == 1 else nn.BatchNorm2d
    return cls(channels, momentum=config.batchnorm_momentum)


def _flat_features(layers: list[Named], input_shape: Shape) -> int:
    """Width after Flatten, by the spec's shape inference (which names a layer that does not fit)."""
    shape = input_shape
    for name, module in layers:
        shape = spec_layer(name, module).output_shape(shape)
    return _product(shape)


# --- module <-> spec layer -----------------------------------------------------------------------
def spec_layer(name: str, module: nn.Module) -> Layer:
    """The :mod:`model.spec` layer that ``module`` computes."""
    if isinstance(module, QuantizedLayer):
        return module.to_spec(name)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        if not (module.affine and module.track_running_stats):
            raise ValueError(f"layer {name!r}: BatchNorm needs affine=True and running stats")
        return BatchNorm(name=name, num_features=module.num_features, eps=float(module.eps))
    if isinstance(module, nn.MaxPool2d):
        return _maxpool_spec(name, module)
    if isinstance(module, nn.Flatten):
        if (module.start_dim, module.end_dim) != (1, -1):
            raise ValueError(f"layer {name!r}: only Flatten(start_dim=1, end_dim=-1) is supported")
        return Flatten(name=name)
    if isinstance(module, nn.AvgPool2d):
        return _avgpool_spec(name, module)
    if isinstance(module, blocks.Shift):
        return Shift(name=name, num_features=module.num_features)
    if isinstance(module, nn.PReLU):
        return PReLU(name=name, num_features=module.num_parameters)
    if isinstance(module, blocks.GlobalAvgPool2d):
        return GlobalAvgPool2d(name=name)
    if isinstance(module, blocks.Add):
        return Add(name=name)
    if isinstance(module, blocks.Concat):
        return Concat(name=name)
    raise TypeError(f"layer {name!r}: {type(module).__name__} has no spec layer kind")


def module_for_spec(layer: Layer, input_shape: Shape) -> nn.Module:
    """An untrained module computing spec ``layer`` on inputs of ``input_shape``."""
    if isinstance(layer, BatchNorm):
        cls = nn.BatchNorm1d if len(input_shape) == 1 else nn.BatchNorm2d
        return cls(layer.num_features, eps=layer.eps)
    if isinstance(layer, MaxPool2d):
        return nn.MaxPool2d(layer.kernel_size, layer.stride)
    if isinstance(layer, Flatten):
        return nn.Flatten()
    if isinstance(layer, Dense):
        return BinaryLinear.from_spec(layer)
    if isinstance(layer, Conv2d):
        return BinaryConv2d.from_spec(layer)
    if isinstance(layer, AvgPool2d):
        return nn.AvgPool2d(layer.kernel_size, layer.stride)
    if isinstance(layer, Shift):
        return blocks.Shift(layer.num_features)
    if isinstance(layer, PReLU):
        return nn.PReLU(layer.num_features)
    if isinstance(layer, GlobalAvgPool2d):
        return blocks.GlobalAvgPool2d()
    if isinstance(layer, Add):
        return blocks.Add()
    if isinstance(layer, Concat):
        return blocks.Concat()
    raise TypeError(f"layer {layer.name!r}: no module for spec kind {layer.kind!r}")


def _maxpool_spec(name: str, module: nn.MaxPool2d) -> MaxPool2d:
    kernel = _as_pair(module.kernel_size)
    stride = _as_pair(module.stride if module.stride is not None else module.kernel_size)
    plain = _as_pair(module.padding) == (0, 0) and _as_pair(module.dilation) == (1, 1)
    if not plain or module.ceil_mode or module.return_indices:
        raise ValueError(f"layer {name!r}: only MaxPool2d without padding/dilation/ceil_mode")
    return MaxPool2d(name=name, kernel_size=kernel, stride=stride)


def _avgpool_spec(name: str, module: nn.AvgPool2d) -> AvgPool2d:
    kernel = _as_pair(module.kernel_size)
    stride = _as_pair(module.stride if module.stride is not None else module.kernel_size)
    if _as_pair(module.padding) != (0, 0) or module.ceil_mode or module.divisor_override:
        raise ValueError(
            f"layer {name!r}: only AvgPool2d without padding, ceil_mode or divisor_override"
        )
    return AvgPool2d(name=name, kernel_size=kernel, stride=stride)


# --- the graph -----------------------------------------------------------------------------------
def _explicit_inputs(
    names: list[str], inputs: Mapping[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """``inputs`` without the entries that only restate the default (the previous layer's
    output, or the model input for the first layer), so a chain stays a v1 chain."""
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise InvalidSpecError(f"inputs given for {unknown}, which are not layers of the network")
    previous = dict(zip(names, [MODEL_INPUT, *names[:-1]], strict=True))
    return {
        name: tuple(sources)
        for name, sources in inputs.items()
        if tuple(sources) != (previous[name],)
    }


def _execution_plan(graph: ModelSpec) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """Per layer: its name, its resolved inputs, and the values no later layer reads (freed
    right after it runs; the last layer's output is the result)."""
    sources = graph.layer_inputs()
    last_use = {source: i for i, names in enumerate(sources) for source in names}
    return [
        (
            layer.name,
            names,
            tuple(dict.fromkeys(s for s in names if last_use[s] == i)),
        )
        for i, (layer, names) in enumerate(zip(graph.layers, sources, strict=True))
    ]


# --- helpers -------------------------------------------------------------------------------------
def _check_widths(field: str, widths: tuple[int, ...], *, allow_empty: bool) -> None:
    if not isinstance(widths, tuple) or (not widths and not allow_empty):
        raise ValueError(f"{field}: expected a non-empty tuple of widths, got {widths!r}")
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ValueError(f"{field}: widths must be positive integers, got {widths!r}")


def _check_quantizer_names(config: ArchitectureConfig) -> None:
    get_quantizer(config.activation_quantizer)
    check_kernel_quantizer(config.kernel_quantizer, f"{config.arch} kernel_quantizer")


def _as_pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _product(shape: Shape) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
