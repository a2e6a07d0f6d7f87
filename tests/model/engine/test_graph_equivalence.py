"""v2 layer graphs (Bi-Real / ReActNet / concat joins) in both backends against eager torch.

The policy (issue 11, §6): where every input of a layer is an integer or ±1 the engine is exact
(same class, logits within 1e-4 relative to the row's largest logit). These graphs start with a
full-precision stem conv that feeds a sign (directly, and through the float residual sums), and
the engine rounds its float32 sums in another order than eager torch, so a decision whose
threshold lies between the two roundings may flip: a *tie*. Bound: ≥ 99.9% of rows with eager's
class and ≥ 99.5% with logits within 1e-4. The measured tie rates are in docs/benchmarks.md
(``python -m bench graph``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model.engine.compiler import compile_program  # noqa: E402
from model.engine.cpu import NumbaExecutor  # noqa: E402
from model.engine.graph import split_chains  # noqa: E402
from model.engine.ops import Quantize, RealShift, ToReal  # noqa: E402
from model.engine.torch_backend import TorchExecutor  # noqa: E402
from model.spec import (  # noqa: E402
    MODEL_INPUT,
    Conv2d,
    Dense,
    Flatten,
    InputSpec,
    ModelSpec,
    Shift,
)
from tests.model.engine.reference import bireal_spec, eager_logits, random_tensors  # noqa: E402

LOGIT_TOLERANCE = 1e-4
MIN_SAME_CLASS = 0.999
MIN_CLOSE_LOGITS = 0.995

VARIANTS = {
    "birealnet": {},
    "reactnet": {"reactnet": True},
    "concat": {"concat": True},
    "reactnet-concat": {"reactnet": True, "concat": True, "blocks": 2},
}
SHAPES = {
    "digits": ((1, 8, 8), (0.0, 16.0), (8, 16)),
    "fashion": ((1, 28, 28), (0.0, 255.0), (8, 16, 24)),
    "cifar": ((3, 32, 32), (0.0, 255.0), (8, 16, 24)),
}


def executor(program, backend: str):
    return NumbaExecutor(program) if backend == "numba" else TorchExecutor(program, "cpu")


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(fraction of rows with eager's class, fraction with logits within the tolerance)."""
    error = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    same = float((got.argmax(1) == want.argmax(1)).mean())
    return same, float((error <= LOGIT_TOLERANCE).mean())


def check_graph(shape_name: str, variant: str, backend: str, rows: int, seed: int = 0) -> None:
    shape, value_range, widths = SHAPES[shape_name]
    spec = bireal_spec(shape, widths, value_range=value_range, **VARIANTS[variant])
    spec.validate()
    rng = np.random.default_rng(seed)
    tensors = random_tensors(spec, rng)
    program = compile_program(spec, tensors)
    low, high = value_range
    x = rng.integers(int(low), int(high) + 1, size=(rows, *shape)).astype(np.float32)
    got = executor(program, backend).run(x)
    same, close = agreement(got, eager_logits(spec, tensors, x))
    assert same >= MIN_SAME_CLASS, f"{same:.2%} of rows with eager's class"
    assert close >= MIN_CLOSE_LOGITS, f"{close:.2%} of rows with logits within 1e-4"


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_digits_graphs(variant, backend):
    # the torch backend on the CPU sums its real layers in float64: slower, fewer rows
    check_graph("digits", variant, backend, rows=1000 if backend == "numba" else 300)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("shape_name", ["fashion", "cifar"])
def test_image_graphs(shape_name, backend):
    check_graph(shape_name, "reactnet-concat", backend, rows=32)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape_name", ["fashion", "cifar"])
def test_image_graphs_many_rows(shape_name, variant, backend):
    check_graph(shape_name, variant, backend, rows=1000, seed=1)


@pytest.mark.parametrize("batch", [1, 3])
def test_both_backends_agree_at_small_batches(batch):
    spec = bireal_spec(reactnet=True, concat=True)
    rng = np.random.default_rng(3)
    tensors = random_tensors(spec, rng)
    program = compile_program(spec, tensors)
    x = rng.integers(0, 17, size=(batch, 1, 8, 8)).astype(np.float32)
    want = eager_logits(spec, tensors, x)
    for backend in ("numba", "torch"):
        same, close = agreement(executor(program, backend).run(x), want)
        assert (same, close) == (1.0, 1.0), backend


