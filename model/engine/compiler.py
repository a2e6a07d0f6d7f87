"""Compile an artifact's layer graph into a :class:`~model.engine.ops.Program`.

Runs of a dense or conv layer and the BatchNorm, max-pool and flatten layers after it become one
operation (:mod:`model.engine.ops`); when the next layer quantizes its input, the run ends in
thresholds folded from the whole chain (:mod:`model.engine.folding`) and the layer's output is
packed bits, else it ends in real values. Weights are laid out here, once, for the kernels
(:mod:`model.engine.layout`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from model.engine.folding import (
    AffineStep,
    BatchNormStep,
    Step,
    Thresholds,
    bit_invert,
    fold_batchnorm_into_thresholds,
    pool_and_mask,
)
from model.engine.graph import split_chains, wire
from model.engine.layout import WIDE_POPCOUNT, Shape, aligned_copy, pad_rows
from model.engine.ops import (
    MAX_PLANE_VALUE,
    BinaryConv,
    BinaryDense,
    BitPool,
    Bits,
    Decide,
    Epilogue,
    FloatConv,
    FloatDense,
    Op,
    PlanesDense,
    Program,
    Quantize,
    Real,
    RealAdd,
    RealAvgPool,
    RealBatchNorm,
    RealConcat,
    RealFlatten,
    RealGlobalAvgPool,
    RealMaxPool,
    RealPReLU,
    RealShift,
    SignedDense,
    ToReal,
    Unpack,
)
from model.packing import pack_signs, unpack_signs, words_for
from model.quantizers import SIGN, Binarizer, binarizer_for
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
    Layer,
    MaxPool2d,
    ModelSpec,
    PReLU,
    Shift,
)


def compile_program(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> Program:
    """Turn a validated spec and its tensors into a :class:`Program`: a v1 chain as one chain,
    a v2 graph as its chains (:func:`model.engine.graph.split_chains`) wired by named values."""
    if spec.required_format_version() == 1:
        out_shapes = [out for _, out in spec.layer_shapes()]
        start = Real(tuple(spec.input.shape))
        ops, state = compile_chain(spec.layers, out_shapes, start, tensors, spec, at_input=True)
        if not isinstance(state, Real):  # pragma: no cover - bits exist only before a consumer
            raise AssertionError("the program must end on real values")
        program = Program(ops=tuple(ops), input_shape=tuple(spec.input.shape))
    else:
        program = _compile_graph(spec, tensors)
    return replace(program, arrays_bytes=program_nbytes(program))


def _compile_graph(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> Program:
    """Each chain compiles like a v1 model whose input is the chain's source value; the first
    operation of a chain reads the chain's sources, each later one the previous output."""
    shapes = {MODEL_INPUT: tuple(spec.input.shape)}
    out_shapes = [out for _, out in spec.graph_shapes()]
    for layer, shape in zip(spec.layers, out_shapes, strict=True):
        shapes[layer.name] = shape
    steps: list[WiredStep] = []
    for chain in split_chains(spec):
        layers = tuple(spec.layers[i] for i in chain.layers)
        chain_shapes = [out_shapes[i] for i in chain.layers]
        ops: list[Op] = []
        if isinstance(layers[0], Add | Concat):
            ops.append(_merge_op(layers[0], chain_shapes[0]))
            start = Real(chain_shapes[0])
            layers, chain_shapes = layers[1:], chain_shapes[1:]
        else:
            start = Real(shapes[chain.sources[0]])
        at_input = chain.sources == (MODEL_INPUT,)
        more, state = compile_chain(layers, chain_shapes, start, tensors, spec, at_input=at_input)
        if not isinstance(state, Real):  # pragma: no cover - a chain ends where bits are read
            raise AssertionError("a chain ends on real values")
        ops += more
        name = spec.layers[chain.layers[-1]].name
        for k, op in enumerate(ops):
            inputs = chain.sources if k == 0 else (f"{name}#{k - 1}",)
            steps.append((op, inputs, name if k == len(ops) - 1 else f"{name}#{k}"))
    ops_in_order, wiring = wire(fuse_residual_adds(steps))
    return Program(ops=ops_in_order, input_shape=tuple(spec.input.shape), wiring=wiring)


