"""Engine outputs equal the eager torch model rebuilt from the same artifact.

For every architecture and quantizer training offers: identical predicted classes and logits
within 1e-4 (relative to each row's largest logit), on the digits test set and on random integer
pixels, for batch sizes 1, 7, 64 and 1000, widths that are not multiples of 64, pad ±1 (and
0/1 for the step quantizer), with and without α. BatchNorm statistics are randomized (negative
and zero weights) so threshold folding is exercised in every direction.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model import InputSpec  # noqa: E402
from training.architectures import CNNConfig, MLPConfig  # noqa: E402

DIGITS = InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0), integer_valued=True)
MNIST = InputSpec(shape=(1, 28, 28), value_range=(0.0, 255.0), integer_valued=True)
RGB = InputSpec(shape=(3, 12, 12), value_range=(0.0, 255.0), integer_valued=True)
SIGN = ("ste_sign", "clipped_ste", "approx_sign", "swish_sign")

MLPS = [
    MLPConfig(hidden=(100, 70), activation_quantizer=q, kernel_quantizer=k, scale=s)
    for q, k, s in [
        ("ste_sign", "ste_sign", False),
        ("clipped_ste", "approx_sign", True),
        ("approx_sign", "swish_sign", False),
        ("swish_sign", "clipped_ste", True),
        ("stochastic_binary", "ste_sign", False),
        ("stochastic_binary", "swish_sign", True),
    ]
]
CNNS = [
    CNNConfig(
        stem_channels=20,
        channels=(70, 33),
        pool=(True, False),
        hidden=(40,),
        activation_quantizer=q,
        kernel_quantizer=k,
        pad_value=pad,
        scale=s,
    )
    for q, k, pad, s in [
        ("ste_sign", "ste_sign", 1.0, False),
        ("clipped_ste", "approx_sign", -1.0, True),
        ("approx_sign", "swish_sign", -1.0, False),
        ("swish_sign", "clipped_ste", 1.0, True),
        ("stochastic_binary", "ste_sign", 0.0, True),
        ("stochastic_binary", "approx_sign", 1.0, False),
    ]
]
BATCHES = (1, 7, 64, 1000)


def eager_logits(eager, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return eager(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def assert_same(engine_logits: np.ndarray, reference: np.ndarray) -> None:
    assert engine_logits.dtype == np.float32
    assert engine_logits.shape == reference.shape
    np.testing.assert_array_equal(engine_logits.argmax(1), reference.argmax(1))
    scale = np.abs(reference).max(axis=1, keepdims=True)
    error = np.abs(engine_logits - reference) / scale
    assert error.max() <= 1e-4, f"largest relative logit error {error.max():.3g} > 1e-4"


def random_pixels(spec: InputSpec, batch: int, seed: int) -> np.ndarray:
    low, high = spec.value_range
    rng = np.random.default_rng(seed)
    return rng.integers(int(low), int(high) + 1, size=(batch, *spec.shape)).astype(np.float32)


def config_id(config) -> str:
    extra = f"-pad{config.pad_value:+g}" if isinstance(config, CNNConfig) else ""
    return (
        f"{config.arch}-{config.activation_quantizer}-{config.kernel_quantizer}"
        f"{extra}{'-alpha' if config.scale else ''}"
    )


@pytest.mark.parametrize("config", MLPS + CNNS, ids=config_id)
def test_digits_test_set(compiled, digits_test, config):
    model, eager = compiled(config, DIGITS)
    assert_same(model.predict(digits_test.x), eager_logits(eager, digits_test.x))


@pytest.mark.parametrize("config", MLPS + CNNS, ids=config_id)
def test_random_pixels_every_batch_size(compiled, config):
    model, eager = compiled(config, DIGITS)
    for batch in BATCHES:
        x = random_pixels(DIGITS, batch, seed=batch)
        assert_same(model.predict(x), eager_logits(eager, x))


@pytest.mark.parametrize("config", MLPS + CNNS, ids=config_id)
def test_serial_and_parallel_kernels_agree(compiled, config):
    """Small calls run the serial twins of the kernels: the same logits, bit for bit."""
    from model.engine.cpu import NumbaExecutor
    from model.engine.kernels import PARALLEL, SERIAL

    model, _ = compiled(config, DIGITS)
    executor = NumbaExecutor(model.program)
    x = model.check_input(random_pixels(DIGITS, 7, seed=7))
    np.testing.assert_array_equal(executor.run(x, SERIAL), executor.run(x, PARALLEL))


@pytest.mark.parametrize(
    ("config", "spec"),
    [
        (MLPConfig(hidden=(200, 130)), MNIST),
        (MLPConfig(hidden=(200,), activation_quantizer="stochastic_binary", scale=True), MNIST),
        (CNNConfig(stem_channels=16, channels=(65, 129), pool=(True, True), pad_value=-1.0), RGB),
    ],
    ids=["mlp-mnist-8-planes", "mlp-mnist-step-alpha", "cnn-rgb-65-129-channels"],
)
def test_byte_pixels(compiled, config, spec):
    model, eager = compiled(config, spec)
    for batch in (1, 64):
        x = random_pixels(spec, batch, seed=batch)
        assert_same(model.predict(x), eager_logits(eager, x))


def test_flat_input_equals_image_input(compiled, digits_test):
    model, _ = compiled(MLPS[0], DIGITS)
    x = digits_test.x[:50]
    np.testing.assert_array_equal(model.predict(x.reshape(50, -1)), model.predict(x))


@pytest.mark.parametrize(
    ("config", "spec"),
    [(MLPS[1], DIGITS), (CNNS[1], DIGITS), (MLPConfig(hidden=(200, 130)), MNIST)],
    ids=[config_id(MLPS[1]), config_id(CNNS[1]), "mlp-mnist-padded-rows"],
)
def test_non_integer_inputs_take_the_float_path(compiled, config, spec):
    """Inputs that are not integers cannot use bit-planes; the float path still matches eager
    (within float32 summation error, so classes are compared, logits loosely). MNIST's 784
    features fill 13 words, padded to 16 in the weight rows."""
    model, eager = compiled(config, spec)
    high = spec.value_range[1]
    x = np.random.default_rng(3).uniform(0, high, size=(64, *spec.shape)).astype(np.float32)
    got, want = model.predict(x), eager_logits(eager, x)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
    assert np.allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())


@pytest.mark.parametrize(
    ("config", "spec"),
    [*((config, DIGITS) for config in MLPS), (MLPConfig(hidden=(200, 130)), MNIST)],
    ids=[*(config_id(config) for config in MLPS), "mlp-mnist-padded-rows"],
)
def test_small_mlp_batches_in_one_call_equal_layer_by_layer(compiled, config, spec):
    """Below serial_rows an mlp runs in one kernel call (fused.mlp_rows): the same logits as
    the layers one by one, bit for bit, for integer inputs; others fall back to the layers."""
    from model.engine.kernels import SERIAL

    model, _ = compiled(config, spec)
    executor = model._executor
    assert executor._mlp is not None
    for batch in range(1, min(executor._dispatch.serial_rows, 9)):
        pixels = random_pixels(spec, batch, seed=batch)
        fractional = pixels + np.float32(0.5)
        for x in (pixels, fractional):
            x = model.check_input(x)
            np.testing.assert_array_equal(executor.run(x), executor.run(x, SERIAL))
    assert executor._mlp.run(model.check_input(fractional)) is None