# --- RSign: a shift folded into the quantizer's cut --------------------------------------------
def rsign_spec(channels: int = 5) -> ModelSpec:
    """input → shift → binary conv → flatten → fp dense: every decision after the shift is on
    ±1 values, so the logits are exact wherever the shift's decisions are."""
    return ModelSpec(
        name="rsign",
        architecture="test",
        input=InputSpec(shape=(channels, 4, 4), value_range=(-4.0, 4.0), integer_valued=False),
        labels=tuple("abc"),
        layers=(
            Shift(name="rsign", num_features=channels),
            Conv2d(
                name="conv",
                in_channels=channels,
                out_channels=7,
                input_quantizer="ste_sign",
                kernel_quantizer="ste_sign",
                bias=False,
            ),
            Flatten(name="flat"),
            Dense(name="fc", in_features=7 * 16, out_features=3),
        ),
    )


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_shift_before_sign_decides_as_eager_at_every_rounding_boundary(backend):
    """sign(fl(x + s)) where x is −s and its float32 neighbours: the cases where the rounding
    of x + s decides the sign (x + s rounds to 0 or to a tiny value of either sign)."""
    spec = rsign_spec()
    rng = np.random.default_rng(0)
    tensors = random_tensors(spec, rng)
    shift = tensors["rsign.shift"]
    program = compile_program(spec, tensors)
    assert isinstance(program.ops[0], Quantize) and not isinstance(program.ops[1], RealShift)
    near = -shift.reshape(1, -1, 1, 1) * np.ones((64, 1, 4, 4), np.float32)
    steps = rng.integers(-3, 4, size=near.shape)
    x = near.astype(np.float32)
    for _ in range(3):  # walk up to three ulps either way
        x = np.where(
            steps > 0, np.nextafter(x, np.inf), np.where(steps < 0, np.nextafter(x, -np.inf), x)
        )
        steps = steps - np.sign(steps)
    x = x.astype(np.float32)
    got = executor(program, backend).run(x)
    want = eager_logits(spec, tensors, x)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got, want, rtol=LOGIT_TOLERANCE, atol=1e-5)


# --- the graph's structure ----------------------------------------------------------------------
def test_chains_end_where_a_value_has_several_readers():
    spec = bireal_spec(widths=(8, 16), reactnet=True)
    names = [[spec.layers[i].name for i in chain.layers] for chain in split_chains(spec)]
    # the stem's output feeds the first block's RSign and its shortcut: a chain of its own
    assert names[0] == ["stem", "stem_bn"]
    assert ["s0b0_rsign", "s0b0_conv", "s0b0_bn"] in names
    assert ["s0b0_add", "s0b0_rp_in", "s0b0_rp", "s0b0_rp_out"] in names
    assert ["s1b0_pool", "s1b0_down", "s1b0_down_bn"] in names
    sources = {chain.layers[0]: chain.sources for chain in split_chains(spec)}
    assert sources[0] == (MODEL_INPUT,)


@pytest.mark.parametrize("wide", [False, True])
def test_block_compiles_to_quantize_binary_conv_add_with_batchnorm_in_the_epilogue(
    monkeypatch, wide
):
    """Where the CPU counts 512 bits at once (the column kernel), the add joins the conv."""
    from model.engine import compiler

    monkeypatch.setattr(compiler, "WIDE_POPCOUNT", wide)
    spec = bireal_spec(widths=(8,), blocks=1)
    program = compile_program(spec, random_tensors(spec, np.random.default_rng(0)))
    kinds = [type(op).__name__ for op in program.ops]
    add = [] if wide else ["RealAdd"]
    assert kinds == ["FloatConv", "Quantize", "BinaryConv", *add, "RealGlobalAvgPool", "FloatDense"]
    stem, conv = program.ops[0], program.ops[2]
    assert conv.residual is wide
    assert isinstance(conv.epilogue, ToReal) and conv.epilogue.batchnorm is not None
    assert isinstance(stem.epilogue, ToReal) and stem.epilogue.batchnorm is not None


