"""Devices and threads of a training run: parsing, resolution, the CUDA path where a GPU is."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from model.cpus import usable_cores
from training import runtime as runtime_module
from training.architectures import MLPConfig
from training.config import ConfigError, DeviceError, TrainConfig
from training.distributed import DistributedContext
from training.loop import train
from training.runtime import CompilerNotFoundError, resolve_device, resolve_runtime

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device; torch sees none here"


def tiny(**overrides) -> TrainConfig:
    options = {"model": MLPConfig(hidden=(16,)), "epochs": 1, "progress": False} | overrides
    return TrainConfig(**options)


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CUDA", "cuda:0:1", "", "mps"])
def test_malformed_devices_are_refused_when_the_config_is_built(name):
    with pytest.raises(
        DeviceError, match=f"device must be auto, cpu, cuda or cuda:N; got {name!r}"
    ):
        tiny(device=name)


def test_cpu_is_the_cpu_and_auto_is_a_gpu_only_where_there_is_one():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present: the no-GPU error cannot occur")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(DeviceError, match=f"device {name!r}: torch .* sees no CUDA device"):
        resolve_device(name)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_a_cuda_index_past_the_last_device_is_a_clear_error():
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}")


def test_default_threads_are_every_usable_core_and_explicit_threads_win():
    assert resolve_runtime(tiny()).threads == usable_cores()
    assert resolve_runtime(tiny(num_threads=3)).threads == 3


def test_distributed_processes_share_the_cores_and_follow_the_process_group():
    gloo = DistributedContext(rank=1, world_size=2, local_rank=1, backend="gloo")
    runtime = resolve_runtime(tiny(), gloo)
    assert runtime.device == torch.device("cpu")
    assert runtime.threads == max(1, usable_cores() // 2)
    # An NCCL process runs on its GPU (no CUDA call needed to say so); --device cpu contradicts it.
    nccl = DistributedContext(rank=0, world_size=2, local_rank=1, backend="nccl")
    with pytest.raises(DeviceError, match="process group \\(nccl\\) runs this process on cuda:1"):
        resolve_runtime(tiny(device="cpu"), nccl)


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(runtime_module, "cpp_compiler", lambda: None)
    with pytest.raises(CompilerNotFoundError, match="no C\\+\\+ compiler.*--no-compile"):
        resolve_runtime(tiny(device="cpu", compile=True))
    assert resolve_runtime(tiny(device="cpu")).device == torch.device("cpu")  # eager: no need


def test_the_cpp_compiler_probe_runs_the_compilers_inductor_would_try(monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/c++"))
    assert runtime_module.cpp_compiler() is None
    if shutil.which("g++") is not None:
        monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "g++"))
        assert runtime_module.cpp_compiler() == "g++"


@pytest.mark.parametrize(
    ("mode", "capabilities", "expected"),
    [
        ("auto", {"avx512_bf16": True}, True),
        ("auto", {"amx_bf16": True}, True),
        ("auto", {"avx512_bf16": False, "avx2": True}, False),  # emulated: 4-10x slower
        ("on", {}, True),
        ("off", {"avx512_bf16": True}, False),
    ],
)
def test_bf16_autocast_where_asked_or_where_the_cpu_computes_bf16(
    monkeypatch, mode, capabilities, expected
):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    runtime = resolve_runtime(tiny(device="cpu", bf16=mode))
    assert runtime.bf16 is expected
    assert runtime.describe().endswith(", bf16 autocast") is expected


def test_bf16_mode_must_be_auto_on_or_off():
    with pytest.raises(ConfigError, match="bf16 must be one of auto, on, off; got 'yes'"):
        tiny(bf16="yes")
    assert tiny().bf16 == "off"  # the digits recipes' (generic) setting


@pytest.mark.slow  # trains a tiny model twice
def test_a_bf16_run_trains_in_bf16_and_keeps_float32_weights():
    options = {"device": "cpu", "num_threads": 1, "epochs": 2, "keep_epoch": "last"}
    bf16, fp32 = train(tiny(bf16="on", **options)), train(tiny(bf16="off", **options))
    assert (bf16.metrics["bf16"], fp32.metrics["bf16"]) == (True, False)
    state, reference = bf16.model.state_dict(), fp32.model.state_dict()
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    # Same seed and data: only the forward arithmetic differs, and it shows in the weights.
    assert any(not torch.equal(state[k], reference[k]) for k in state)
    assert bf16.metrics["test_accuracy"] > 0.3  # chance is 0.1; fp32 reaches ~0.5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_bf16_auto_on_a_gpu_follows_its_bf16_support():
    runtime = resolve_runtime(tiny(device="cuda", bf16="auto"))
    assert runtime.bf16 is torch.cuda.is_bf16_supported()


@pytest.mark.slow  # trains (a tiny model, one epoch)
def test_cpu_run_reports_its_device_and_threads():
    result = train(tiny(device="cpu", num_threads=1))
    assert result.metrics["device"] == "cpu" and result.metrics["num_threads"] == 1
    assert result.metrics["images_per_second"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_cuda_run_returns_a_cpu_model_that_exports_like_a_cpu_one(tmp_path):
    """The model comes back on the CPU; its artifact round-trips and predicts its test split as
    the eager module does."""
    from model.artifact import read_artifact
    from training.export import export_artifact, module_from_artifact

    result = train(tiny(device="cuda", epochs=2))
    assert result.metrics["device"].startswith("cuda")
    assert all(t.device.type == "cpu" for t in result.model.state_dict().values())
    assert result.metrics["test_accuracy"] > 0.3  # chance is 0.1; 2 epochs of 16 units reach ~0.5
    path = tmp_path / "model.safetensors"
    data = result.data
    export_artifact(result.model, path, name="t", input_spec=data.input_spec, labels=data.labels)
    rebuilt = module_from_artifact(read_artifact(path))
    x = torch.from_numpy(result.data.test.x)
    with torch.no_grad():
        np.testing.assert_array_equal(
            rebuilt(x).argmax(1).numpy(), result.model(x).argmax(1).numpy()
        )
