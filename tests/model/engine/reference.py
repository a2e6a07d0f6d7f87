"""Hand-built artifacts and an eager torch interpreter of the artifact spec, for engine tests.

``eager_logits`` follows :mod:`model.spec`'s semantics (v1 chains and v2 graphs) with the same torch ops the training
layers use (``x.mm(w.t()) + b``, ``F.pad`` + ``F.conv2d(x, w, b)``, α as ``y * α + b``, torch
BatchNorm in eval mode), so it serves as the reference until, and alongside,
``training.export.module_from_artifact``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from model.artifact import write_artifact
from model.packing import pack_signs, unpack_signs
from model.quantizers import binarizer_for
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
    MaxPool2d,
    ModelSpec,
    PReLU,
    Shift,
)

SIGN_QUANTIZERS = ("ste_sign", "clipped_ste", "approx_sign", "swish_sign")


def random_tensors(spec: ModelSpec, rng: np.random.Generator, *, zero_bn: float = 0.1) -> dict:
    """Random weights for every tensor the spec needs; BatchNorm weights of both signs and
    some exact zeros, statistics chosen so that thresholds land inside the reachable range."""
    tensors: dict[str, np.ndarray] = {}
    fan_in: dict[str, int] = {}
    for layer in spec.layers:
        if isinstance(layer, Dense | Conv2d):
            logical = (
                (layer.out_features, layer.in_features)
                if isinstance(layer, Dense)
                else (layer.out_channels, layer.in_channels, *layer.kernel_size)
            )
            fan = math.prod(logical[1:])
            if layer.kernel_quantizer is None:
                w = rng.normal(0, 1 / math.sqrt(fan), size=logical).astype(np.float32)
                tensors[f"{layer.name}.weight"] = w
            else:
                signs = np.where(rng.random(logical) < 0.5, -1.0, 1.0).astype(np.float32)
                tensors[f"{layer.name}.weight"] = pack_signs(signs, axis=1)
            out = logical[0]
            if layer.bias:
                tensors[f"{layer.name}.bias"] = rng.normal(0, 2, size=out).astype(np.float32)
            if layer.scale:
                scale = rng.uniform(0.2, 1.5, size=out).astype(np.float32)
                scale[rng.random(out) < 0.1] *= -1  # α is mean|W| ≥ 0 in training; test both
                tensors[f"{layer.name}.scale"] = scale
            fan_in["last"] = fan
        elif isinstance(layer, BatchNorm):
            c = layer.num_features
            spread = math.sqrt(fan_in.get("last", 1))
            weight = rng.normal(0, 1, size=c).astype(np.float32)
            weight[rng.random(c) < zero_bn] = 0.0
            tensors[f"{layer.name}.weight"] = weight
            tensors[f"{layer.name}.bias"] = rng.normal(0, 0.5, size=c).astype(np.float32)
            tensors[f"{layer.name}.running_mean"] = rng.normal(0, spread, size=c).astype(np.float32)
            tensors[f"{layer.name}.running_var"] = (
                rng.uniform(0.2, 2.0, size=c) * spread**2
            ).astype(np.float32)
        elif isinstance(layer, Shift):
            shift = rng.normal(0, 0.3, size=layer.num_features).astype(np.float32)
            tensors[f"{layer.name}.shift"] = shift
        elif isinstance(layer, PReLU):
            slope = rng.uniform(-0.5, 0.5, size=layer.num_features).astype(np.float32)
            tensors[f"{layer.name}.weight"] = slope
    return tensors


def write_model(path: Path, spec: ModelSpec, rng: np.random.Generator, **kw) -> Path:
    spec.validate()
    write_artifact(path, spec, random_tensors(spec, rng, **kw))
    return path


def mlp_spec(
    features: int = 64,
    hidden: tuple[int, ...] = (100, 70),
    classes: int = 10,
    *,
    input_quantizer: str = "ste_sign",
    kernel_quantizer: str = "ste_sign",
    scale: bool = False,
    value_range: tuple[float, float] = (0.0, 16.0),
    integer_valued: bool = True,
    input_shape: tuple[int, ...] | None = None,
) -> ModelSpec:
    layers: list = []
    if input_shape is not None and len(input_shape) > 1:
        layers.append(Flatten(name="flatten"))
    width = features
    for i, h in enumerate(hidden):
        layers.append(
            Dense(
                name=f"dense{i}",
                in_features=width,
                out_features=h,
                input_quantizer=None if i == 0 else input_quantizer,
                kernel_quantizer=kernel_quantizer,
                scale=scale,
            )
        )
        layers.append(BatchNorm(name=f"bn{i}", num_features=h))
        width = h
    layers.append(
        Dense(name="out", in_features=width, out_features=classes, input_quantizer=input_quantizer)
    )
    return ModelSpec(
        name="test-mlp",
        architecture="mlp",
        input=InputSpec(
            shape=input_shape or (features,),
            value_range=value_range,
            integer_valued=integer_valued,
        ),
        labels=tuple(str(i) for i in range(classes)),
        layers=tuple(layers),
    )


def cnn_spec(
    input_shape: tuple[int, int, int] = (1, 8, 8),
    channels: tuple[int, ...] = (20, 70),
    classes: int = 10,
    *,
    input_quantizer: str = "ste_sign",
    kernel_quantizer: str = "ste_sign",
    pad_value: float = 1.0,
    scale: bool = False,
    pool_after: tuple[bool, ...] | None = None,
    hidden: int | None = 33,
    bn_before_pool: bool = False,
    value_range: tuple[float, float] = (0.0, 16.0),
) -> ModelSpec:
    """fp conv → BN → [binary conv → (pool) → BN]… → flatten → (binary dense → BN) → fp dense."""
    c, h, w = input_shape
    pool_after = pool_after or tuple(True for _ in channels)
    layers: list = [
        Conv2d(name="conv0", in_channels=c, out_channels=channels[0], pad_value=0.0),
        BatchNorm(name="bn0", num_features=channels[0]),
    ]
    prev = channels[0]
    for i, (ch, pool) in enumerate(zip(channels[1:], pool_after, strict=False), start=1):
        layers.append(
            Conv2d(
                name=f"conv{i}",
                in_channels=prev,
                out_channels=ch,
                pad_value=pad_value,
                input_quantizer=input_quantizer,
                kernel_quantizer=kernel_quantizer,
                scale=scale,
            )
        )
        bn = BatchNorm(name=f"bn{i}", num_features=ch)
        if pool and bn_before_pool:
            layers += [bn, MaxPool2d(name=f"pool{i}")]
        elif pool:
            layers += [MaxPool2d(name=f"pool{i}"), bn]
        else:
            layers.append(bn)
        if pool:
            h, w = h // 2, w // 2
        prev = ch
    layers.append(Flatten(name="flatten"))
    width = prev * h * w
    if hidden:
        layers += [
            Dense(
                name="fc",
                in_features=width,
                out_features=hidden,
                input_quantizer=input_quantizer,
                kernel_quantizer=kernel_quantizer,
                scale=scale,
            ),
            BatchNorm(name="bnfc", num_features=hidden),
        ]
        width = hidden
    layers.append(
        Dense(name="out", in_features=width, out_features=classes, input_quantizer=input_quantizer)
    )
    return ModelSpec(
        name="test-cnn",
        architecture="cnn",
        input=InputSpec(shape=input_shape, value_range=value_range, integer_valued=True),
        labels=tuple(str(i) for i in range(classes)),
        layers=tuple(layers),
    )


def bireal_spec(
    input_shape: tuple[int, int, int] = (1, 8, 8),
    widths: tuple[int, ...] = (8, 16),
    blocks: int = 1,
    classes: int = 10,
    *,
    stem_kernel: int = 3,
    stem_stride: int = 1,
    stem_pool: bool = False,
    reactnet: bool = False,
    concat: bool = False,
    value_range: tuple[float, float] = (0.0, 16.0),
    integer_valued: bool = True,
) -> ModelSpec:
    """A Bi-Real-Net-shaped v2 graph: a full-precision stem conv → BN (→ 2×2/2 max-pool), then
    per stage ``blocks`` residual blocks ``x + BN(conv3x3_bin(sign(x)))`` (the first of each
    later stage with stride 2 and the shortcut ``BN(conv1x1_fp(avgpool2x2(x)))``), global
    average pooling and a full-precision dense classifier. ``reactnet`` adds RSign (a shift
    before each sign) and RPReLU (shift → PReLU → shift) after each residual sum; ``concat``
    makes the last stage's output the channel concatenation of its sum and its shortcut (a
    BinaryDenseNet-style join)."""
    c = input_shape[0]
    pad = stem_kernel // 2
    layers: list = [
        Conv2d(
            name="stem",
            in_channels=c,
            out_channels=widths[0],
            kernel_size=(stem_kernel, stem_kernel),
            stride=(stem_stride, stem_stride),
            padding=(pad, pad),
            pad_value=0.0,
        ),
        BatchNorm(name="stem_bn", num_features=widths[0]),
    ]
    if stem_pool:
        # 2×2/2, not ResNet's padded 3×3/2: max-pool has no padding, and an unpadded 3×3 window
        # makes 112 → 55, an odd side the 2×2 average-pool shortcuts and the stride-2 binary
        # convolutions round differently (27 vs 28); 2×2/2 gives ResNet's 56
        layers.append(MaxPool2d(name="stem_pool", kernel_size=(2, 2), stride=(2, 2)))
    x, prev = layers[-1].name, widths[0]
    for s, width in enumerate(widths):
        for b in range(blocks):
            tag, stride = f"s{s}b{b}", 2 if (s > 0 and b == 0) else 1
            binarizer_input = x
            if reactnet:
                layers.append(Shift(name=f"{tag}_rsign", num_features=prev, inputs=(x,)))
                binarizer_input = f"{tag}_rsign"
            layers += [
                Conv2d(
                    name=f"{tag}_conv",
                    in_channels=prev,
                    out_channels=width,
                    stride=(stride, stride),
                    pad_value=1.0,
                    input_quantizer="ste_sign",
                    kernel_quantizer="ste_sign",
                    bias=False,
                    inputs=(binarizer_input,),
                ),
                BatchNorm(name=f"{tag}_bn", num_features=width),
            ]
            shortcut = x
            if stride != 1 or width != prev:
                layers += [
                    AvgPool2d(
                        name=f"{tag}_pool",
                        kernel_size=(stride, stride),
                        stride=(stride, stride),
                        inputs=(x,),
                    ),
                    Conv2d(
                        name=f"{tag}_down",
                        in_channels=prev,
                        out_channels=width,
                        kernel_size=(1, 1),
                        padding=(0, 0),
                        pad_value=0.0,
                        bias=False,
                    ),
                    BatchNorm(name=f"{tag}_down_bn", num_features=width),
                ]
                shortcut = f"{tag}_down_bn"
            layers.append(Add(name=f"{tag}_add", inputs=(f"{tag}_bn", shortcut)))
            x = f"{tag}_add"
            if reactnet:
                layers += [
                    Shift(name=f"{tag}_rp_in", num_features=width),
                    PReLU(name=f"{tag}_rp", num_features=width),
                    Shift(name=f"{tag}_rp_out", num_features=width),
                ]
                x = f"{tag}_rp_out"
            last_shortcut, prev = shortcut, width
    if concat:
        layers.append(Concat(name="join", inputs=(x, last_shortcut)))
        x, prev = "join", prev * 2
    layers += [
        GlobalAvgPool2d(name="gap", inputs=(x,)),
        Dense(name="fc", in_features=prev, out_features=classes),
    ]
    return ModelSpec(
        name="test-bireal",
        architecture="reactnet" if reactnet else "birealnet",
        input=InputSpec(shape=input_shape, value_range=value_range, integer_valued=integer_valued),
        labels=tuple(str(i) for i in range(classes)),
        layers=tuple(layers),
    )


# --- the eager reference --------------------------------------------------------------------------
def eager_logits(spec: ModelSpec, tensors: dict, x: np.ndarray) -> np.ndarray:
    """Run the spec with torch ops, as the training layers do, in float32 eval mode."""
    import torch
    import torch.nn.functional as F

    def quantize(name, v):
        if name is None:
            return v
        if binarizer_for(name).kind == "sign":
            return torch.where(v >= 0, 1.0, -1.0).to(v.dtype)
        return (v > 0).to(v.dtype)

    def weight(layer):
        stored = tensors[f"{layer.name}.weight"]
        if layer.kernel_quantizer is None:
            return torch.from_numpy(np.array(stored, np.float32))
        length = layer.in_features if isinstance(layer, Dense) else layer.in_channels
        # Contiguous, as a trained layer's weight: unpack_signs returns a strided view, for
        # which F.conv2d answers in channels-last layout, and a later mean then sums in
        # another order (float addition is not associative).
        return torch.from_numpy(np.ascontiguousarray(unpack_signs(stored, length, axis=1)))

    def vector(layer, suffix):
        key = f"{layer.name}.{suffix}"
        return torch.from_numpy(np.array(tensors[key], np.float32)) if key in tensors else None

    v = torch.from_numpy(np.asarray(x, np.float32).reshape(x.shape[0], *spec.input.shape))
    values = {MODEL_INPUT: v}

    def per_channel(vec, like):
        return vec.view(1, -1, *([1] * (like.dim() - 2)))

    with torch.no_grad():
        for layer, sources in zip(spec.layers, spec.layer_inputs(), strict=True):
            v = values[sources[0]]
            if isinstance(layer, Add):
                for source in sources[1:]:
                    v = v + values[source]
            elif isinstance(layer, Concat):
                v = torch.cat([values[source] for source in sources], dim=1)
            elif isinstance(layer, Shift):
                v = v + per_channel(vector(layer, "shift"), v)
            elif isinstance(layer, PReLU):
                v = F.prelu(v, vector(layer, "weight"))
            elif isinstance(layer, AvgPool2d):
                v = F.avg_pool2d(v, layer.kernel_size, layer.stride)
            elif isinstance(layer, GlobalAvgPool2d):
                v = v.mean((2, 3))
            elif isinstance(layer, Dense | Conv2d):
                xq, w = quantize(layer.input_quantizer, v), weight(layer)
                bias, scale = vector(layer, "bias"), vector(layer, "scale")
                if isinstance(layer, Dense):
                    y = xq.mm(w.t())
                    if scale is not None:
                        y = y * scale
                    v = y if bias is None else y + bias
                else:
                    ph, pw = layer.padding
                    if ph or pw:
                        xq = F.pad(xq, (pw, pw, ph, ph), value=layer.pad_value)
                    if scale is None:
                        v = F.conv2d(xq, w, bias, stride=layer.stride)
                    else:
                        y = F.conv2d(xq, w, None, stride=layer.stride) * scale.view(1, -1, 1, 1)
                        v = y if bias is None else y + bias.view(1, -1, 1, 1)
            elif isinstance(layer, BatchNorm):
                bn = (torch.nn.BatchNorm1d if v.dim() == 2 else torch.nn.BatchNorm2d)(
                    layer.num_features, eps=layer.eps
                )
                bn.eval()
                for suffix in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, suffix).copy_(vector(layer, suffix))
                v = bn(v)
            elif isinstance(layer, MaxPool2d):
                v = F.max_pool2d(v, layer.kernel_size, layer.stride)
            elif isinstance(layer, Flatten):
                v = v.reshape(v.shape[0], -1)
            values[layer.name] = v
    return v.numpy()
