"""device="auto": the GPU only when measured faster at every served batch size."""

from __future__ import annotations

import numpy as np
import pytest

import model.engine as engine
from model.engine.device_choice import choose_device, time_calls
from tests.model.engine.reference import write_model
from tests.model.factory import tiny_spec


def test_auto_never_picks_a_slower_device():
    """Injected timings: whatever they are, the GPU is chosen only if faster at every size."""
    rng = np.random.default_rng(0)
    picked_gpu = picked_cpu = 0
    for _ in range(2000):
        sizes = rng.choice([1, 7, 64, 256, 1024], size=rng.integers(1, 4), replace=False)
        cpu = {int(b): float(rng.uniform(1e-5, 1e-2)) for b in sizes}
        gpu = {b: t * float(rng.choice([0.3, 0.99, 1.0, 1.01, 3.0])) for b, t in cpu.items()}
        choice = choose_device(cpu, gpu, "cuda:0", gpu_name="NVIDIA H200")
        assert choice.on_gpu == (choice.device == "cuda:0")
        if choice.on_gpu:
            picked_gpu += 1
            assert all(gpu[b] < cpu[b] for b in cpu), (cpu, gpu)
        else:
            picked_cpu += 1
            assert any(gpu[b] >= cpu[b] for b in cpu), (cpu, gpu)
    assert picked_gpu > 100 and picked_cpu > 100  # both outcomes were exercised


def test_a_gpu_faster_at_large_batches_only_is_not_chosen():
    choice = choose_device({1: 50e-6, 256: 9e-3}, {1: 80e-6, 256: 0.4e-3}, "cuda:0")
    assert choice.device == "cpu"
    assert choice.reason == "GPU not faster than the CPU engine at batch sizes [1]"
    assert choice.as_metadata() == {
        "device": "cpu",
        "reason": "GPU not faster than the CPU engine at batch sizes [1]",
        "gpu": "cuda:0 (GPU)",
        "cpu_ms_per_call": {"1": 0.05, "256": 9.0},
        "gpu_ms_per_call": {"1": 0.08, "256": 0.4},
    }


def test_a_gpu_not_measured_at_a_served_size_is_not_chosen():
    choice = choose_device({1: 5e-3, 64: 9e-3}, {1: 1e-3}, "cuda:1")
    assert (choice.device, choice.reason) == ("cpu", "GPU not measured at batch sizes [64]")


def test_a_faster_gpu_is_chosen_with_its_figures():
    choice = choose_device({1: 5e-3, 64: 9e-3}, {1: 1e-3, 64: 2e-3}, "cuda:1", gpu_name="L4")
    assert choice.device == "cuda:1"
    assert choice.gpu == "cuda:1 (L4)"
    assert choice.gpu_seconds == {1: 1e-3, 64: 2e-3}


def test_no_gpu_keeps_the_cpu_with_the_reason():
    choice = choose_device({}, None, None, why_no_gpu="no GPU driver")
    assert (choice.device, choice.reason, choice.gpu) == ("cpu", "no GPU driver", None)


def test_time_calls_reports_a_median_per_batch_size():
    calls = []
    seconds = time_calls(lambda x: calls.append(len(x)), [np.zeros((3, 2)), np.zeros((8, 2))])
    assert set(seconds) == {3, 8} and all(s >= 0 for s in seconds.values())
    assert calls == [3] * 6 + [8] * 6  # one untimed call, then the timed ones


def test_auto_on_a_host_without_a_gpu_says_why(tmp_path):
    path = write_model(tmp_path / "m.safetensors", tiny_spec(), np.random.default_rng(0))
    model = engine.load_model(path, device="auto", batch_sizes=(1, 8))
    if model.device != "cpu":
        pytest.skip("this machine has a GPU that measured faster")
    assert model.backend == "numba"
    assert model.device_choice.device == "cpu"
    assert model.device_choice.reason  # no driver, no torch CUDA, or measured slower


def test_a_runtime_error_while_probing_cuda_falls_back_to_the_cpu(monkeypatch):
    """A busy exclusive-mode GPU raises RuntimeError from CUDA calls: auto takes the CPU."""
    pytest.importorskip("torch")
    import model.engine.torch_backend as torch_backend

    def busy(device: str) -> str:
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(engine, "_gpu_driver_present", lambda: True)
    monkeypatch.setattr(torch_backend, "cuda_device", busy)
    gpu, why = engine.probe_gpu()
    assert gpu is None
    assert why == (
        "probing CUDA failed: RuntimeError: CUDA error: all CUDA-capable devices are busy or "
        "unavailable"
    )
    assert engine.resolve_device("auto") == "cpu"


def test_wsl2_gpu_device_counts_as_a_driver():
    assert "/dev/dxg" in engine.GPU_DRIVER_FILES


class TorchStandsInForTheGpu:
    """An executor factory whose first executor (the CPU candidate) is the numba engine and
    whose second (the "GPU", here on "cpu" too) is the torch backend."""

    def __init__(self, program, torch_options):
        self.factories = [
            engine.ExecutorFactory(program, backend, engine.EngineOptions(), torch_options)
            for backend in ("numba", "torch")
        ]
        self.asked: list[str] = []

    def on(self, device):
        self.asked.append(device)
        return self.factories[min(len(self.asked), 2) - 1].on(device)


def test_measuring_keeps_the_faster_candidate(tmp_path):
    """The measurement path run on the CPU (the torch backend standing in for the GPU): the
    executor kept is the one the choice names, with figures at every served size."""
    pytest.importorskip("torch")
    path = write_model(tmp_path / "m.safetensors", tiny_spec(), np.random.default_rng(0))
    program = engine.load_model(path).program
    inputs = engine.warmup_inputs(engine.read_artifact(path).spec.input, (1, 16))
    options = {"input_range": None, "max_batch": 16, "max_memory_bytes": None}
    executors = TorchStandsInForTheGpu(program, options)
    executor, choice = engine._measure_and_choose(executors, "cpu", inputs)
    assert executors.asked == ["cpu", "cpu"]  # the CPU candidate first, then the "GPU"
    assert set(choice.cpu_seconds) == set(choice.gpu_seconds) == {1, 16}
    faster = all(choice.gpu_seconds[b] < choice.cpu_seconds[b] for b in (1, 16))
    assert executor.name == ("torch" if faster else "numba")