WiredStep = tuple[Op, tuple[str, ...], str]  # an operation, its inputs' names, its output's


def fuse_residual_adds(steps: Sequence[WiredStep]) -> list[WiredStep]:
    """Each binary conv on the column kernel (``columns``) whose real output is read only by a
    two-input add becomes one ``residual`` operation in the add's place: it reads (bits,
    shortcut) and writes the add's output, the sum taken while the conv's values are still in
    registers (fl(conv + shortcut), as the add rounds it). Its bits were computed before the
    conv, so before the add too; nothing between them read the conv's output. Saves the add's
    pass over both values and one (N, O, OH, OW) array per block."""
    readers = Counter(name for _, inputs, _ in steps for name in inputs)
    fused, dropped = list(steps), set()
    for i, (op, inputs, output) in enumerate(steps):
        if not (isinstance(op, BinaryConv) and op.columns is not None and readers[output] == 1):
            continue
        j = next(j for j in range(i + 1, len(steps)) if output in steps[j][1])
        add, add_inputs, add_output = steps[j]
        if not (isinstance(add, RealAdd) and len(add_inputs) == 2) or len(set(add_inputs)) < 2:
            continue
        shortcut = add_inputs[1] if add_inputs[0] == output else add_inputs[0]
        fused[j] = (replace(op, residual=True), (*inputs, shortcut), add_output)
        dropped.add(i)
    return [step for k, step in enumerate(fused) if k not in dropped]


def compile_chain(
    layers: Sequence[Layer],
    out_shapes: Sequence[Shape],
    state: Bits | Real,
    tensors: Mapping[str, np.ndarray],
    spec: ModelSpec,
    *,
    at_input: bool,
) -> tuple[list[Op], Bits | Real]:
    """Operations for ``layers``, each taking the previous one's output, starting from a value
    of ``state``; ``out_shapes[i]`` is layer i's output shape. ``at_input``: the chain starts
    at the model input (its first dense layer may take integer bit-planes)."""
    ops: list[Op] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if not isinstance(layer, Dense | Conv2d):
            folded = _folded_quantize(layers[i:], state, tensors)
            if folded is not None:
                quantize, used = folded
                ops.append(quantize)
                state = quantize.decide.out
                i += used
                continue
            ops.append(_real_op(layer, tensors, out_shapes[i]))
            state = Real(out_shapes[i])
            i += 1
            continue
        j = i + 1
        while j < len(layers) and not isinstance(layers[j], Dense | Conv2d):
            j += 1
        tail, consumer = tuple(layers[i + 1 : j]), (layers[j] if j < len(layers) else None)
        state, prepared = _prepare_input(state, layer)
        ops.extend(prepared)
        first = at_input and all(isinstance(earlier, Flatten) for earlier in layers[:i])
        out_shape = out_shapes[i]
        # the loop above stopped at a Dense or Conv2d, if at anything
        quantizer = consumer.input_quantizer if isinstance(consumer, Dense | Conv2d) else None
        foldable = quantizer is not None and foldable_tail(tail, out_shape)
        producer = _producer(layer, state, tensors, out_shape, first, spec)
        epilogue: Epilogue
        if foldable:
            assert quantizer is not None  # foldable implies a quantizing consumer
            binarizer = binarizer_for(quantizer)
            spatial = out_shape
            for k in range(i + 1, j):
                if not isinstance(layers[k], Flatten):
                    spatial = out_shapes[k]
            epilogue = _decide(producer, tail, tensors, binarizer, spatial, layer)
            ops.append(producer.build(epilogue))
            state = epilogue.out
        else:
            # a BatchNorm right after the layer runs in its epilogue (rows in, rows out)
            batchnorm = (
                _bn_step(tail[0], tensors) if tail[:1] and isinstance(tail[0], BatchNorm) else None
            )
            epilogue = ToReal(affine=producer.affine, out=Real(out_shape), batchnorm=batchnorm)
            ops.append(producer.build(epilogue))
            state = Real(out_shape)
            for k, tail_layer in enumerate(tail, start=i + 1):
                if batchnorm is not None and k == i + 1:
                    continue
                ops.append(_real_op(tail_layer, tensors, out_shapes[k]))
                state = Real(out_shapes[k])
        i = j
    return ops, state


