"""The torch backend runs the same compiled program: on the CPU here (CI), on CUDA where a GPU
is present (tests marked ``gpu``, skipped with a reason otherwise)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model import ModelSpec, load_model, read_artifact  # noqa: E402
from model.engine.ops import BinaryConv, Bits, Decide  # noqa: E402
from model.engine.torch_backend import (  # noqa: E402
    Precision,
    TorchExecutor,
    batch_bucket,
    popcount_to_sum_domain,
)
from model.errors import ModelMemoryError  # noqa: E402
from model.quantizers import binarizer_for  # noqa: E402
from model.spec import BatchNorm, Conv2d, Dense, Flatten, MaxPool2d  # noqa: E402
from tests.model.engine.reference import eager_logits, write_model  # noqa: E402
from tests.model.engine.test_equivalence import (  # noqa: E402
    CNNS,
    DIGITS,
    MLPS,
    assert_same,
    config_id,
    random_pixels,
)
from tests.model.engine.test_graphs import GRAPHS, pixels, spec_of  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("config", MLPS + CNNS, ids=config_id)
def test_torch_cpu_backend_is_bit_identical_to_the_cpu_engine(compiled, config):
    """Every quantizer family, ±1 padding, pooling and α scales, as training builds them."""
    model, eager = compiled(config, DIGITS, backend="torch")
    numba_model, _ = compiled(config, DIGITS, backend="numba")
    assert (model.backend, model.device) == ("torch", "cpu")
    for batch in (1, 7, 64):
        x = random_pixels(DIGITS, batch, seed=batch)
        got = model.predict(x)
        np.testing.assert_array_equal(got, numba_model.predict(x))
        with torch.no_grad():
            assert_same(got, eager(torch.from_numpy(x)).numpy())


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_torch_cpu_backend_on_every_graph_is_bit_identical(tmp_path, name):
    """Every layer kind and epilogue the compiler emits (test_graphs covers them all)."""
    path = write_model(tmp_path / "m.safetensors", GRAPHS[name], np.random.default_rng(5))
    model, artifact = load_model(path, backend="torch"), read_artifact(path)
    numba_model = load_model(path, backend="numba")
    for batch in (1, 40):
        x = pixels(model.input_spec, batch)
        got = model.predict(x)
        np.testing.assert_array_equal(got, numba_model.predict(x))
        assert_same(got, eager_logits(artifact.spec, artifact.tensors, x))


def wide_spec(input_quantizer: str) -> ModelSpec:
    """Binary sums longer than 2048 terms (float16 chunking): a conv of 240·9 = 2160 and a
    dense layer of 2100 inputs, padded with the bit-set value (−1 / 1), a pool and α."""
    pad = -1.0 if input_quantizer == "ste_sign" else 1.0
    return spec_of(
        [
            Conv2d("c0", 1, 240, pad_value=0.0),
            BatchNorm("b0", 240),
            Conv2d(
                "c1",
                240,
                70,
                input_quantizer=input_quantizer,
                kernel_quantizer="ste_sign",
                pad_value=pad,
                scale=True,
            ),
            MaxPool2d("p1"),
            BatchNorm("b1", 70),
            Flatten("f"),
            Dense(
                "d2", 70 * 16, 2100, input_quantizer=input_quantizer, kernel_quantizer="ste_sign"
            ),
            BatchNorm("b2", 2100),
            Dense("d3", 2100, 30, input_quantizer=input_quantizer, kernel_quantizer="ste_sign"),
            BatchNorm("b3", 30),
            Dense("out", 30, 10, input_quantizer=input_quantizer),
        ]
    )


@pytest.mark.parametrize("quantizer", ["ste_sign", "stochastic_binary"])
def test_float16_binary_layers_are_exact_past_2048_terms(tmp_path, quantizer):
    """The CUDA arithmetic (float16 ±1 operands, chunked sums) run on the CPU: every binary
    decision equals the CPU engine's, and the logits (float32 real layers) agree closely."""
    path = write_model(tmp_path / "w.safetensors", wide_spec(quantizer), np.random.default_rng(2))
    numba_model = load_model(path, backend="numba")
    program = numba_model.program
    half = TorchExecutor(program, "cpu", precision=Precision(torch.float16, torch.float32))
    exact = TorchExecutor(program, "cpu")
    x = pixels(numba_model.input_spec, 9)
    first_binary = next(i for i, op in enumerate(program.ops) if isinstance(op, BinaryConv))
    with torch.inference_mode():
        a = b = torch.from_numpy(x)
        for i, (s_half, s_exact) in enumerate(zip(half._steps, exact._steps, strict=True)):
            a, b = s_half(a), s_exact(b)
            if i >= first_binary and i < len(program.ops) - 1:  # binary values from here on
                assert a.dtype == torch.float16
                np.testing.assert_array_equal(a.float().numpy(), b.float().numpy())
    want = numba_model.predict(x)
    np.testing.assert_allclose(half.run(x), want, rtol=1e-5, atol=1e-5)


