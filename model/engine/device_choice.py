"""Which device serves a model under ``device="auto"``: decided by measurement, at load.

The candidates are the CPU engine and, when a GPU is present, the torch backend on it. Each runs
the model's served batch sizes during warm-up (:func:`time_calls`), and :func:`choose_device`
picks the GPU only when it was measured at every one of those sizes and is faster at each::

    GPU  ⇔  ∀ b ∈ served batch sizes:  t_gpu(b) < t_cpu(b)

so ``auto`` never picks a device that is slower at a batch size the model serves. A GPU that
could not be probed or measured (no driver, a busy exclusive-mode GPU raising RuntimeError,
out of memory) leaves the CPU engine, with the reason recorded. No torch here: the function is
pure, so tests inject the timings.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Timed calls per batch size after one untimed call; the median is kept.
TIMED_CALLS = 5


@dataclass(frozen=True)
class DeviceChoice:
    """The device chosen, why, and the figures it was chosen on (seconds per call by batch)."""

    device: str
    reason: str
    cpu_seconds: Mapping[int, float] = field(default_factory=dict)
    gpu_seconds: Mapping[int, float] = field(default_factory=dict)
    gpu: str | None = None  # "cuda:0 (NVIDIA H200)" when one was probed
    on_gpu: bool = False  # the GPU candidate was chosen

    def as_metadata(self) -> dict[str, Any]:
        """JSON-ready: {device, reason, gpu, cpu_ms_per_call, gpu_ms_per_call}."""
        return {
            "device": self.device,
            "reason": self.reason,
            "gpu": self.gpu,
            "cpu_ms_per_call": _ms(self.cpu_seconds),
            "gpu_ms_per_call": _ms(self.gpu_seconds),
        }


def choose_device(
    cpu_seconds: Mapping[int, float],
    gpu_seconds: Mapping[int, float] | None,
    gpu_device: str | None,
    *,
    gpu_name: str | None = None,
    why_no_gpu: str = "no CUDA device",
) -> DeviceChoice:
    """The GPU iff it was timed at every batch size the CPU was and is faster at each."""
    label = None if gpu_device is None else f"{gpu_device} ({gpu_name or 'GPU'})"
    if gpu_device is None or gpu_seconds is None:
        return DeviceChoice("cpu", why_no_gpu, dict(cpu_seconds), {}, label)
    missing = sorted(set(cpu_seconds) - set(gpu_seconds))
    if missing:
        reason = f"GPU not measured at batch sizes {missing}"
        return DeviceChoice("cpu", reason, dict(cpu_seconds), dict(gpu_seconds), label)
    slower = sorted(b for b in cpu_seconds if not gpu_seconds[b] < cpu_seconds[b])
    if slower:
        reason = f"GPU not faster than the CPU engine at batch sizes {slower}"
        return DeviceChoice("cpu", reason, dict(cpu_seconds), dict(gpu_seconds), label)
    reason = f"GPU faster at every served batch size {sorted(cpu_seconds)}"
    return DeviceChoice(
        gpu_device, reason, dict(cpu_seconds), dict(gpu_seconds), label, on_gpu=True
    )


def time_calls(
    run: Callable[[np.ndarray], np.ndarray], inputs: Iterable[np.ndarray], calls: int = TIMED_CALLS
) -> dict[int, float]:
    """{batch: median seconds of ``calls`` calls of ``run(x)``} after one untimed call each."""
    seconds = {}
    for x in inputs:
        run(x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
        seconds[int(x.shape[0])] = statistics.median(times)
    return seconds


def _ms(seconds: Mapping[int, float]) -> dict[str, float]:
    return {str(b): round(s * 1000, 4) for b, s in sorted(seconds.items())}
