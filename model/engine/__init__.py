"""The inference engine: load an artifact, compile it, predict.

::

    from model import load_model
    m = load_model("models/digits-mlp/1/model.safetensors", device="cpu")
    logits = m.predict(x)          # x: (batch, *input.shape) or (batch, prod(input.shape))

``device``: "cpu" (numba kernels, no torch), "cuda" / "cuda:N" (the torch backend), or "auto"
(CUDA when torch is importable and a GPU is present, else "cpu"). ``backend``: "auto",
"numba" (CPU only) or "torch" (any torch device; with ``device="cpu"`` it runs the torch
backend on the CPU, which is how CI tests it). Only :mod:`model.engine.torch_backend` imports
torch, and only when that backend is chosen (or "auto" finds a GPU driver).

Loading compiles the graph once (:mod:`model.engine.program`): BatchNorm + binarizer pairs fold
into integer thresholds, weights stay packed at 1 bit each. ``predict`` is thread-safe.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from model.artifact import ARTIFACT_FILENAME, read_artifact
from model.engine.memory import MemoryLimit, check_memory
from model.engine.program import Program, compile_program
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
    "Executor",
    "MemoryLimit",
    "check_finite_logits",
    "load_model",
    "resolve_device",
]

BACKENDS = ("auto", "numba", "torch")


class Executor(Protocol):
    name: str

    @property
    def memory_bytes(self) -> int: ...

    def run(self, x: np.ndarray) -> np.ndarray: ...


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
        """Bytes held by the compiled model's arrays (packed weights, thresholds, masks)."""
        return self._executor.memory_bytes

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits, float32 (batch, classes). InvalidInputError for a wrong shape or dtype, NaN
        or infinity."""
        batch = self.check_input(x)
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        return self._executor.run(batch)

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
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            where = np.argwhere(~np.isfinite(x))[0].tolist()
            raise InvalidInputError(
                f"input {name!r}: values must be finite, got {x[tuple(where)]} at index {where}"
            )
        if x.dtype == np.float32:  # the common case: nothing to convert, nothing to overflow
            return np.ascontiguousarray(batch)
        with np.errstate(over="ignore"):
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        if x.dtype.kind == "f" and not np.isfinite(batch).all():
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
        """Compile (or load cached) kernels and run each batch size once; returns seconds.

        The inputs are drawn from ``input.value_range``; NonFiniteOutputError if any logit is
        NaN or infinite (weights that overflow float32 on the data the model was made for)."""
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        low, high = self.spec.input.value_range or (0.0, 1.0)
        for size in batch_sizes:
            shape = (int(size), *self.spec.input.shape)
            x = rng.uniform(low, high, size=shape)  # float64: any float32 range fits
            if self.spec.input.integer_valued:
                x = np.round(x)
            x = x.astype(np.float32)
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
    finite = np.isfinite(logits)
    if finite.all():
        return
    row = int(np.argmin(finite.all(axis=1)))
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
    memory_limit: MemoryLimit | None = MemoryLimit(),  # noqa: B008 (frozen, shared safely)
) -> CompiledModel:
    """Read an artifact (a file, or a version directory holding ``model.safetensors``), compile
    it for ``device`` and return the :class:`CompiledModel`.

    ``memory_limit``: refuse (ModelTooLargeError), before compiling, a model whose memory bound
    at ``memory_limit.max_batch`` rows exceeds ``memory_limit.max_bytes``
    (:mod:`model.engine.memory`); None = no limit."""
    start = time.perf_counter()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    resolved = resolve_device(device, backend)
    path = Path(path)
    if path.is_dir():
        path = path / ARTIFACT_FILENAME
    artifact = read_artifact(path)
    executor_name = "numba" if resolved == "cpu" and backend in ("auto", "numba") else "torch"
    if memory_limit is not None:
        check_memory(artifact.spec, memory_limit, executor_name)
    program = compile_program(artifact.spec, artifact.tensors)
    if executor_name == "numba":
        from model.engine.cpu import NumbaExecutor

        executor: Executor = NumbaExecutor(program)
    else:
        from model.engine.torch_backend import TorchExecutor

        executor = TorchExecutor(program, resolved)
    return CompiledModel(artifact.spec, program, executor, resolved, time.perf_counter() - start)


def resolve_device(device: str, backend: str = "auto") -> str:
    """ "cpu", "cuda", "cuda:N" or "auto" → the device string the model runs on."""
    if device == "auto":
        if backend != "numba" and _gpu_driver_present() and _torch_importable():
            from model.engine.torch_backend import cuda_device

            try:
                return cuda_device("cuda")
            except DeviceUnavailableError:
                pass
        return "cpu"
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


def _torch_importable() -> bool:
    return importlib.util.find_spec("torch") is not None


def _gpu_driver_present() -> bool:
    """A cheap check that avoids importing torch on machines without an NVIDIA driver."""
    return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/nvidia0")
