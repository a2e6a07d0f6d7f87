"""Resource bounds at load: the memory bound computed from the spec, the refusal before any big
allocation, and the bound holding for what a call really allocates."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from model import load_model, write_artifact
from model.engine import WARMUP_CALLS
from model.engine.memory import MemoryLimit, check_memory, estimate_memory
from model.engine.warm import random_tensors
from model.errors import ModelTooLargeError
from model.spec import (
    MODEL_INPUT,
    Add,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool2d,
    InputSpec,
    MaxPool2d,
    ModelSpec,
    Shift,
)
from tests.model.engine.reference import bireal_spec
from tests.model.engine.test_graphs import GRAPHS
from tests.model.factory import tiny_spec, tiny_tensors


def padded_conv_spec(padding: int) -> ModelSpec:
    """The hostile artifact of the issue: a 1×1 conv padding ``padding`` on each side, then a
    (2·padding + 1)² max-pool: a few bytes of weights, an image of (2·padding + 1)² per instance."""
    side = 2 * padding + 1
    return ModelSpec(
        name=f"pad{padding}",
        architecture="hostile",
        input=InputSpec(shape=(1, 1, 1), value_range=(0.0, 1.0)),
        labels=("a", "b"),
        layers=(
            Conv2d("conv", 1, 1, kernel_size=(1, 1), padding=(padding, padding), pad_value=0.0),
            MaxPool2d("pool", kernel_size=(side, side), stride=(1, 1)),
            Flatten("flatten"),
            Dense("out", 1, 2),
        ),
    )


def write(tmp_path, spec: ModelSpec):
    path = tmp_path / f"{spec.name}.safetensors"
    write_artifact(path, spec, random_tensors(spec))
    return path


def traced_peak(call) -> int:
    """Peak bytes numpy (and Python) allocate during ``call()`` above what was live before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_the_formula_on_a_model_computed_by_hand():
    spec = ModelSpec(
        name="linear",
        architecture="mlp",
        input=InputSpec(shape=(1, 8, 8)),
        labels=tuple("0123456789"),
        layers=(Flatten("flatten"), Dense("fc", 64, 10)),
    )
    estimate = estimate_memory(spec)
    # stored: weight 10·64·4 + bias 10·4; real weights: 12 bytes each at 64 padded features
    assert estimate.weight_bytes == 2560 + 40 + 12 * 10 * 64
    # 8·64 input values + the flatten's 8·(2·64) + 24·64 (above the dense's 8·(2·64) + 24·10)
    assert estimate.activation_bytes_per_instance == 512 + 1024 + 1536
    assert estimate.peak_bytes(3) == 10280 + 3 * 3072


def test_binary_inputs_cost_bits_on_the_cpu_and_more_on_torch():
    spec = tiny_spec()
    numba, torch = estimate_memory(spec, "numba"), estimate_memory(spec, "torch")
    # conv1, the largest layer: binary input of 5 channels padded to 64 (2·64·6·6 values at
    # 1/8 byte), padded input 64·8·8 and 36 patches of 3·3·64 (at 1/4 byte), output folded into
    # fc's binarizer (70·6·6 values at 1 byte)
    conv1 = (2 * 64 * 36) // 8 + (2 * 64 * 64 + 36 * 9 * 64) // 4 + 70 * 36
    assert numba.activation_bytes_per_instance == 8 * 36 + conv1
    assert torch.activation_bytes_per_instance > 20 * numba.activation_bytes_per_instance
    assert torch.weight_bytes > numba.weight_bytes


def test_the_padding_2000_model_is_refused_before_any_big_allocation(tmp_path):
    path = write(tmp_path, padded_conv_spec(2000))
    limit = MemoryLimit(max_bytes=2 * 1024**3, max_batch=64)

    def load() -> None:
        with pytest.raises(ModelTooLargeError, match=r"at a batch of 64.*limit is 2\.00 GiB"):
            load_model(path, memory_limit=limit)

    assert traced_peak(load) < 16 * 1024**2  # the warm-up of this model allocated 7.6 GiB


def test_the_padding_300_model_is_refused_at_the_largest_batch(tmp_path):
    path = write(tmp_path, padded_conv_spec(300))
    with pytest.raises(ModelTooLargeError, match="at a batch of 1024"):
        load_model(path, memory_limit=MemoryLimit(max_bytes=4 * 1024**3, max_batch=1024))


