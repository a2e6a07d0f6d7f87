"""A small real model for the service's unit tests: a numpy linear classifier with the engine's
interface (``predict``, ``warmup``, ``input_spec``, ``labels``, ``spec``), loaded from a real
artifact so that repository verification and refusal paths run for real. The integration tests
use the compiled engine and trained networks instead."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from pathlib import Path

import numpy as np

from model.artifact import encode_artifact, read_artifact
from model.engine.memory import MemoryLimit, check_memory
from model.errors import InvalidInputError
from model.repository import ModelVersion, publish
from tests.model.factory import tiny_spec, tiny_tensors


class LinearModel:
    """logits = flatten(x) @ W + b, with W, b drawn from the artifact's provenance seed."""

    backend = "numpy-reference"

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        delay_s: float = 0.0,
        memory_limit: MemoryLimit | None = None,
    ) -> None:
        artifact = read_artifact(path)
        if memory_limit is not None:  # the engine's check, on the artifact's own graph
            check_memory(artifact.spec, memory_limit)
        self.spec = artifact.spec
        self.input_spec = artifact.spec.input
        self.labels = artifact.spec.labels
        self.device = "cpu"
        self.weights, self.bias = linear_weights(self.spec)
        self.delay_s = delay_s
        self.calls: list[int] = []  # rows per call, to observe batching
        self._lock = threading.Lock()

    def predict(self, x: np.ndarray) -> np.ndarray:
        per_instance = math.prod(self.input_spec.shape)
        if x.dtype != np.float32 or x.reshape(len(x), -1).shape[1] != per_instance:
            raise InvalidInputError(
                f"expected float32 (n, {per_instance}), got {x.dtype} {x.shape}"
            )
        with self._lock:
            self.calls.append(len(x))
        if self.delay_s:
            time.sleep(self.delay_s)
        return (x.reshape(len(x), -1) @ self.weights + self.bias).astype(np.float32)

    predict_rows = predict  # checks anyway: the service's conformed rows pass them

    def warmup(self, batch_sizes=(1, 64)) -> float:
        for size in batch_sizes:
            self.predict(np.zeros((size, *self.input_spec.shape), np.float32))
        return 0.0


def linear_weights(spec) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(int(spec.provenance.get("seed", 0)))
    inputs = math.prod(spec.input.shape)
    return (
        rng.standard_normal((inputs, len(spec.labels))).astype(np.float32),
        rng.standard_normal(len(spec.labels)).astype(np.float32),
    )


def expected_logits(spec, x: np.ndarray) -> np.ndarray:
    weights, bias = linear_weights(spec)
    return (np.asarray(x, np.float32).reshape(len(x), -1) @ weights + bias).astype(np.float32)


def publish_tiny(repo: Path, name: str = "tiny", seed: int = 0) -> ModelVersion:
    """Publish the tiny test artifact (input (1, 6, 6), labels a/b/c) as a new version."""
    spec = tiny_spec()
    spec = dataclasses.replace(spec, provenance={"dataset": "none", "seed": seed})
    data = encode_artifact(spec, tiny_tensors(seed))
    return publish(repo, name, {"model.safetensors": data})


def corrupt(version: ModelVersion) -> None:
    """Flip a byte of the artifact so that the manifest's sha256 no longer matches."""
    path = version.artifact_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
