"""The inference engine: load an artifact, compile it, predict.

::

    from model import load_model
    m = load_model("models/digits-mlp/1/model.safetensors", device="cpu")
    logits = m.predict(x)          # x: (batch, *input.shape) or (batch, prod(input.shape))

``device``: "cpu" (numba kernels, no torch), "cuda" / "cuda:N" (the torch backend, forced), or
"auto": the GPU only when one is present *and* the model runs faster there than on the CPU at
every one of its served ``batch_sizes``, measured at load (:mod:`model.engine.device_choice`;
the figures are in ``CompiledModel.device_choice``), else the CPU engine. ``backend``: "auto",
"numba" (CPU only) or "torch" (any torch device; with ``device="cpu"`` it runs the torch
backend on the CPU, which is how CI tests it). Only :mod:`model.engine.torch_backend` imports
torch, and only when that backend is chosen (or "auto" finds a GPU driver).

Loading compiles the graph once (:mod:`model.engine.compiler`): BatchNorm + binarizer pairs fold
into integer thresholds, weights stay packed at 1 bit each. ``predict`` is thread-safe.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from model.artifact import ARTIFACT_FILENAME, read_artifact
from model.engine.compiler import compile_program
from model.engine.device_choice import DeviceChoice, choose_device, time_calls
from model.engine.floatmath import all_finite
from model.engine.memory import MemoryLimit, check_memory
from model.engine.ops import Program
from model.engine.options import EngineOptions
from model.errors import (
    DeviceUnavailableError,
    InputOutOfRangeError,
    InvalidInputError,
    NonFiniteOutputError,
)
from model.spec import InputSpec, ModelSpec

__all__ = [
    "BACKENDS",
    "CompiledModel",
    "EngineOptions",
    "Executor",
    "MemoryLimit",
    "Predictor",
    "check_finite_logits",
    "load_model",
    "probe_gpu",
    "resolve_device",
    "warmup_inputs",
]

BACKENDS = ("auto", "numba", "torch")
# Calls per batch size in warmup(): measured dispatch's first timed call of each kernel set.
WARMUP_CALLS = 4
# Files whose presence says a GPU driver is installed: NVIDIA on Linux, and WSL2's GPU
# paravirtualization device (which has no /dev/nvidia*).
GPU_DRIVER_FILES = ("/proc/driver/nvidia/gpus", "/dev/nvidia0", "/dev/dxg")

log = logging.getLogger(__name__)


class Executor(Protocol):
    name: str

    @property
    def memory_bytes(self) -> int: ...

    def run(self, x: np.ndarray) -> np.ndarray: ...


class Predictor(Protocol):
    """What a server holds for each loaded model version: :class:`CompiledModel` is one (the
    service's tests hand in a numpy model)."""

    spec: ModelSpec
    device: str

    @property
    def labels(self) -> tuple[str, ...]: ...

    @property
    def input_spec(self) -> InputSpec: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def predict_rows(self, rows: np.ndarray) -> np.ndarray: ...

    def warmup(self, batch_sizes: Iterable[int] = (1, 64)) -> float: ...


class CompiledModel:
    """A loaded, compiled model: ``predict(x) -> logits`` plus its specification."""

    def __init__(
        self,
        spec: ModelSpec,
        program: Program,
        executor: Executor,
        device: str,
        load_seconds: float,
    ) -> None:
        self.spec = spec
        self.program = program
        self._executor = executor
        self.device = device
        self.load_seconds = load_seconds
        self.warmup_seconds = 0.0
        # how device="auto" chose (None when the device was named)
        self.device_choice: DeviceChoice | None = None
        self._input_shape = tuple(spec.input.shape)
        self._flat_features = math.prod(self._input_shape)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def input_spec(self) -> InputSpec:
        return self.spec.input

    @property
    def backend(self) -> str:
        return self._executor.name

    @property
    def memory_bytes(self) -> int:
        """Bytes the model needs: the CPU engine's arrays (packed weights, thresholds, masks);
        on the torch backend, its device tensors plus one call's peak at the largest served
        batch."""
        return self._executor.memory_bytes

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits, float32 (batch, classes). InvalidInputError for a wrong shape or dtype, NaN
        or infinity."""
        batch = self.check_input(x)
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        return self._executor.run(batch)

    def predict_rows(self, rows: np.ndarray) -> np.ndarray:
        """Logits of ``rows`` that the caller has already made what :meth:`check_input`
        returns: float32, C-contiguous, (batch ≥ 1, *input.shape), every value finite. The
        service's data plane conforms each request so (``service.dataplane.conform_input``)
        and calls this, so that a small model's request is not checked twice; anything else
        calls :meth:`predict`."""
        return self._executor.run(rows)

    def check_input(self, x: Any) -> np.ndarray:
        """Validate ``x`` and return it as float32 (batch, *input.shape)."""
        name = self.spec.input.name
        if not isinstance(x, np.ndarray):
            raise InvalidInputError(
                f"input {name!r}: expected a numpy array, got {type(x).__name__}"
            )
        if x.dtype.kind not in "biuf":
            raise InvalidInputError(
                f"input {name!r}: expected a real numeric dtype (bool, int, uint, float), "
                f"got {x.dtype}"
            )
        batch = self._batch_shaped(x)
        if x.dtype.kind == "f" and not all_finite(x):
            where = np.argwhere(~np.isfinite(x))[0].tolist()
            raise InvalidInputError(
                f"input {name!r}: values must be finite, got {x[tuple(where)]} at index {where}"
            )
        if x.dtype == np.float32:  # the common case: nothing to convert, nothing to overflow
            return np.ascontiguousarray(batch)
        with np.errstate(over="ignore"):
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        if x.dtype.kind == "f" and not all_finite(batch):
            where = np.argwhere(~np.isfinite(batch.reshape(x.shape)))[0].tolist()
            raise InvalidInputError(
                f"input {name!r}: values must be finite in float32, got {x[tuple(where)]} at "
                f"index {where} (out of float32 range)"
            )
        return batch

    def _batch_shaped(self, x: np.ndarray) -> np.ndarray:
        """``x`` as (batch, *input.shape): as given, or reshaped from (batch, features)."""
        shape = self._input_shape
        if x.shape[1:] == shape:
            return x
        if x.ndim == 2 and x.shape[1] == self._flat_features:
            return x.reshape(x.shape[0], *shape)
        expected = f"[-1, {', '.join(map(str, shape))}]"
        if len(shape) > 1:
            expected += f" or [-1, {self._flat_features}]"
        raise InvalidInputError(
            f"input {self.spec.input.name!r}: expected shape {expected}, got {list(x.shape)}"
        )

    def warmup(self, batch_sizes: Iterable[int] = (1, 64)) -> float:
        """Compile (or load cached) kernels and run each batch size four times; returns seconds.

        Four times, because the CPU engine's measured dispatch (:mod:`model.engine.measured`)
        runs a large call's first four calls in a batch bucket twice on the parallel and then
        twice on the serial kernels, and times each set's second call: both sets get compiled
        here, not on a served request, and both get a first timing.
        The inputs are drawn from ``input.value_range``; NonFiniteOutputError if any logit is
        NaN or infinite (weights that overflow float32 on the data the model was made for)."""
        start = time.perf_counter()
        for x in warmup_inputs(self.spec.input, batch_sizes):
            for _ in range(WARMUP_CALLS):
                with np.errstate(over="ignore", invalid="ignore"):  # checked just below
                    logits = self.predict(x)
                self._check_finite_output(logits)
        self.warmup_seconds = time.perf_counter() - start
        return self.warmup_seconds

    def _check_finite_output(self, logits: np.ndarray) -> None:
        bad = ~np.isfinite(logits)
        if bad.any():
            row, column = np.argwhere(bad)[0].tolist()
            raise NonFiniteOutputError(
                f"model {self.spec.name!r} gave {logits[row, column]} for label "
                f"{self.labels[column]!r} (row {row} of a warm-up batch of {len(logits)} drawn "
                f"from value_range {self.spec.input.value_range}); expected finite logits"
            )

    def __repr__(self) -> str:
        return (
            f"CompiledModel({self.spec.name!r}, device={self.device!r}, "
            f"backend={self.backend!r}, memory_bytes={self.memory_bytes})"
        )


def check_finite_logits(logits: np.ndarray, input_spec: InputSpec) -> None:
    """InputOutOfRangeError naming the first instance whose logits are NaN or infinite.

    A model serves only after its content was checked and its warm-up logits, on inputs drawn
    from ``value_range``, were finite: non-finite logits then come from an input far outside
    that range (e.g. 3e38 into a real-valued layer), the client's to correct.
    """
    if all_finite(logits):
        return
    row = int(np.argmin(np.isfinite(logits).all(axis=1)))
    trained = input_spec.value_range
    expected = f"; the model expects values in {list(trained)}" if trained else ""
    raise InputOutOfRangeError(
        f"input {input_spec.name!r}: instance {row} drives the model's logits out of float32 "
        f"range (NaN or infinity){expected}"
    )


def load_model(
    path: str | os.PathLike[str],
    device: str = "cpu",
    backend: str = "auto",
    *,
    batch_sizes: Iterable[int] = (1, 64),
    max_batch: int | None = None,
    memory_limit: MemoryLimit | None = MemoryLimit(),  # noqa: B008 (frozen, shared safely)
    options: EngineOptions | None = None,
) -> CompiledModel:
    """Read an artifact (a file, or a version directory holding ``model.safetensors``), compile
    it for ``device`` and return the :class:`CompiledModel`.

    ``batch_sizes``: the batch sizes the model will serve (``auto`` measures them).
    ``max_batch``: the largest call the torch backend prepares for and counts in its memory
    (default: the largest of ``batch_sizes``). ``memory_limit``: refuse (ModelTooLargeError),
    before compiling, a model whose memory bound at ``memory_limit.max_batch`` rows exceeds
    ``memory_limit.max_bytes`` (:mod:`model.engine.memory`); the torch backend also refuses a
    model whose measured device memory exceeds it. None = no limit. ``options``: how the CPU
    engine runs (threads, kernel cache; :class:`~model.engine.options.EngineOptions`, default
    ``EngineOptions()``: no environment variable is read)."""
    start = time.perf_counter()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
    if device == "auto":
        gpu, why_no_gpu = probe_gpu(backend)
    else:
        gpu, why_no_gpu = resolve_device(device, backend), ""
    path = Path(path)
    if path.is_dir():
        path = path / ARTIFACT_FILENAME
    artifact = read_artifact(path)
    if memory_limit is not None:
        # Under auto with a GPU present the torch backend is a candidate: bound it too.
        on_cpu_engine = gpu in ("cpu", None) and backend in ("auto", "numba")
        check_memory(artifact.spec, memory_limit, "numba" if on_cpu_engine else "torch")
    program = compile_program(artifact.spec, artifact.tensors)
    torch_options = {
        "input_range": artifact.spec.input.value_range,
        "max_batch": max_batch or max(batch_sizes),
        "max_memory_bytes": memory_limit.max_bytes if memory_limit else None,
    }
    executors = ExecutorFactory(program, backend, options or EngineOptions(), torch_options)
    choice = None
    if device != "auto":
        assert gpu is not None, "resolve_device names a device or raises"
        executor, resolved = executors.on(gpu), gpu
    else:
        if gpu == "cpu" or gpu is None:
            executor = executors.on("cpu")
            choice = choose_device({}, None, None, why_no_gpu=why_no_gpu)
        else:
            executor, choice = _measure_and_choose(
                executors, gpu, warmup_inputs(artifact.spec.input, batch_sizes)
            )
        log.info("device chosen: %s (%s)", choice.device, choice.reason, extra=choice.as_metadata())
        resolved = choice.device
    model = CompiledModel(artifact.spec, program, executor, resolved, time.perf_counter() - start)
    model.device_choice = choice
    return model


@dataclass(frozen=True)
class ExecutorFactory:
    """Builds a loaded program's executor for a device: the numba engine (configured by the
    engine options) or the torch backend (configured by ``torch_options``)."""

    program: Program
    backend: str
    options: EngineOptions
    torch_options: dict

    def on(self, device: str) -> Executor:
        if device == "cpu" and self.backend in ("auto", "numba"):
            from model.engine import runtime
            from model.engine.cpu import NumbaExecutor

            return NumbaExecutor(self.program, threads=runtime.apply(self.options))
        from model.engine.torch_backend import TorchExecutor

        return TorchExecutor(self.program, device, **self.torch_options)


def _measure_and_choose(
    executors: ExecutorFactory, gpu: str, inputs: list[np.ndarray]
) -> tuple[Executor, DeviceChoice]:
    """Time the CPU candidate and the GPU at each input's batch size; keep the chosen one."""
    from model.engine import torch_backend

    cpu = executors.on("cpu")
    cpu_seconds = time_calls(cpu.run, inputs)
    name = None
    try:
        name = torch_backend.device_name(gpu)
        gpu_executor = executors.on(gpu)
        gpu_seconds = time_calls(gpu_executor.run, inputs)
    except RuntimeError as exc:  # busy exclusive-mode GPU, out of memory, driver errors
        torch_backend.release_cuda_memory()
        why = f"GPU {gpu} failed while measuring: {type(exc).__name__}: {exc}"
        return cpu, choose_device(cpu_seconds, None, gpu, gpu_name=name, why_no_gpu=why)
    choice = choose_device(cpu_seconds, gpu_seconds, gpu, gpu_name=name)
    if not choice.on_gpu:
        del gpu_executor
        torch_backend.release_cuda_memory()
        return cpu, choice
    return gpu_executor, choice


