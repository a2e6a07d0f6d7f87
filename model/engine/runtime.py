"""Process-wide numba state of the CPU engine: kernel cache, threading layer, threads, fork.

Nothing here reads the environment: :func:`apply` takes an
:class:`~model.engine.options.EngineOptions` when a model is loaded, so importing ``numba``
before or after ``model`` gives the same engine.

Kernel cache
    Kernels are compiled with ``cache=True``: the machine code is written next to the sources
    (``model/engine/__pycache__``) or, when that is not writable (a read-only install in a
    container), under numba's user-wide cache; numba's own ``NUMBA_CACHE_DIR`` moves it.
    ``EngineOptions.kernel_cache_dir`` names a writable directory instead, e.g. a volume
    shared by the service's containers, so that only the first start pays for compilation.
    numba fixes a kernel's cache location when the kernel is defined (at import), so
    :func:`use_kernel_cache` re-points every engine kernel already defined; kernels already
    compiled in this process keep their machine code. numba keys each cached kernel by its
    signature *and* the CPU it was compiled for (name and features), so a cache built for
    another CPU is never loaded, only added to (``tests/model/engine/test_kernel_cache.py``).
    numba also stamps each cached kernel with its own source file's mtime and size, but not the
    files it inlines from (the intrinsics, the shared helpers): a change there alone would
    leave the old machine code in use. So every engine kernel's cache is an
    :class:`EngineKernelCache`, whose stamp adds :data:`ENGINE_SOURCES`, a digest of every
    source file of the engine: after any change to them a cached kernel is stale and compiles
    again, also from a cache directory shared by several versions.

Threading layer
    Several threads may call ``predict`` at once. numba's default ``workqueue`` layer is not
    thread-safe (concurrent parallel regions abort the process), so the engine asks for a
    thread-safe layer: ``omp`` (GNU OpenMP, ``libgomp1`` from the OS), else ``tbb`` (the
    ``tbb`` wheel). When neither library loads it falls back to ``workqueue`` and serializes
    kernel calls with one process-wide lock (:data:`KERNEL_LOCK`). A layer numba was told to use
    (its ``NUMBA_THREADING_LAYER``) is respected.

Threads
    A parallel kernel call uses ``EngineOptions.threads`` threads, by default
    :func:`model.cpus.usable_cores` (affinity and cgroup CPU quota), at most numba's pool
    (``numba.config.NUMBA_NUM_THREADS``, fixed when numba is imported). numba's thread count is
    per calling thread, so :func:`use_threads` sets it on the thread that calls.

Fork
    GNU OpenMP cannot run a parallel region in a child forked after the parent ran one (numba
    then terminates the child). Such a child runs every call on the serial kernels
    (:func:`parallel_kernels_usable` is False there): correct, single-threaded, never hung.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numba
from numba.core import config as _numba_config
from numba.core.caching import FunctionCache
from numba.core.dispatcher import Dispatcher

from model.cpus import usable_cores
from model.engine.options import EngineOptions

ENGINE_PACKAGE = "model.engine"


def source_digest(folder: Path) -> str:
    """sha256 of the contents of ``folder``'s ``*.py`` files, by name (not their mtimes)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# The engine's sources, as the stamp of its cached kernels (see "Kernel cache" above).
ENGINE_SOURCES = source_digest(Path(__file__).parent)


class EngineKernelCache(FunctionCache):
    """numba's on-disk cache of one kernel, stamped with its source file's (mtime, size) *and*
    :data:`ENGINE_SOURCES`: an index written from other engine sources reads as stale."""

    def __init__(self, py_func) -> None:
        super().__init__(py_func)
        cache_file = self._cache_file  # numba's index file; its stamp is checked on every load
        cache_file._source_stamp = (cache_file._source_stamp, ENGINE_SOURCES)


class _NumbaConfig(Protocol):
    """The settings of ``numba.core.config`` this module reads and sets. numba assigns them at
    import through ``globals()``, out of a type checker's sight, so they are declared here."""

    THREADING_LAYER: str
    NUMBA_NUM_THREADS: int
    CACHE_DIR: str


numba_config = cast(_NumbaConfig, _numba_config)


def _loadable(layer: str) -> bool:
    module = {"omp": "numba.np.ufunc.omppool", "tbb": "numba.np.ufunc.tbbpool"}[layer]
    try:
        importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True


def _choose_threading_layer() -> str:
    if numba_config.THREADING_LAYER != "default":  # numba read NUMBA_THREADING_LAYER
        return numba_config.THREADING_LAYER
    for layer in ("omp", "tbb"):
        if _loadable(layer):
            return layer
    return "workqueue"