def _weight_columns(rows: np.ndarray, ep: Epilogue) -> np.ndarray | None:
    """A binary conv's weight rows (O, L) transposed to (L, O), cache-line aligned, where its
    popcounts feed real values (a :class:`ToReal` epilogue) and the CPU counts 512 bits per
    instruction (:data:`~model.engine.layout.WIDE_POPCOUNT`): there the column kernel
    (:func:`~model.engine.kernels.xor_popcount_columns`) beats the row kernels at every row
    length, 4–5× at 9 words (docs/benchmarks.md, "Engine design figures"). None elsewhere."""
    if not (WIDE_POPCOUNT and isinstance(ep, ToReal)):
        return None
    return aligned_copy(rows.T)


def program_nbytes(program: Program) -> int:
    """Bytes held by the program's arrays (weights, thresholds, masks); a view of an array
    already counted (a conv's row weights as its columns transposed) counts once."""
    total = 0
    seen: set[tuple[int, int]] = set()

    def visit(value: object) -> None:
        nonlocal total
        if isinstance(value, np.ndarray):
            buffer = (value.__array_interface__["data"][0], value.nbytes)
            if buffer not in seen:
                seen.add(buffer)
                total += value.nbytes
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                visit(getattr(value, name))
        elif isinstance(value, tuple):
            for item in value:
                visit(item)

    for op in program.ops:
        visit(op)
    return total


# --- helpers: inputs and producers ----------------------------------------------------------------
def _prepare_input(state: Bits | Real, layer: Dense | Conv2d) -> tuple[Bits | Real, list[Op]]:
    """Bring ``state`` to what ``layer`` consumes: bits for a quantized input, real otherwise."""
    if layer.input_quantizer is not None and isinstance(state, Real):
        binarizer = binarizer_for(layer.input_quantizer)
        channels = state.shape[0]
        bits = Bits(binarizer, state.shape, "nhwc" if len(state.shape) == 3 else "flat")
        thresholds = fold_batchnorm_into_thresholds([], binarizer, 1, integer=False)
        cut = np.full(channels, thresholds.cut[0], np.float64)
        invert = np.full(channels, bit_invert(thresholds, binarizer)[0], np.uint8)
        quantize = Quantize(Decide(cut=cut, invert=invert, pools=(), out=bits))
        if layer.kernel_quantizer is None and isinstance(layer, Conv2d):
            # real weights: convolve the quantized values (±1 or {0, 1}) as real numbers
            real = Real(state.shape)
            return real, [quantize, Unpack(input=bits, out=real)]
        return bits, [quantize]
    if layer.input_quantizer is None and isinstance(state, Bits):  # pragma: no cover
        raise AssertionError("bits are only produced for a quantizing consumer")
    if isinstance(state, Bits) and layer.kernel_quantizer is None and isinstance(layer, Conv2d):
        real = Real(_real_shape(state))
        return real, [Unpack(input=state, out=real)]
    return state, []


def _real_shape(bits: Bits) -> Shape:
    return bits.shape if bits.layout == "nhwc" else (bits.features,)


@dataclass
class _Producer:
    """What a dense/conv layer contributes before its epilogue is known."""

    build_fn: Callable[[Epilogue], Op]
    integer: bool  # raw is an exact integer accumulator compared in the popcount domain
    steps: Sequence[Step]  # per-channel float steps from raw to the layer's output
    affine: AffineStep | None
    channels: int
    popcount_domain: tuple[str, int, np.ndarray] | None  # (binarizer kind, K, pcw) for bits input

    def build(self, epilogue: Epilogue) -> Op:
        return self.build_fn(epilogue)


def _layer_vectors(layer: Dense | Conv2d, tensors: Mapping[str, np.ndarray]):
    bias = np.array(tensors[f"{layer.name}.bias"], np.float32) if layer.bias else None
    scale = np.array(tensors[f"{layer.name}.scale"], np.float32) if layer.scale else None
    return bias, scale


