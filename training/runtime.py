"""Where a training run executes: its torch device and its number of CPU threads.

``--device``: ``auto`` is ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; ``cuda`` is
the current CUDA device, ``cuda:N`` device N; each fails with a :class:`~training.config.DeviceError`
naming what is missing. Under torchrun the process group decides (NCCL: the process's GPU, gloo:
the CPU) and an explicit device must agree with it.

``--threads`` defaults to every usable core, ``usable_cores() = min(|affinity mask|, ⌊cgroup CPU
quota⌋)`` (:mod:`model.cpus`), divided among the processes of a distributed run:
``max(1, usable_cores() // world_size)``.

``bf16``: ``on`` and ``off`` are what they say; ``auto`` turns bf16 autocast on where the device
computes bf16 natively (:func:`native_bf16`): a CPU with AVX-512 BF16 or AMX-BF16 instructions,
or a CUDA GPU that supports bf16. Elsewhere (an AVX2 CPU) bf16 is emulated with conversions and
a training step took 4–10× longer than in float32 (docs/training.md, "Training throughput").

``compile`` on a CPU needs a C++ compiler: inductor writes and builds C++ for the CPU kernels.
Where it finds none (no ``$CXX``, no ``g++``; e.g. a slim container) the run is refused before
it starts with a :class:`CompilerNotFoundError`, not a traceback at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.cpus import usable_cores
from training.config import ConfigError, DeviceError, TrainConfig
from training.distributed import SINGLE_PROCESS, DistributedContext

CPU = torch.device("cpu")


class CompilerNotFoundError(ConfigError):
    """``compile`` on a CPU where torch.compile's inductor finds no C++ compiler."""


@dataclass(frozen=True)
class Runtime:
    """The resolved device, torch thread count and bf16 autocast of a run."""

    device: torch.device
    threads: int
    bf16: bool = False

    def describe(self) -> str:
        return f"device {self.device}, {self.threads} thread{'s' if self.threads > 1 else ''}" + (
            ", bf16 autocast" if self.bf16 else ""
        )


def resolve_runtime(
    config: TrainConfig, distributed: DistributedContext = SINGLE_PROCESS
) -> Runtime:
    """The device and thread count ``config`` asks for on this machine (see the module doc)."""
    threads = config.num_threads or max(1, usable_cores() // distributed.world_size)
    if distributed.backend is None:
        device = resolve_device(config.device)
    else:
        device = distributed.device
        if config.device != "auto" and resolve_device(config.device) != device:
            raise DeviceError(
                f"device {config.device!r}: under torchrun the process group "
                f"({distributed.backend}) runs this process on {device}; leave --device auto"
            )
    if config.compile and device.type == "cpu" and cpp_compiler() is None:
        raise CompilerNotFoundError(
            "compile: torch.compile builds C++ for the CPU and found no C++ compiler here "
            "(neither $CXX nor g++); install one (apt-get install g++) or train with --no-compile"
        )
    bf16 = config.bf16 == "on" or (config.bf16 == "auto" and native_bf16(device))
    return Runtime(device, threads, bf16)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it
    (``torch.cuda.is_bf16_supported()``), a CPU with AVX-512 BF16 or AMX-BF16."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would build CPU kernels with, None if none."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except Exception:  # inductor raises InvalidCxxCompiler (a RuntimeError) when none is found
        return None


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
