"""How the CPU engine runs: :class:`EngineOptions`, passed to :func:`model.load_model`.

The engine reads no environment variable itself. :meth:`EngineOptions.from_env` is the one
documented bridge from the environment (``BNN_ENGINE_THREADS``, ``BNN_KERNEL_CACHE_DIR``), for
scripts; the service builds its options from its typed settings instead
(:meth:`service.settings.Settings.engine_options`). numba still reads its own ``NUMBA_*``
variables when it is imported (``NUMBA_NUM_THREADS``: the size of its thread pool;
``NUMBA_CPU_NAME``: the CPU kernels are compiled for), which the engine leaves to numba.

Options take effect when a model is loaded (:func:`model.engine.runtime.apply`), not when a
module is imported, so the order in which ``numba`` and ``model`` are imported changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "BNN_ENGINE_THREADS"
CACHE_DIR_ENV = "BNN_KERNEL_CACHE_DIR"


@dataclass(frozen=True)
class EngineOptions:
    """``threads``: threads a parallel kernel call uses; None = :func:`model.cpus.usable_cores`
    (the CPU affinity and the cgroup CPU quota), at most numba's pool size.
    ``kernel_cache_dir``: a writable directory for compiled kernels; None = numba's default
    (``model/engine/__pycache__``, or numba's user-wide cache where that is read-only)."""

    threads: int | None = None
    kernel_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads: expected a whole number ≥ 1 or None, got {self.threads!r}")
        if self.kernel_cache_dir is not None:
            object.__setattr__(self, "kernel_cache_dir", Path(self.kernel_cache_dir))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineOptions:
        """Options from ``BNN_ENGINE_THREADS`` and ``BNN_KERNEL_CACHE_DIR`` (unset or empty:
        the default); ValueError naming the variable when one is malformed."""
        environ = os.environ if environ is None else environ
        threads = environ.get(THREADS_ENV, "").strip()
        cache_dir = environ.get(CACHE_DIR_ENV, "").strip()
        if threads and not (threads.isdigit() and int(threads) >= 1):
            raise ValueError(f"{THREADS_ENV}: expected a whole number ≥ 1, got {threads!r}")
        return cls(
            threads=int(threads) if threads else None,
            kernel_cache_dir=Path(cache_dir) if cache_dir else None,
        )