def test_values_are_released_after_their_last_reader():
    """A residual stack holds at most a block's input, its branch and its shortcut at once,
    however deep it is."""
    spec = bireal_spec(widths=(8, 16, 24), blocks=3, reactnet=True)
    program = compile_program(spec, random_tensors(spec, np.random.default_rng(0)))
    live, peak = {0}, 1
    for wiring in program.wiring:
        live.add(wiring.output)
        peak = max(peak, len(live))
        live -= set(wiring.release)
    assert live == {program.wiring[-1].output}
    assert peak <= 3


def test_v1_chains_compile_without_wiring():
    from tests.model.engine.reference import cnn_spec

    spec = cnn_spec()
    program = compile_program(spec, random_tensors(spec, np.random.default_rng(0)))
    assert program.wiring is None


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("variant", ["birealnet", "reactnet", "concat"])
def test_column_kernel_and_fused_residual_adds_give_the_plain_programs_bits(
    monkeypatch, backend, variant
):
    """With the column kernel forced on (as on an AVX-512 VPOPCNTDQ CPU; it runs, slower,
    anywhere), every binary conv whose output only feeds a two-input add takes the add into
    its epilogue (``residual``): no such add is left, and the logits are the bits of the
    program compiled without columns, in both backends. Widths 32 and 40: whole blocks of 32
    channels and edges."""
    from model.engine import compiler
    from model.engine.ops import BinaryConv, RealAdd

    spec = bireal_spec(
        input_shape=(3, 16, 16), widths=(32, 40), value_range=(0.0, 255.0), **VARIANTS[variant]
    )
    tensors = random_tensors(spec, np.random.default_rng(7))
    x = np.random.default_rng(8).integers(0, 256, size=(5, 3, 16, 16)).astype(np.float32)
    monkeypatch.setattr(compiler, "WIDE_POPCOUNT", False)
    plain = compile_program(spec, tensors)
    monkeypatch.setattr(compiler, "WIDE_POPCOUNT", True)
    fused = compile_program(spec, tensors)
    residual = [op for op in fused.ops if isinstance(op, BinaryConv) and op.residual]
    assert residual and all(op.columns is not None for op in residual)
    adds = sum(isinstance(op, RealAdd) for op in plain.ops)
    assert sum(isinstance(op, RealAdd) for op in fused.ops) == adds - len(residual)
    assert not any(isinstance(op, BinaryConv) and op.columns is not None for op in plain.ops)
    want = executor(plain, backend).run(x)
    np.testing.assert_array_equal(executor(fused, backend).run(x), want)
    if backend == "numba":  # the parallel kernels too: rows split between threads
        from model.engine.kernels import PARALLEL

        np.testing.assert_array_equal(executor(fused, backend).run(x, PARALLEL), want)


def test_column_kernel_refuses_input_bits_that_do_not_fit_the_conv(monkeypatch):
    """The column kernels read patch words at offsets computed from the input's shape, with no
    bounds checks: bits of another size are refused before any read."""
    from model.engine import compiler
    from model.engine.kernels import SERIAL
    from model.engine.ops import BinaryConv

    monkeypatch.setattr(compiler, "WIDE_POPCOUNT", True)
    spec = bireal_spec(input_shape=(3, 16, 16), widths=(32,))
    program = compile_program(spec, random_tensors(spec, np.random.default_rng(0)))
    conv = next(op for op in program.ops if isinstance(op, BinaryConv) and op.columns is not None)
    executor = NumbaExecutor(program)
    h, w = conv.out_hw
    shortcut = np.zeros((1, 32, h, w), np.float32)
    for shape in [(1, h + 2, w, 1), (1, h, w, 2)]:  # too tall; two words a position, not one
        bits = np.zeros(shape, np.uint64)
        with pytest.raises(AssertionError, match="do not fit"):
            executor.execute(conv, (bits, shortcut) if conv.residual else bits, SERIAL)