def test_float32_real_layers_on_cpu_are_close_to_the_cpu_engine(compiled):
    """real_dtype float32 (the CUDA choice) on the CPU: within float32 rounding."""
    numba_model, _ = compiled(CNNS[1], DIGITS, backend="numba")
    fast = TorchExecutor(
        numba_model.program, "cpu", precision=Precision(torch.float32, torch.float32)
    )
    x = random_pixels(DIGITS, 64, seed=3)
    want = numba_model.predict(x)
    np.testing.assert_allclose(fast.run(x), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(fast.run(x).argmax(1), want.argmax(1))


@pytest.mark.parametrize("kind", ["sign", "step"])
def test_popcount_thresholds_move_to_the_sum_domain_exactly(kind):
    """bit = (σ·acc ≥ T) must equal (P ≥ cut) XOR invert for every reachable popcount P,
    including cuts outside [0, K] (channels that always or never fire)."""
    k, channels = 9, 40
    rng = np.random.default_rng(0)
    cut = rng.integers(-3, k + 4, channels)
    invert = rng.integers(0, 2, channels).astype(np.uint8)
    pcw = rng.integers(0, k + 1, channels)
    binarizer = binarizer_for("ste_sign" if kind == "sign" else "stochastic_binary")
    bits = Bits(binarizer, (channels,), "flat")
    ep = Decide(cut=cut, invert=invert, pools=(), out=bits)
    sigma, threshold = popcount_to_sum_domain(ep, bits, k, pcw)
    for p in range(k + 1):
        acc = k - 2 * p if kind == "sign" else p - pcw
        want = (p >= cut) ^ invert.astype(bool)
        np.testing.assert_array_equal(sigma * acc >= threshold, want)
    assert np.abs(threshold).max() <= k + 1


def test_memory_bytes_are_weights_plus_a_calls_peak(compiled):
    numba_model, _ = compiled(MLPS[0], DIGITS, backend="numba")
    small = TorchExecutor(numba_model.program, "cpu", max_batch=1)
    large = TorchExecutor(numba_model.program, "cpu", max_batch=256)
    assert small.weight_bytes == large.weight_bytes > 0
    # the input alone is 256 rows of 64 float32, the first activations 256 × 100 float32
    assert large.call_bytes > 256 * (64 + 100) * 4 > small.call_bytes > 0
    assert large.memory_bytes == large.weight_bytes + large.call_bytes
    with pytest.raises(ModelMemoryError, match=r"over the limit of 1000 bytes"):
        TorchExecutor(numba_model.program, "cpu", max_batch=256, max_memory_bytes=1000)


def test_the_torch_executor_maps_every_op_to_its_own_method(compiled):
    """The explicit {op class: preparing method} map covers each kind of operation once."""
    from model.engine.ops import OPS

    numba_model, _ = compiled(MLPS[0], DIGITS, backend="numba")
    preparers = TorchExecutor(numba_model.program, "cpu", max_batch=1)._preparers()
    assert set(preparers) == set(OPS)
    assert len({method.__name__ for method in preparers.values()}) == len(OPS)


def test_load_model_counts_memory_at_the_largest_served_call(tmp_path):
    path = write_model(tmp_path / "m.safetensors", GRAPHS["tiny-factory"], np.random.default_rng(1))
    small = load_model(path, backend="torch", batch_sizes=(1, 8))
    large = load_model(path, backend="torch", batch_sizes=(1, 8), max_batch=512)
    assert small._executor.max_batch == 8 and large._executor.max_batch == 512
    assert large.memory_bytes > small.memory_bytes


def test_batches_round_up_to_a_power_of_two_for_cuda_graphs():
    assert [batch_bucket(n) for n in (1, 2, 3, 7, 8, 9, 300, 1024)] == [
        1, 2, 4, 8, 8, 16, 512, 1024,
    ]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; torch sees none here")
@pytest.mark.parametrize("config", [MLPS[0], MLPS[5], CNNS[1], CNNS[4]], ids=config_id)
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "auto"])
def test_cuda_backend_matches_eager(compiled, config, device):
    """cuda and cuda:N force the GPU; auto lands where it measured faster (either is right)."""
    model, eager = compiled(config, DIGITS, backend="auto", device=device)
    if device == "auto":
        assert model.device == model.device_choice.device in ("cpu", "cuda:0")
    else:
        assert model.device == "cuda:0" and model.backend == "torch"
    for batch in (1, 7, 64, 1000):
        x = random_pixels(DIGITS, batch, seed=batch)
        with torch.no_grad():
            assert_same(model.predict(x), eager(torch.from_numpy(x)).numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; torch sees none here")
def test_cuda_backend_is_thread_safe(compiled):
    import threading

    model, _ = compiled(CNNS[1], DIGITS, backend="torch", device="cuda")
    inputs = [random_pixels(DIGITS, b, seed=b) for b in (1, 7, 64)]
    expected = [model.predict(x) for x in inputs]
    failures = []

    def work():
        for i in range(30):
            if not np.array_equal(model.predict(inputs[i % 3]), expected[i % 3]):
                failures.append(i)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; torch sees none here")
def test_cuda_graphs_serve_every_batch_size_like_the_eager_forward(compiled):
    """Graph replay (padded to a power of two, pinned staging, the model's stream) gives the
    outputs of the same forward run eagerly, and the CPU engine's decisions."""
    numba_model, _ = compiled(CNNS[1], DIGITS, backend="numba")
    graphs = TorchExecutor(numba_model.program, "cuda:0", max_batch=64)
    eager = TorchExecutor(numba_model.program, "cuda:0", max_batch=64, cuda_graphs=False)
    for batch in (1, 3, 8, 33, 64, 1500):  # 1500: past MAX_GRAPH_BATCH, runs eagerly
        x = random_pixels(DIGITS, batch, seed=batch)
        got = graphs.run(x)
        np.testing.assert_array_equal(got, eager.run(x))
        assert_same(got, numba_model.predict(x))
    assert sorted(graphs._runner._graphs) == [1, 4, 8, 64]
    assert graphs.call_bytes > 0 and graphs.precision.binary == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; torch sees none here")
def test_cuda_memory_limit_refuses_a_model(compiled):
    numba_model, _ = compiled(MLPS[0], DIGITS, backend="numba")
    with pytest.raises(ModelMemoryError, match="over the limit of 1000 bytes"):
        TorchExecutor(numba_model.program, "cuda:0", max_memory_bytes=1000)