def probe_gpu(backend: str = "auto") -> tuple[str | None, str]:
    """(the CUDA device "auto" may use, or None, and why not). A RuntimeError while probing
    (a busy exclusive-mode GPU, a broken driver) means no GPU."""
    if backend == "numba":
        return None, "backend 'numba' runs on the CPU only"
    if not _gpu_driver_present():
        return None, f"no GPU driver (none of {', '.join(GPU_DRIVER_FILES)})"
    if not _torch_importable():
        return None, "a GPU driver is present but torch is not installed"
    from model.engine.torch_backend import cuda_device

    try:
        return cuda_device("cuda"), ""
    except DeviceUnavailableError as exc:
        return None, str(exc)
    except RuntimeError as exc:
        return None, f"probing CUDA failed: {type(exc).__name__}: {exc}"


def resolve_device(device: str, backend: str = "auto") -> str:
    """ "cpu", "cuda", "cuda:N" or "auto" → the device string the model runs on ("auto": the
    GPU when one can be probed, before any measurement; see :func:`load_model`)."""
    if device == "auto":
        gpu, _ = probe_gpu(backend)
        return gpu or "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if backend == "numba":
            raise ValueError(
                f"backend 'numba' runs on the CPU only; device {device!r} needs 'torch'"
            )
        if not _torch_importable():
            raise DeviceUnavailableError(
                f"device {device!r} needs torch, which is not installed; use device='cpu'"
            )
        from model.engine.torch_backend import cuda_device

        return cuda_device(device)
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def warmup_inputs(spec: InputSpec, batch_sizes: Iterable[int]) -> list[np.ndarray]:
    """Random float32 inputs of each batch size within the spec's value range (integers when
    the input is integer-valued), seeded."""
    rng = np.random.default_rng(0)
    # + 0.0 turns -0.0 into 0.0: [0.0, -0.0] is a valid range, but numpy's uniform refuses its
    # width (-0.0) as negative.
    low, high = (v + 0.0 for v in spec.value_range or (0.0, 1.0))
    inputs = []
    for size in batch_sizes:
        shape = (int(size), *spec.shape)
        x = rng.uniform(low, high, size=shape)  # float64: any float32 range fits
        if spec.integer_valued:
            x = np.round(x)
        inputs.append(x.astype(np.float32))
    return inputs


def _torch_importable() -> bool:
    return importlib.util.find_spec("torch") is not None


def _gpu_driver_present() -> bool:
    """A cheap check that avoids importing torch on machines without a GPU driver."""
    return any(os.path.exists(f) for f in GPU_DRIVER_FILES)
