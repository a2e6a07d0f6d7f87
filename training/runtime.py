"""Where a training run executes: its torch device and its number of CPU threads.

``--device``: ``auto`` is ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; ``cuda`` is
the current CUDA device, ``cuda:N`` device N; each fails with a :class:`~training.config.DeviceError`
naming what is missing. Under torchrun the process group decides (NCCL: the process's GPU, gloo:
the CPU) and an explicit device must agree with it.

``--threads`` defaults to every usable core, ``usable_cores() = min(|affinity mask|, ⌊cgroup CPU
quota⌋)`` (:mod:`model.cpus`), divided among the processes of a distributed run:
``max(1, usable_cores() // world_size)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.cpus import usable_cores
from training.config import DeviceError, TrainConfig
from training.distributed import SINGLE_PROCESS, DistributedContext

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """The resolved device and torch thread count of a run."""

    device: torch.device
    threads: int

    def describe(self) -> str:
        return f"device {self.device}, {self.threads} thread{'s' if self.threads > 1 else ''}"


def resolve_runtime(
    config: TrainConfig, distributed: DistributedContext = SINGLE_PROCESS
) -> Runtime:
    """The device and thread count ``config`` asks for on this machine (see the module doc)."""
    threads = config.num_threads or max(1, usable_cores() // distributed.world_size)
    if distributed.backend is None:
        return Runtime(resolve_device(config.device), threads)
    device = distributed.device
    if config.device != "auto" and resolve_device(config.device) != device:
        raise DeviceError(
            f"device {config.device!r}: under torchrun the process group ({distributed.backend}) "
            f"runs this process on {device}; leave --device auto"
        )
    return Runtime(device, threads)


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` → the torch device on this machine."""
    if name == "cpu":
        return CPU
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else CPU
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if not available:
        raise DeviceError(
            f"device {name!r}: torch {torch.__version__} sees no CUDA device here "
            "(torch.cuda.is_available() is False); use --device cpu or auto"
        )
    index = torch.cuda.current_device() if name == "cuda" else int(name[5:])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"device {name!r} does not exist: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)