def _producer(
    layer: Dense | Conv2d,
    state: Bits | Real,
    tensors: Mapping[str, np.ndarray],
    out_shape: Shape,
    first: bool,
    spec: ModelSpec,
) -> _Producer:
    bias, scale = _layer_vectors(layer, tensors)
    weight = np.asarray(tensors[f"{layer.name}.weight"])
    channels = out_shape[0]
    binary = layer.kernel_quantizer is not None
    # raw = x∗W, then fl(fl(raw·scale) + bias). A conv without α adds its bias inside the
    # convolution (F.conv2d(x, w, bias)); with an exact integer raw that is the same rounding.
    affine = AffineStep(scale, bias) if (scale is not None or bias is not None) else None
    steps = [affine] if affine is not None else []

    if isinstance(state, Bits) and not binary:  # full-precision dense on binary input
        w_t, base, coef = _signed_weights(weight, state)

        def signed_dense(ep: Epilogue) -> Op:
            return SignedDense(layer.name, w_t, base, coef, state, ep)

        return _Producer(signed_dense, False, steps, affine, channels, None)

    if isinstance(state, Bits):
        if isinstance(layer, Dense):
            w = _dense_weight_for(weight, layer.in_features, state)
            pcw = _popcounts(w)
            k = layer.in_features

            def build_bits(ep: Epilogue) -> Op:
                return BinaryDense(layer.name, w, pcw, k, state, ep)
        else:
            c, (kh, kw) = layer.in_channels, layer.kernel_size
            wc = words_for(c)
            # stored (O, kh, kw, Wc) → (O, kh·kw·Wc), the im2col word order
            rows = weight.reshape(layer.out_channels, kh * kw * wc)
            w = pad_rows(rows)
            pcw = _popcounts(w)
            k = c * kh * kw
            pad_words = _pad_words(layer.pad_value, state.binarizer, c)

            def build_bits(ep: Epilogue) -> Op:
                columns = _weight_columns(rows, ep)
                return BinaryConv(
                    layer.name, w if columns is None else columns.T, pcw, k, state,
                    layer.kernel_size, layer.stride, layer.padding, pad_words,
                    (out_shape[1], out_shape[2]), ep, columns,
                )  # fmt: skip

        domain = (state.binarizer.kind, k, pcw)
        return _Producer(build_bits, True, steps, affine, channels, domain)

    # real input
    if isinstance(layer, Dense):
        if first and binary and spec.input.integer_valued and _plane_range_ok(spec):
            w = pad_rows(weight)
            pcw = _popcounts(w)

            def planes_dense(ep: Epilogue) -> Op:
                return PlanesDense(layer.name, w, pcw, layer.in_features, ep)

            return _Producer(planes_dense, False, steps, affine, channels, None)

        w = np.ascontiguousarray(weight if binary else weight.astype(np.float32).T)

        def float_dense(ep: Epilogue) -> Op:
            return FloatDense(layer.name, w, layer.in_features, None, ep)

        return _Producer(float_dense, False, steps, affine, channels, None)

    # Conv2d on real values: without α the bias goes into raw (as F.conv2d adds it).
    bias_in_raw = bias if scale is None else None
    if scale is None:
        affine, steps = None, []
    if binary:
        w = np.ascontiguousarray(weight)
    else:
        w = np.ascontiguousarray(
            weight.astype(np.float32).transpose(2, 3, 1, 0).reshape(-1, layer.out_channels)
        )  # (kh·kw·C, O), rows in (dy, dx, c) order

    def float_conv(ep: Epilogue) -> Op:
        return FloatConv(
            layer.name, w, tuple(state.shape), layer.kernel_size, layer.stride, layer.padding,
            float(layer.pad_value), (out_shape[1], out_shape[2]), bias_in_raw, ep,
        )  # fmt: skip

    return _Producer(float_conv, False, steps, affine, channels, None)


def _plane_range_ok(spec: ModelSpec) -> bool:
    value_range = spec.input.value_range
    return value_range is None or (value_range[0] >= 0 and value_range[1] <= MAX_PLANE_VALUE)


def _dense_weight_for(weight: np.ndarray, features: int, bits: Bits) -> np.ndarray:
    """Packed dense weights in the word layout of the incoming bits."""
    if bits.layout != "hwc":
        # an owned, writable copy: artifact views are read-only, which numba would compile
        # as a separate kernel signature
        return aligned_copy(weight)
    c, h, w = bits.shape
    signs = unpack_signs(weight, features, axis=1, dtype=np.int8)  # (O, C·H·W)
    signs = signs.reshape(-1, c, h, w).transpose(0, 2, 3, 1)  # (O, H, W, C)
    return aligned_copy(pack_signs(signs, axis=-1).reshape(signs.shape[0], -1))


