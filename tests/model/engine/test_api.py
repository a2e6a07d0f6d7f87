"""The engine's public API: attributes, input validation, devices, thread safety, no torch on
the numba path."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from model import InputSpec, load_model
from model.engine import resolve_device
from model.engine.runtime import threading_layer
from model.errors import DeviceUnavailableError, InvalidInputError
from tests.model.engine.reference import cnn_spec, mlp_spec, write_model

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("api") / "model.safetensors"
    return write_model(path, mlp_spec(input_shape=(1, 8, 8), features=64), np.random.default_rng(0))


@pytest.fixture(scope="module")
def mlp(mlp_path):
    return load_model(mlp_path)


def test_predict_rows_is_predict_without_its_checks_for_conformed_rows(mlp):
    x = np.random.default_rng(1).integers(0, 17, (5, 64)).astype(np.float64)  # flat, float64
    rows = mlp.check_input(x)  # what the service's data plane makes of a request
    assert rows.dtype == np.float32 and rows.shape == (5, 1, 8, 8) and rows.flags.c_contiguous
    np.testing.assert_array_equal(mlp.predict_rows(rows), mlp.predict(x))


def test_attributes(mlp, mlp_path):
    assert mlp.spec.name == "test-mlp"
    assert mlp.labels == tuple(str(i) for i in range(10))
    assert mlp.input_spec == InputSpec(
        shape=(1, 8, 8), value_range=(0.0, 16.0), integer_valued=True
    )
    assert (mlp.device, mlp.backend) == ("cpu", "numba")
    assert 0 < mlp.load_seconds < 60
    # packed weights: 64→100→70 binary (⌈64/64⌉ and ⌈100/64⌉ words per row), then the fp
    # 70→10 output layer transposed into the bits' layout (70 rows padded to 128)
    packed = 100 * 1 * 8 + 70 * 2 * 8
    assert packed + 128 * 10 * 4 < mlp.memory_bytes < packed + 128 * 10 * 4 + 4096
    seconds = mlp.warmup(batch_sizes=(1, 3))
    assert seconds == mlp.warmup_seconds > 0
    assert load_model(mlp_path.parent).spec == mlp.spec  # a version directory works too


def test_predict_shapes_and_dtypes(mlp):
    x = np.random.default_rng(1).integers(0, 17, size=(5, 1, 8, 8))
    want = mlp.predict(x.astype(np.float32))
    assert want.shape == (5, 10) and want.dtype == np.float32
    for dtype in (np.uint8, np.int64, np.float64, np.float16, np.int16):
        np.testing.assert_array_equal(mlp.predict(x.astype(dtype)), want)
    np.testing.assert_array_equal(mlp.predict(x.reshape(5, 64)), want)
    np.testing.assert_array_equal(mlp.predict(np.asfortranarray(x.reshape(5, 64))), want)
    assert mlp.predict(np.zeros((0, 64), np.float32)).shape == (0, 10)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (
            np.zeros((3, 65), np.float32),
            r"input 'input': expected shape \[-1, 1, 8, 8\] or \[-1, 64\], got \[3, 65\]",
        ),
        (np.zeros((64,), np.float32), r"expected shape .* got \[64\]"),
        (np.zeros((2, 1, 8, 7), np.float32), r"got \[2, 1, 8, 7\]"),
        (np.zeros((2, 64), np.complex64), r"expected a real numeric dtype .* got complex64"),
        (np.array([["a"] * 64]), r"expected a real numeric dtype .* got <U1"),
        (np.zeros((2, 64), object), r"expected a real numeric dtype .* got object"),
        ([[0.0] * 64], r"expected a numpy array, got list"),
    ],
    ids=["width", "no-batch-axis", "image-shape", "complex", "strings", "object", "list"],
)
def test_wrong_shape_or_dtype(mlp, x, message):
    with pytest.raises(InvalidInputError, match=message):
        mlp.predict(x)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, r"values must be finite, got nan at index \[1, 5\]"),
        (np.inf, r"values must be finite, got inf at index \[1, 5\]"),
        (-np.inf, r"values must be finite, got -inf"),
        (1e300, r"finite in float32, got 1e\+300 at index \[1, 5\] \(out of float32 range\)"),
    ],
    ids=["nan", "inf", "-inf", "float64-overflow"],
)
def test_non_finite_values(mlp, value, message):
    x = np.zeros((2, 64), np.float64)
    x[1, 5] = value
    with pytest.raises(InvalidInputError, match=message):
        mlp.predict(x)


def test_devices():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N' or 'auto'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="backend 'numba' runs on the CPU only"):
        resolve_device("cuda", backend="numba")


def test_backend_name_is_checked(mlp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        load_model(mlp_path, backend="tensorrt")


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(mlp_path):
    pytest.importorskip("torch")
    with pytest.raises(DeviceUnavailableError, match="sees no CUDA device"):
        load_model(mlp_path, device="cuda")
    with pytest.raises(DeviceUnavailableError):
        load_model(mlp_path, device="cuda:1")
    model = load_model(mlp_path, device="auto")
    assert (model.device, model.backend) == ("cpu", "numba")


def test_numba_path_never_imports_torch(mlp_path):
    code = (
        "import sys, numpy as np\n"
        "from model import load_model\n"
        f"m = load_model({str(mlp_path)!r}, device='auto')\n"
        "m.predict(np.zeros((2, 64), np.float32))\n"
        "assert m.backend == 'numba', m.backend\n"
        "print('torch' in sys.modules, m.backend)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "numba"]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "cnn.safetensors"
    spec = cnn_spec(channels=(20, 70, 40), pad_value=-1.0, scale=True)
    return load_model(write_model(path, spec, np.random.default_rng(2)))


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_concurrent_predict_from_many_threads(request, which):
    """12 threads × 15 calls of mixed batch sizes give exactly the serial results."""
    model = request.getfixturevalue(which)
    rng = np.random.default_rng(3)
    inputs = [
        rng.integers(0, 17, size=(b, *model.input_spec.shape)).astype(np.float32)
        for b in (1, 7, 64, 2, 33)
    ]
    expected = [model.predict(x) for x in inputs]
    failures: list[str] = []

    def worker(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(15) % len(inputs)
        for i in order:
            got = model.predict(inputs[i])
            if not np.array_equal(got, expected[i]):
                failures.append(f"thread {seed}: input {i} differs")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]
    assert threading_layer() in ("omp", "tbb", "workqueue")


def test_workqueue_fallback_serializes_kernels(mlp_path):
    """Without a thread-safe layer the engine holds one lock around kernels: concurrent
    predicts under numba's workqueue layer then neither abort nor differ."""
    code = (
        "import threading, numpy as np\n"
        "from model import load_model\n"
        "from model.engine import runtime\n"
        f"m = load_model({str(mlp_path)!r})\n"
        "x = np.random.default_rng(0).integers(0, 17, size=(33, 64)).astype(np.float32)\n"
        "want = m.predict(x)\n"
        "bad = []\n"
        "def work():\n"
        "    for _ in range(20):\n"
        "        bad.append(not np.array_equal(m.predict(x), want))\n"
        "ts = [threading.Thread(target=work) for _ in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(runtime.threading_layer(), sum(bad), len(bad))\n"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["workqueue", "0", "160"]


def test_the_cpu_executor_maps_every_op_to_its_own_method(mlp):
    """The explicit {op class: method} map covers each kind of operation exactly once."""
    from model.engine.ops import OPS

    handlers = mlp._executor._handlers
    assert set(handlers) == set(OPS)
    assert len({method.__name__ for method in handlers.values()}) == len(OPS)


def test_small_calls_run_serial_kernels(mlp, monkeypatch):
    """A call whose work is below SERIAL_WORK_LIMIT runs on the calling thread: an mlp in one
    kernel call (integer inputs) or the serial twins of the kernels; a larger call runs the
    parallel kernels, on the executor's threads."""
    import dataclasses

    import numba

    from model.engine import cpu, dispatch, fused

    seen: list[str] = []

    def recording(kernel, label):
        def record(*args):
            seen.append(label)
            return kernel(*args)

        return record

    def recording_set(kset, label):
        return dataclasses.replace(
            kset, dense_threshold_pack=recording(kset.dense_threshold_pack, label)
        )

    executor = mlp._executor
    policy = executor._dispatch
    monkeypatch.setattr(dispatch, "SERIAL", recording_set(dispatch.SERIAL, "serial"))
    monkeypatch.setattr(dispatch, "PARALLEL", recording_set(dispatch.PARALLEL, "parallel"))
    monkeypatch.setattr(cpu, "PARALLEL", dispatch.PARALLEL)  # the executor checks which it got
    monkeypatch.setattr(fused, "mlp_rows", recording(fused.mlp_rows, "one call"))
    per_row = sum(dispatch.row_work(op) for op in mlp.program.ops)
    rows = dispatch.serial_rows(mlp.program)
    assert rows == policy.serial_rows
    assert (rows - 1) * per_row < dispatch.SERIAL_WORK_LIMIT <= rows * per_row
    for batch in (rows - 1, rows, 4 * rows):
        mlp.predict(np.zeros((batch, 1, 8, 8), np.float32))
    mlp.predict(np.full((rows - 1, 1, 8, 8), 0.5, np.float32))  # not integers: layer by layer
    assert seen == ["one call", "parallel", "parallel", "one call", "serial"]
    assert numba.get_num_threads() == executor.threads


def test_warmup_refuses_a_model_whose_logits_overflow(tmp_path):
    """Finite weights (3e38) whose sums overflow float32: refused on the warm-up batch."""
    from model.artifact import write_artifact
    from model.errors import NonFiniteOutputError
    from tests.model.factory import tiny_spec, tiny_tensors

    tensors = tiny_tensors() | {"fc.weight": np.full((3, 630), 3e38, np.float32)}
    path = tmp_path / "model.safetensors"
    write_artifact(path, tiny_spec(), tensors)
    model = load_model(path)
    with pytest.raises(NonFiniteOutputError, match="label 'a'"):
        model.warmup(batch_sizes=(1, 4))


def test_check_finite_logits_names_the_instance_and_the_range():
    from model.engine import check_finite_logits
    from model.errors import InputOutOfRangeError

    spec = InputSpec(shape=(4,), value_range=(0.0, 1.0))
    check_finite_logits(np.zeros((3, 2), np.float32), spec)
    logits = np.array([[0.0, 1.0], [np.inf, 0.0], [np.nan, 0.0]], np.float32)
    with pytest.raises(InputOutOfRangeError, match=r"instance 1 .*\[0\.0, 1\.0\]"):
        check_finite_logits(logits, spec)