@pytest.mark.parametrize(
    ("spec", "tensors", "batch"),
    [
        (padded_conv_spec(300), None, 2),  # 601×601 images: real-valued im2col and max-pool
        (tiny_spec(), tiny_tensors(), 64),  # binary convolutions, folded BatchNorm and pools
        (GRAPHS["quantized-input-real-weight-conv"], None, 64),  # sign(x) convolved as floats
        (GRAPHS["quantized-model-input"], None, 64),  # sign(x) quantized from the real input
        (GRAPHS["real-valued-middle"], None, 64),  # binary weights on real values
        (GRAPHS["strides-and-kernels"], None, 64),  # 5×5 stride 2, 1×1, 3×3 pools
    ],
    ids=[
        "padding-300",
        "tiny-cnn",
        "quantized-input-conv",
        "quantized-input-dense",
        "real-middle",
        "strides-and-kernels",
    ],
)
def test_the_bound_holds_for_what_a_call_allocates(tmp_path, spec, tensors, batch):
    path = tmp_path / "model.safetensors"
    write_artifact(path, spec, tensors if tensors is not None else random_tensors(spec))
    limit = MemoryLimit(max_bytes=4 * 1024**3, max_batch=batch)
    model = load_model(path, memory_limit=limit)
    estimate = check_memory(spec, limit)
    x = np.random.default_rng(0).uniform(0, 1, (batch, *spec.input.shape)).astype(np.float32)
    # compiled kernels are not part of the measurement: measured dispatch runs a large call's
    # first four calls on the parallel and then the serial kernels, so warm both
    for _ in range(WARMUP_CALLS):
        model.predict(x)
    allocated = traced_peak(lambda: model.predict(x))
    assert 0 < allocated <= estimate.peak_bytes(batch)  # (weights: per-call copies included)


def test_no_limit_means_no_check(tmp_path):
    path = write(tmp_path, padded_conv_spec(300))
    model = load_model(path, memory_limit=None)
    assert model.predict(np.ones((1, 1, 1, 1), np.float32)).shape == (1, 2)


# --- graphs (format v2): values kept alive for later consumers -------------------------------
def two_branch_spec() -> ModelSpec:
    """Two shifted copies of the input, each reduced by a global average pool, then added: the
    first copy stays alive while the second is computed."""
    return ModelSpec(
        name="branches",
        architecture="graph",
        input=InputSpec(shape=(1, 8, 8), value_range=(0.0, 1.0)),
        labels=("a", "b"),
        layers=(
            Shift("a", 1),
            Shift("b", 1, inputs=(MODEL_INPUT,)),
            GlobalAvgPool2d("c", inputs=("a",)),
            GlobalAvgPool2d("d", inputs=("b",)),
            Add("e", inputs=("c", "d")),
            Dense("fc", 1, 2),
        ),
    )


def test_a_value_kept_for_a_later_consumer_counts_while_other_layers_run():
    estimate = estimate_memory(two_branch_spec())
    # stored: two shifts (1,), fc weight (2, 1) and bias (2,); real weights: 12 bytes each at
    # 64 padded features
    assert estimate.weight_bytes == 4 + 4 + 8 + 8 + 12 * 2 * 64
    # the model input 8·64; the peak is b: 8·(2·64) in + 24·64 out, while a's 64 values wait
    # for c (8 bytes each). Without liveness it would be a's 8·(2·64) + 24·64 alone.
    assert estimate.activation_bytes_per_instance == 8 * 64 + (16 * 64 + 24 * 64) + 8 * 64


def bireal18() -> ModelSpec:
    return bireal_spec(
        input_shape=(3, 224, 224),
        widths=(64, 128, 256, 512),
        blocks=4,
        stem_kernel=7,
        stem_stride=2,
        stem_pool=True,
        classes=1000,
    )


def test_a_bireal_net_18_at_224_needs_a_smaller_batch_or_a_higher_limit():
    """The figures docs/artifact-format.md quotes: 38.3 MiB per instance (the 7×7 stem's real
    patches and its 64×112×112 output dominate), so 4 GiB hold 106 rows, not 1024."""
    spec = bireal18()
    estimate = estimate_memory(spec)
    assert round(estimate.activation_bytes_per_instance / 2**20, 1) == 38.3
    assert (4 * 1024**3 - estimate.weight_bytes) // estimate.activation_bytes_per_instance == 106
    with pytest.raises(ModelTooLargeError, match="at a batch of 1024"):
        check_memory(spec, MemoryLimit())
    check_memory(spec, MemoryLimit(max_batch=64))


def test_an_add_counts_all_its_inputs():
    spec = bireal_spec(input_shape=(1, 8, 8), widths=(64,), blocks=2, stem_kernel=1)
    estimate = estimate_memory(spec)
    # The residual sums dominate: two inputs of 64·8·8 values, 8·(2·2·4096) + 24·4096. (The
    # BatchNorm before each runs while the block input waits: 8·(2·4096) + 24·4096 + 8·4096.)
    assert estimate.activation_bytes_per_instance == 8 * 64 + (32 + 24) * 4096


@pytest.mark.parametrize("reactnet", [False, True], ids=["bireal", "reactnet"])
def test_the_bound_holds_for_what_a_graph_call_allocates(tmp_path, reactnet):
    spec = bireal_spec(input_shape=(3, 16, 16), widths=(16, 32), blocks=2, reactnet=reactnet)
    path = write(tmp_path, spec)
    batch = 64
    limit = MemoryLimit(max_bytes=4 * 1024**3, max_batch=batch)
    model = load_model(path, memory_limit=limit)
    estimate = check_memory(spec, limit)
    x = np.random.default_rng(0).uniform(0, 16, (batch, *spec.input.shape)).astype(np.float32)
    model.predict(x)  # both kernel sets of measured dispatch, compiled outside the measurement
    model.predict(x)
    allocated = traced_peak(lambda: model.predict(x))
    if not 0 < allocated <= estimate.peak_bytes(batch):
        pytest.fail(f"allocated {allocated} bytes; bound {estimate.peak_bytes(batch)}")