def _signed_weights(weight: np.ndarray, bits: Bits) -> tuple[np.ndarray, np.ndarray, float]:
    """Float weights (O, F) → (Wᵀ in the bits' word layout, base, coef) for SignedDense."""
    w = np.asarray(weight, np.float32)
    o = w.shape[0]
    if bits.layout == "hwc":
        c, h, wd = bits.shape
        grid = np.zeros((h, wd, words_for(c) * 64, o), np.float32)
        grid[:, :, :c, :] = w.reshape(o, c, h, wd).transpose(2, 3, 1, 0)
        w_t = grid.reshape(-1, o)
    else:
        w_t = np.zeros((words_for(bits.features) * 64, o), np.float32)
        w_t[: bits.features] = w.T
    if bits.binarizer is SIGN:  # Σ ±1·W = ΣW − 2·Σ_{−1} W
        return w_t, w.astype(np.float64).sum(axis=1), -2.0
    return w_t, np.zeros(o, np.float64), 1.0


def _popcounts(words: np.ndarray) -> np.ndarray:
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(words.shape[0], -1)
    return np.unpackbits(as_bytes, axis=1).sum(axis=1, dtype=np.int64)


def _pad_words(pad_value: float, binarizer: Binarizer, channels: int) -> np.ndarray:
    """The words of one padded position: every channel bit set iff pad_value encodes as 1."""
    bit_set = pad_value < 0 if binarizer is SIGN else pad_value > 0
    bits = np.full(channels, -1.0 if bit_set else 1.0, np.float32)
    return pack_signs(bits)


# --- helpers: epilogues ---------------------------------------------------------------------------
def foldable_tail(tail: tuple[Layer, ...], out_shape: Shape) -> bool:
    """BatchNorm / max-pool / flatten in the producer's channel space fold into thresholds."""
    flattened = False
    for layer in tail:
        if isinstance(layer, Flatten):
            flattened = flattened or len(out_shape) == 3
            continue
        per_channel = isinstance(layer, BatchNorm | MaxPool2d | Shift) and not flattened
        if not per_channel:
            return False
    return True


def _decide(
    producer: _Producer,
    tail: tuple[Layer, ...],
    tensors: Mapping[str, np.ndarray],
    binarizer: Binarizer,
    spatial_shape: Shape,
    layer: Dense | Conv2d,
) -> Decide:
    """Fold the tail into thresholds (and bit pools); ``spatial_shape`` is the shape before any
    flatten in the tail."""
    channels = producer.channels
    steps = list(producer.steps)
    pool_specs: list[tuple[MaxPool2d, int]] = []
    flattened = False
    for tail_layer in tail:
        if isinstance(tail_layer, BatchNorm):
            steps.append(_bn_step(tail_layer, tensors))
        elif isinstance(tail_layer, Shift):
            steps.append(_shift_step(tail_layer, tensors))
        elif isinstance(tail_layer, MaxPool2d):
            pool_specs.append((tail_layer, len(steps)))
        else:
            flattened = flattened or isinstance(layer, Conv2d)
    domain = producer.popcount_domain
    thresholds = fold_batchnorm_into_thresholds(
        steps, binarizer, channels, integer=domain is not None
    )
    invert = bit_invert(thresholds, binarizer)
    cut: np.ndarray
    if domain is not None:
        cut, invert = _to_popcount_domain(thresholds, invert, domain)
    else:
        cut = thresholds.cut.astype(np.float64)
    pools = tuple(
        BitPool(
            pool.kernel_size,
            pool.stride,
            pack_signs(np.where(pool_and_mask(steps[at:], channels, binarizer), -1.0, 1.0)),
        )
        for pool, at in pool_specs
    )
    if isinstance(layer, Conv2d):
        out = Bits(binarizer, spatial_shape, "hwc" if flattened else "nhwc")
    else:
        out = Bits(binarizer, (channels,), "flat")
    return Decide(cut=cut, invert=invert.astype(np.uint8), pools=pools, out=out)