REQUESTED_THREADING_LAYER = _choose_threading_layer()
numba_config.THREADING_LAYER = REQUESTED_THREADING_LAYER

# Held around every kernel call when the layer is not thread-safe.
KERNEL_LOCK = threading.Lock()
_THREAD_SAFE_LAYERS = frozenset({"omp", "tbb", "threadsafe", "safe"})
_parallel_usable = True
_CACHE_DIR_LOCK = threading.Lock()


def apply(options: EngineOptions) -> int:
    """Make ``options`` the process's engine settings, before the model's kernels compile;
    returns the threads a parallel call of this model uses."""
    if options.kernel_cache_dir is not None:
        use_kernel_cache(options.kernel_cache_dir)
    stamp_kernel_caches()
    return engine_threads(options.threads)


def engine_threads(requested: int | None = None) -> int:
    """``requested`` (default :func:`~model.cpus.usable_cores`), at most numba's pool size."""
    return max(1, min(requested or usable_cores(), numba_config.NUMBA_NUM_THREADS))


def use_threads(threads: int) -> None:
    """Let the parallel kernels this thread calls next use ``threads`` threads."""
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)


def use_kernel_cache(directory: str | os.PathLike[str]) -> None:
    """Cache the engine's kernels in ``directory`` from now on (process-wide)."""
    directory = str(directory)
    with _CACHE_DIR_LOCK:  # models may load in several threads at once
        if directory == numba_config.CACHE_DIR:
            return
        numba_config.CACHE_DIR = directory
        for kernel in engine_kernels():
            _stamp(kernel)  # a new cache: its locator reads CACHE_DIR now


def stamp_kernel_caches() -> None:
    """Give every engine kernel defined so far an :class:`EngineKernelCache` (once each)."""
    with _CACHE_DIR_LOCK:
        for kernel in engine_kernels():
            if not isinstance(getattr(kernel, "_cache", None), EngineKernelCache):
                _stamp(kernel)


def _stamp(kernel: Dispatcher) -> None:
    """Give ``kernel`` a new :class:`EngineKernelCache` (numba's private ``_cache``)."""
    cast(Any, kernel)._cache = EngineKernelCache(kernel.py_func)


def engine_kernels() -> Iterator[Dispatcher]:
    """Every cached numba kernel of the engine's modules imported so far: module globals and
    the members of module-level kernel sets (the serial twins live only there)."""
    seen: set[int] = set()
    for name, module in list(sys.modules.items()):
        if not (name == ENGINE_PACKAGE or name.startswith(ENGINE_PACKAGE + ".")):
            continue
        for value in list(vars(module).values()):
            members = (
                [getattr(value, f.name) for f in fields(value)]
                if is_dataclass(value) and not isinstance(value, type)
                else [value]
            )
            for kernel in members:
                if (
                    isinstance(kernel, Dispatcher)
                    # numba's private per-kernel cache, absent from its stubs
                    and isinstance(getattr(kernel, "_cache", None), FunctionCache)
                    and id(kernel) not in seen
                ):
                    seen.add(id(kernel))
                    yield kernel


def cache_dir() -> Path | None:
    """Where compiled kernels are cached (None: next to the sources / numba's default)."""
    return Path(numba_config.CACHE_DIR) if numba_config.CACHE_DIR else None


def kernel_guard() -> contextlib.AbstractContextManager:
    """A context to run kernels in: the global lock under ``workqueue``, else nothing.

    Decided by the layer numba actually runs once it has started one (another library may have
    launched a parallel region before this module set its choice), else by the requested one.
    """
    if threading_layer() in _THREAD_SAFE_LAYERS:
        return contextlib.nullcontext()
    return KERNEL_LOCK


def threading_layer() -> str:
    """The layer numba actually runs (after the first parallel kernel), else the requested one."""
    try:
        return numba.threading_layer()
    except ValueError:
        return REQUESTED_THREADING_LAYER


def parallel_kernels_usable() -> bool:
    """False in a child forked after its parent started GNU OpenMP's threads."""
    return _parallel_usable


def _after_fork_in_child() -> None:
    global KERNEL_LOCK, _parallel_usable
    KERNEL_LOCK = threading.Lock()  # another thread of the parent may have held it
    from numba.np.ufunc import parallel

    if parallel._is_initialized and parallel._threading_layer == "omp":
        _parallel_usable = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