def _to_popcount_domain(
    thresholds: Thresholds, invert: np.ndarray, domain: tuple[str, int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """acc ≥ U as a compare on P = popcount(a XOR w).

    sign input: acc = K − 2P ≥ U ⇔ P ≤ ⌊(K − U)/2⌋ ⇔ NOT (P ≥ ⌊(K − U)/2⌋ + 1).
    step input: acc = P − pcw ≥ U ⇔ P ≥ U + pcw.
    """
    kind, k, pcw = domain
    u = thresholds.cut.astype(np.int64)
    if kind == "sign":
        return (k - u) // 2 + 1, ~invert.astype(bool)
    return u + pcw, invert.astype(bool)


def _bn_step(layer: BatchNorm, tensors: Mapping[str, np.ndarray]) -> BatchNormStep:
    t = {s: tensors[f"{layer.name}.{s}"] for s in ("weight", "bias", "running_mean", "running_var")}
    return BatchNormStep.from_stats(
        t["weight"], t["bias"], t["running_mean"], t["running_var"], layer.eps
    )


def _real_op(layer: Layer, tensors: Mapping[str, np.ndarray], out_shape: Shape) -> Op:
    if isinstance(layer, BatchNorm):
        step = _bn_step(layer, tensors)
        return RealBatchNorm(step.alpha, step.beta)
    if isinstance(layer, MaxPool2d):
        return RealMaxPool(layer.kernel_size, layer.stride)
    if isinstance(layer, Flatten):
        return RealFlatten(Real(out_shape))
    if isinstance(layer, AvgPool2d):
        return RealAvgPool(layer.kernel_size, layer.stride)
    if isinstance(layer, GlobalAvgPool2d):
        return RealGlobalAvgPool(Real(out_shape))
    if isinstance(layer, Shift):
        return RealShift(_vector(tensors, f"{layer.name}.shift"))
    if isinstance(layer, PReLU):
        return RealPReLU(_vector(tensors, f"{layer.name}.weight"))
    raise AssertionError(f"unexpected layer {layer!r}")  # pragma: no cover


def _merge_op(layer: Add | Concat, out_shape: Shape) -> Op:
    return RealAdd(Real(out_shape)) if isinstance(layer, Add) else RealConcat(Real(out_shape))


def _vector(tensors: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    return np.array(tensors[key], np.float32)  # an owned float32 copy


def _shift_step(layer: Shift, tensors: Mapping[str, np.ndarray]) -> AffineStep:
    """A shift is eager's ``x + shift``: the affine step fl(x + bias) without a scale."""
    return AffineStep(None, _vector(tensors, f"{layer.name}.shift"))


def _folded_quantize(
    rest: Sequence[Layer], state: Bits | Real, tensors: Mapping[str, np.ndarray]
) -> tuple[Quantize, int] | None:
    """Shifts and BatchNorms on a real value right before a quantizing dense/conv layer fold
    into one per-channel cut on that value (ReActNet's RSign: sign(x + s) ⇔ x ≥ cut, where cut
    is found over every float32 x, so the decision is eager's ``fl(x + s) ≥ 0`` bit for bit).
    Returns the Quantize and the number of layers it replaces, or None."""
    count = 0
    while count < len(rest) and isinstance(rest[count], Shift | BatchNorm):
        count += 1
    if not isinstance(state, Real) or count == 0 or count == len(rest):
        return None
    consumer = rest[count]
    if not isinstance(consumer, Dense | Conv2d) or consumer.input_quantizer is None:
        return None
    folded = [
        layer for layer in rest[:count] if isinstance(layer, Shift | BatchNorm)
    ]  # all of them
    steps: list[Step] = [
        _bn_step(layer, tensors) if isinstance(layer, BatchNorm) else _shift_step(layer, tensors)
        for layer in folded
    ]
    binarizer = binarizer_for(consumer.input_quantizer)
    channels = state.shape[0]
    thresholds = fold_batchnorm_into_thresholds(steps, binarizer, channels, integer=False)
    invert = bit_invert(thresholds, binarizer).astype(np.uint8)
    bits = Bits(binarizer, state.shape, "nhwc" if len(state.shape) == 3 else "flat")
    decide = Decide(cut=thresholds.cut.astype(np.float64), invert=invert, pools=(), out=bits)
    return Quantize(decide), count
